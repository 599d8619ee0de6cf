"""Where F8Net's fixed-point PACT clips fold: clip groups from the structure.

See :mod:`fracq.methods.f8net.provider` for how a clip is folded into the
layers producing a tensor and applied by its readers.
"""

from __future__ import annotations

from fracq.graph import Structure
from fracq.graph import is_max_pool


def pact_groups(st: Structure, folded_pairs) -> tuple[dict, dict, dict]:
  """Where fixed-point PACT clips can be folded: ``(readers, producers,
  entries)``, each mapping a layer (reader: its input is clipped; producer:
  its output is divided by the clip) or a residual module (entry: its input
  is clipped once, for its convs and its shortcut) to a clip *group*, named
  by the group's first producer (which owns ``quant/<it>/pact_alpha``).

  A group is a set of tensors sharing one clip: a layer's (post-BN) output,
  or a residual add's output together with the tensor its identity shortcut
  carries (the add sums them in one unit, so their scales must agree). A
  group is used only if every tensor in it is non-negative where read (after
  a ReLU) and read only by quantized layers and identity shortcuts, and if
  its producers are layers (the tensor's layer, or the add's branch layers)
  with any BatchNorm folded (a float BN would undo the scaling).
  """
  parent = {}

  def find(t):
    while parent.setdefault(t, t) != t:
      t = parent[t]
    return t

  reads = {}  # tensor -> [(reader, relu)]; reader: a layer or ('id', add)
  for layer, src in st.srcs.items():
    if src is not None:
      reads.setdefault(src[0], []).append((layer, src[1]))
  operand_of = {}
  for add, a in st.adds.items():
    for layer in a['operands']:
      operand_of[layer] = add
    if a['identity'] is not None:
      ident, relu, pool = a['identity']
      # a max pool on the way commutes with the scaling and the clip
      reads.setdefault(ident, []).append(
        (('id', add), relu and (pool == 1 or is_max_pool(pool)))
      )
      parent[find(ident)] = find(add)
  tensors = [t for t in st.order if t in reads and t not in operand_of]
  tensors += list(st.adds)

  def producers_of(t):
    return list(st.adds[t]['operands']) if t in st.adds else [t]

  def foldable(t):
    if t not in reads:  # the model's output: its scale cannot change
      return False
    non_negative = t in st.adds and st.adds[t]['relu']
    readers_ok = all(
      (relu or non_negative)
      and (
        isinstance(r, tuple) or (r in st.order and not st.signs.get(r, True))
      )
      for r, relu in reads[t]
    )
    producers_ok = all(
      p in st.order
      and (p not in st.pairs or p in folded_pairs)
      and (p == t or not reads.get(p))  # a branch output feeds its add only
      for p in producers_of(t)
    )
    return readers_ok and producers_ok

  ok = {}
  for t in set(tensors) | set(parent):  # e.g. the model input: not foldable
    ok[find(t)] = ok.get(find(t), True) and t in tensors and foldable(t)
  rank = {p: i for i, p in enumerate(st.order)}
  readers, producers, entries = {}, {}, {}
  for g in [g for g, good in ok.items() if good]:
    ts = [t for t in tensors if find(t) == g]
    prods = [p for t in ts for p in producers_of(t)]
    owner = min(prods, key=rank.__getitem__)
    for p in prods:
      producers[p] = owner
    for t in ts:
      for r, _ in reads[t]:
        if isinstance(r, tuple):  # an identity shortcut: its block's input
          entries[r[1]] = owner
        else:
          readers[r] = owner
  # A projection block (no identity) quantizes its input once at entry too:
  # clip it there when its convs read a clipped tensor.
  for mod in st.shared:
    ins = {
      readers[layer]
      for layer, src in st.srcs.items()
      if layer.startswith(mod + '/')
      and layer in readers
      and src is not None
      and not src[0].startswith(mod + '/')
    }
    if mod not in entries and len(ins) == 1:
      entries[mod] = ins.pop()
  return readers, producers, entries
