"""Structure-aware kernel encodings (sparse / codebook): exact, never larger
than dense, the expected bytes, corruption detected, end to end with PCQAT."""

import json
import os
import struct
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fracq
from fracq import export
from fracq.core import packing
from fracq.export import artifact
from fracq.methods import preserve as pv
from fracq.methods.qat import QATModel


def _nb(n, b):
  return (int(n) * int(b) + 7) // 8


def _ib(k):
  return 0 if k <= 1 else int(np.ceil(np.log2(k)))


def _structured_codes(rng, shape, bits, signed, sparsity, k):
  """Codes drawn from ``k`` distinct values of the range, then a fraction
  ``sparsity`` of them set to 0."""
  lo, hi = packing.code_range(bits, signed)
  k = min(k, hi - lo + 1)
  table = rng.choice(np.arange(lo, hi + 1), size=k, replace=False)
  c = rng.choice(table, size=shape)
  c[rng.random(shape) < sparsity] = 0 if lo <= 0 <= hi else lo
  return c


def _expected_sizes(rows, bits):
  """The four encodings' sizes, computed independently, per-group bits."""
  mask = _nb(sum(r.size for r in rows), 1)
  dense = sum(_nb(r.size, b) for r, b in zip(rows, bits))
  cb = sum(
    _nb(len(set(r.tolist())), b) + _nb(r.size, _ib(len(set(r.tolist()))))
    for r, b in zip(rows, bits)
  )
  sp = mask + sum(_nb(np.count_nonzero(r), b) for r, b in zip(rows, bits))
  spcb = mask
  for r, b in zip(rows, bits):
    nz = r[r != 0]
    k = len(set(nz.tolist()))
    spcb += _nb(k, b) + _nb(nz.size, _ib(k))
  return {'dense': dense, 'codebook': cb, 'sparse': sp, 'sparse_codebook': spcb}


shapes = st.sampled_from(
  [
    (1,),
    (7,),
    (13, 5),
    (3, 3, 5, 7),
    (1, 1, 3, 9),
    (17, 3),
    (2, 3, 1),
    (255,),
    (5, 1, 11),
  ]
)


@settings(max_examples=250, deadline=None)
@given(
  shape=shapes,
  bits=st.integers(1, 8),
  signed=st.booleans(),
  sparsity=st.floats(0, 0.95),
  k_frac=st.floats(0, 1),
  seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_per_tensor_and_never_larger(
  shape, bits, signed, sparsity, k_frac, seed
):
  rng = np.random.default_rng(seed)
  k = 1 + int(k_frac * ((1 << bits) - 1))  # 1 .. 2^b distinct values
  codes = _structured_codes(rng, shape, bits, signed, sparsity, k)
  enc = packing.encode(codes, bits, signed=signed)
  out = packing.decode(
    enc.kind, enc.parts, shape, bits, signed=signed, tables=enc.tables
  )
  assert out.dtype == np.int32 and out.shape == codes.shape
  np.testing.assert_array_equal(out, codes)
  sizes = _expected_sizes([codes.reshape(-1)], [bits])
  assert enc.dense_nbytes == sizes['dense'] == _nb(codes.size, bits)
  # The smallest encoding, dense unless another is strictly smaller.
  assert enc.nbytes == min(sizes.values())
  assert enc.nbytes <= enc.dense_nbytes
  if enc.kind != 'dense':
    assert enc.nbytes < enc.dense_nbytes
  # structure=False: exactly the old dense packing.
  d = packing.encode(codes, bits, signed=signed, structure=False)
  assert d.kind == 'dense'
  np.testing.assert_array_equal(
    d.parts['d'], packing.pack_codes(codes, bits, signed=signed)
  )


@settings(max_examples=120, deadline=None)
@given(
  shape=st.sampled_from([(3, 3, 5, 7), (13, 4), (1, 1, 1, 9), (6,), (2, 5, 3)]),
  axis=st.integers(-1, 0),
  signed=st.booleans(),
  sparsity=st.floats(0, 0.95),
  seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_per_channel_bits(shape, axis, signed, sparsity, seed):
  rng = np.random.default_rng(seed)
  ax = axis % len(shape)
  bits = rng.integers(1, 9, size=shape[ax])
  codes = np.zeros(shape, np.int64)
  for c, b in enumerate(bits):
    k = int(rng.integers(1, (1 << int(b)) + 1))
    sub = _structured_codes(
      rng, np.take(codes, c, axis=ax).shape, int(b), signed, sparsity, k
    )
    idx = [slice(None)] * len(shape)
    idx[ax] = c
    codes[tuple(idx)] = sub
  enc = packing.encode(codes, bits, signed=signed, axis=axis)
  out = packing.decode(
    enc.kind,
    enc.parts,
    shape,
    bits.tolist(),
    signed=signed,
    axis=axis,
    tables=enc.tables,
  )
  np.testing.assert_array_equal(out, codes)
  rows = list(np.moveaxis(codes, ax, 0).reshape(shape[ax], -1))
  sizes = _expected_sizes(rows, bits)
  buf, _ = packing.pack_per_channel(codes, bits, ax, signed=signed)
  assert enc.dense_nbytes == sizes['dense'] == buf.size
  assert enc.nbytes == min(sizes.values()) <= enc.dense_nbytes
  if enc.kind != 'dense':
    assert enc.nbytes < enc.dense_nbytes
    if enc.tables is not None:  # a table per channel
      assert len(enc.tables) == shape[ax]


@settings(max_examples=40, deadline=None)
@given(
  bits=st.integers(1, 8),
  per_channel=st.booleans(),
  sparsity=st.floats(0, 0.95),
  k_frac=st.floats(0, 1),
  seed=st.integers(0, 2**31 - 1),
)
def test_artifact_round_trip(
  tmp_path_factory, bits, per_channel, sparsity, k_frac, seed
):
  rng = np.random.default_rng(seed)
  k = 1 + int(k_frac * ((1 << bits) - 1))
  shape = (3, 3, 5, 7)
  codes = _structured_codes(rng, shape, bits, True, sparsity, k)
  b = np.full(7, bits) if per_channel else bits
  t = {
    'k.packed': artifact.PackedTensor(codes, b, True, 3),
    'd.packed': artifact.PackedTensor(
      rng.integers(-4, 4, size=(31,)), 3, True, -1
    ),
  }
  f = {'s': rng.standard_normal(7).astype(np.float32)}
  path = str(tmp_path_factory.mktemp('a') / 'm')
  encs = {}
  size = artifact.write_artifact(path, t, f, {'x': 1}, encodings=encs)
  got, floats, man = artifact.read_artifact(path)
  np.testing.assert_array_equal(got['k.packed'], codes)
  np.testing.assert_array_equal(got['d.packed'], t['d.packed'].codes)
  np.testing.assert_array_equal(floats['s'], f['s'])
  assert man['tensors']['k.packed']['encoding'] == encs['k.packed'][0]
  dpath = path + '.dense'
  dsize = artifact.write_artifact(dpath, t, f, {'x': 1}, encode_structure=False)
  assert all(
    e['encoding'] == 'dense'
    for n, e in artifact.read_artifact(dpath)[2]['tensors'].items()
    if n.endswith('.packed')
  )
  kind, n, dense = encs['k.packed']
  assert n <= dense
  # The file shrinks by what the encoding saved (the manifest's own size
  # may differ by a few bytes).
  assert abs((dsize - size) - (dense - n)) < 128
  # A file with only dense tensors stays version 1 (old readers read it).
  version = _safetensors_header(dpath)[0]['__metadata__']['fracq_format']
  assert version == '1'
  if kind != 'dense':
    assert (
      _safetensors_header(path)[0]['__metadata__']['fracq_format']
      == str(artifact.FORMAT_VERSION)
      == '2'
    )


def test_sparse_clustered_8bit_kernel_expected_bytes(tmp_path):
  """50% zeros, 8 clusters (zero one of them), 8 bits: mask (1 bit) + a 3-bit
  index for the nonzero half: (1 + 0.5 * 3) / 8 of dense, plus the table."""
  rng = np.random.default_rng(0)
  shape = (3, 3, 64, 64)
  n = int(np.prod(shape))  # 36864
  centroids = np.array([-120, -61, -17, 9, 33, 77, 127])  # + the zero
  flat = np.zeros(n, np.int64)
  nz = rng.permutation(n)[: n // 2]
  flat[nz] = centroids[np.arange(nz.size) % 7]
  codes = flat.reshape(shape)
  assert np.mean(codes == 0) == 0.5 and np.unique(codes).size == 8
  enc = packing.encode(codes, 8, signed=True)
  mask_bytes = n // 8  # 4608
  table_bytes = 7  # 7 nonzero values at 8 bits
  index_bytes = (n // 2) * 3 // 8  # 18432 x 3 bits = 6912
  assert enc.kind == 'sparse_codebook'
  assert {k: v.size for k, v in enc.parts.items()} == {
    'm': mask_bytes,
    't': table_bytes,
    'i': index_bytes,
  }
  assert enc.nbytes == 11527 and enc.dense_nbytes == n
  assert enc.nbytes / enc.dense_nbytes == pytest.approx(
    (1 + 0.5 * 3) / 8, abs=1e-3
  )
  # Codebook alone would take 3 bits for all, sparse alone 1 + 0.5 x 8.
  assert enc.nbytes < 7 + 3 * n // 8 < mask_bytes + n // 2
  # In the artifact: the packed blob is exactly those parts.
  path = str(tmp_path / 'k')
  artifact.write_artifact(path, {'w': artifact.PackedTensor(codes, 8)}, {}, {})
  hdr, _ = _safetensors_header(path)
  s, e = hdr['packed']['data_offsets']
  assert e - s == 11527
  np.testing.assert_array_equal(artifact.read_artifact(path)[0]['w'], codes)
  # Per-channel bits (all 8): one table per channel.
  encc = packing.encode(codes, np.full(64, 8), signed=True, axis=-1)
  assert encc.kind == 'sparse_codebook' and len(encc.tables) == 64
  nnz_c = np.count_nonzero(codes.reshape(-1, 64), axis=0)
  assert encc.nbytes == mask_bytes + sum(7 + (z * 3 + 7) // 8 for z in nnz_c)


def test_all_distinct_or_dense_codes_stay_dense():
  rng = np.random.default_rng(1)
  codes = rng.integers(-8, 8, size=(4096,))
  assert packing.encode(codes, 4, signed=True).kind == 'dense'
  assert packing.encode(np.zeros((10, 3), int), 2, signed=True).kind in (
    'codebook',
    'sparse',
    'sparse_codebook',
  )
  # One distinct value: a table of one and zero index bits.
  e = packing.encode(np.full((9, 9), 5), 8, signed=True)
  assert e.kind == 'codebook' and e.parts['i'].size == 0 and e.nbytes == 1
  np.testing.assert_array_equal(
    packing.decode(e.kind, e.parts, (9, 9), 8, signed=True, tables=e.tables),
    np.full((9, 9), 5),
  )


# -- corruption ----------------------------------------------------------------
def _safetensors_header(path):
  blob = open(path, 'rb').read()
  (hlen,) = struct.unpack('<Q', blob[:8])
  return json.loads(blob[8 : 8 + hlen]), 8 + hlen


def _structured_artifact(tmp_path):
  rng = np.random.default_rng(3)
  n = 4000
  sparse_cb = np.where(
    rng.random(n) < 0.6, 0, rng.choice([-7, -3, 2, 5], size=n)
  )
  sparse_only = np.where(
    rng.random(n) < 0.9, 0, rng.integers(-128, 128, size=n)
  )
  cb = rng.choice([-100, -1, 3, 50, 120], size=(40, 100))
  per_ch = np.where(
    rng.random((10, 50)) < 0.75, 0, rng.choice([-2, 1, 3], size=(10, 50))
  )
  t = {
    'spcb': artifact.PackedTensor(sparse_cb, 4),
    'sp': artifact.PackedTensor(sparse_only, 8),
    'cb': artifact.PackedTensor(cb, 8),
    'pc': artifact.PackedTensor(per_ch, np.full(10, 3), True, 0),
    'dense': artifact.PackedTensor(rng.integers(-8, 8, size=333), 4),
  }
  path = str(tmp_path / 'structured')
  encs = {}
  artifact.write_artifact(
    path, t, {'f': np.ones(3, np.float32)}, {}, encodings=encs
  )
  assert {k: v[0] for k, v in encs.items()} == {
    'spcb': 'sparse_codebook',
    'sp': 'sparse',
    'cb': 'codebook',
    'pc': 'sparse_codebook',
    'dense': 'dense',
  }
  return path, t


def _manifest(path):
  from safetensors import safe_open

  with safe_open(path, framework='numpy') as f:
    return json.loads(zlib.decompress(f.get_tensor('manifest').tobytes()))


def test_corrupting_any_part_raises(tmp_path):
  path, t = _structured_artifact(tmp_path)
  codes, _, man = artifact.read_artifact(path)
  for name, pt in t.items():
    np.testing.assert_array_equal(codes[name], pt.codes)
  hdr, data0 = _safetensors_header(path)
  pstart = data0 + hdr['packed']['data_offsets'][0]
  blob = open(path, 'rb').read()
  entries = _manifest(path)['t']
  checked = 0
  for name, e in entries.items():
    if e[0] == 'e':
      parts = e[-1]
    elif e[0] == 'p':
      parts = {'dense': e[5:8]}
    else:
      continue
    for part, (off, nbytes, _) in parts.items():
      if nbytes == 0:
        continue
      for pos in (off, off + nbytes - 1):
        bad = bytearray(blob)
        bad[pstart + pos] ^= 0x41
        p2 = str(tmp_path / f'bad_{name}_{part}_{pos}')
        open(p2, 'wb').write(bytes(bad))
        with pytest.raises(artifact.ArtifactError, match=f'{name!r}.*checksum'):
          artifact.read_artifact(p2)
        checked += 1
  assert checked >= 2 * 11
  p3 = str(tmp_path / 'truncated')
  open(p3, 'wb').write(blob[: len(blob) - 100])
  with pytest.raises(artifact.ArtifactError, match='truncated or corrupt'):
    artifact.read_artifact(p3)


def _rewrite(path, out, fn):
  """Rewrites the artifact with ``fn(manifest)`` applied (CRCs still
  valid), as a crafted or mis-written file would be."""
  from safetensors import safe_open
  from safetensors.numpy import save_file

  with safe_open(path, framework='numpy') as f:
    meta = f.metadata()
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  man = json.loads(zlib.decompress(tensors['manifest'].tobytes()))
  fn(man)
  tensors['manifest'] = np.frombuffer(
    zlib.compress(json.dumps(man).encode()), np.uint8
  ).copy()
  save_file(tensors, out, metadata=meta)


@pytest.mark.parametrize(
  'edit, match',
  [
    (lambda m: m['t']['cb'].__setitem__(6, [4]), 'does not match'),
    (lambda m: m['t']['spcb'].__setitem__(6, [2]), 'does not match'),
    (lambda m: m['t']['spcb'].__setitem__(5, 'zstd'), 'unknown encoding'),
    (lambda m: m['t']['sp'][7].pop('m'), 'needs parts'),
    (lambda m: m['t']['pc'].__setitem__(2, [3] * 9), 'does not match'),
    (lambda m: m['t']['cb'].__setitem__(1, [40, 99]), 'does not match'),
    (lambda m: m['t']['dense'].__setitem__(0, 'q'), 'unknown entry kind'),
  ],
)
def test_inconsistent_manifest_raises(tmp_path, edit, match):
  path, _ = _structured_artifact(tmp_path)
  out = str(tmp_path / 'edited')
  _rewrite(path, out, edit)
  with pytest.raises(artifact.ArtifactError, match=match):
    artifact.read_artifact(out)


def test_versions(tmp_path):
  path, t = _structured_artifact(tmp_path)
  assert _safetensors_header(path)[0]['__metadata__']['fracq_format'] == '2'
  from safetensors import safe_open
  from safetensors.numpy import save_file

  with safe_open(path, framework='numpy') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  save_file(tensors, str(tmp_path / 'v3'), metadata={'fracq_format': '3'})
  with pytest.raises(artifact.ArtifactError, match='reads versions'):
    artifact.read_artifact(str(tmp_path / 'v3'))
  # An "e" entry in a file that claims version 1 is refused.
  save_file(tensors, str(tmp_path / 'v1'), metadata={'fracq_format': '1'})
  with pytest.raises(artifact.ArtifactError, match='version'):
    artifact.read_artifact(str(tmp_path / 'v1'))


# -- end to end: PCQAT model -> artifact -----------------------------------------
class SmallNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(32, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(64, (3, 3), name='conv2')(x))
    x = nn.relu(nn.Conv(64, (3, 3), feature_group_count=64, name='dw')(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10, name='fc')(x)


def _pcqat_model(bits, granularity='tensor', k=8):
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  rules = [
    fracq.Rule(
      module_path='.*',
      weight=fracq.TensorSpec(
        bits=bits, granularity=granularity, range_method='lsq'
      ),
      act=fracq.TensorSpec(bits=8),
    )
  ]
  tr = pv.PreserveTransform(prune=True, cluster=True, clusters=k)
  qm = QATModel(SmallNet(), rules, x, kernel_transform=tr)
  v = qm.init(jax.random.key(1), x)
  p = pv.cluster_params(pv.prune_params(v['params'], 0.5), k)
  v = jax.jit(qm.calibrate)({**v, 'params': p}, x)
  # A few steps so that the centroids (and the raw kernels) move: the raw
  # params are then no longer the kernels the model computes with.
  y = jax.nn.one_hot(jnp.arange(4) % 10, 10)
  train = {c: v[c] for c in qm.trainable_collections if c in v}
  state = {c: v[c] for c in v if c not in train}

  @jax.jit
  def step(tr_, st_):
    def loss(a):
      out, upd = qm.apply({**a, **st_}, x, mutable=['quant_stats'])
      return jnp.mean((out - y) ** 2), upd

    (_, upd), g = jax.value_and_grad(loss, has_aux=True)(tr_)
    return jax.tree_util.tree_map(lambda a, b: a - 0.05 * b, tr_, g), {
      **st_,
      **upd,
    }

  for _ in range(3):
    train, state = step(train, state)
  return qm, {**train, **state}, x


@pytest.mark.parametrize('bits, granularity', [(8, 'tensor'), (4, 'channel')])
def test_pcqat_export_is_smaller_and_exact(tmp_path, bits, granularity):
  qm, v, x = _pcqat_model(bits, granularity)
  fq = export.fake_quant_kernels(qm, v, x)
  for name, w in fq.items():  # the structure is there
    assert np.mean(w == 0) >= 0.5 - 1e-9
    assert max(np.unique(w[..., c]).size for c in range(w.shape[-1])) <= 8
  # The raw kernels left the clusters (straight-through): freezing must use
  # the transformed kernels.
  assert np.unique(np.asarray(v['params']['conv2']['kernel'])).size > 8
  path = str(tmp_path / 'pcqat.safetensors')
  rep = export.export_model(qm, v, path)
  dpath = str(tmp_path / 'dense.safetensors')
  drep = export.export_model(qm, v, dpath, encode_structure=False)
  assert rep.artifact_bytes == os.path.getsize(path)
  assert rep.artifact_bytes < drep.artifact_bytes
  assert rep.theoretical_bytes == drep.theoretical_bytes
  assert drep.structure_saved_bytes == 0
  assert drep.encoding_counts() == {'dense': 4}
  # The file shrinks by what the report says the encodings saved, less the
  # longer manifest entries (offsets and CRCs of every part, the tables).
  shrink = drep.artifact_bytes - rep.artifact_bytes
  assert 0 <= rep.structure_saved_bytes - shrink < 512
  # Container overhead (header, manifest) under a kilobyte either way.
  for r in (rep, drep):
    extra = r.artifact_bytes - (r.theoretical_bytes - r.structure_saved_bytes)
    assert 0 < extra < 1024, r.format()
    assert r.overhead == pytest.approx(
      r.artifact_bytes / (r.theoretical_bytes - r.structure_saved_bytes) - 1
    )
  counts = rep.encoding_counts()
  assert counts.get('dense', 0) <= 1, rep.format()
  if granularity == 'tensor':
    assert counts.get('sparse_codebook', 0) >= 3, rep.format()
  text = rep.format()
  assert 'structure (sparsity/clusters) saved' in text
  assert 'actual / theoretical' in text
  assert 'disabled' in drep.format()
  for p in (path, dpath):
    codes, floats, man = export.read_artifact(p)
    deq = export.dequantized_kernels(codes, floats, man)
    assert set(deq) == set(fq) == set(qm.facts)
    for layer in fq:
      np.testing.assert_array_equal(deq[layer], fq[layer])
  frozen = export.freeze(qm, v)
  codes, _, man = export.read_artifact(path)
  for layer, fl in frozen.items():
    np.testing.assert_array_equal(codes[f'{layer}/kernel.packed'], fl.codes)
  print(
    f'\n[{bits}-bit {granularity}] structured {rep.artifact_bytes} B, '
    f'dense {drep.artifact_bytes} B, saved {rep.structure_saved_bytes} B\n'
    + text
  )
