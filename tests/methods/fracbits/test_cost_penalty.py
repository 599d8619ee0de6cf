"""Cost models, budgets, penalties and hard assignment, against hand counts."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fracq.methods import cost as C
from fracq.methods.fracbits import penalty as P

LEARN = C.TensorBits(fixed=None, bounds=(2.0, 8.0))
LEARN_PC = C.TensorBits(fixed=None, bounds=(2.0, 8.0), per_channel=True)
FIX8 = C.TensorBits(fixed=8.0, bounds=(8.0, 8.0))
FLOAT = C.TensorBits(fixed=32.0, bounds=(32.0, 32.0))

# A 3-layer model: first conv fixed 8/8, a searched conv, a classifier whose
# weights are fixed at 8 bits but whose input activation is searched.
LAYERS = [
  C.LayerCost(
    'first', numel=216, macs=216 * 64, out_channels=8, weight=FIX8, act=FIX8
  ),
  C.LayerCost(
    'mid',
    numel=1152,
    macs=1152 * 16,
    out_channels=16,
    weight=LEARN_PC,
    act=LEARN,
  ),
  C.LayerCost(
    'fc', numel=160, macs=160, out_channels=10, weight=FIX8, act=LEARN
  ),
]
QUANT = {
  'mid': {
    'kernel_bits': jnp.array([3.0] * 8 + [5.0] * 8),
    'input_bits': jnp.array(4.5),
  },
  'fc': {'input_bits': jnp.array(6.0)},
}


def test_size_cost_hand_count():
  m = C.CostModel(LAYERS, 'size')
  # 216*8 + 1152*mean(3,5)=4 + 160*8
  assert float(m.cost(QUANT)) == 216 * 8 + 1152 * 4 + 160 * 8
  assert m.int8_cost() == (216 + 1152 + 160) * 8
  assert m.uniform_cost(4) == 216 * 8 + 1152 * 4 + 160 * 8
  assert m.bound_cost('min') == 216 * 8 + 1152 * 2 + 160 * 8


def test_bitops_cost_hand_count():
  m = C.CostModel(LAYERS, 'bitops')
  expect = 216 * 64 * 8 * 8 + 1152 * 16 * 4 * 4.5 + 160 * 8 * 6
  np.testing.assert_allclose(float(m.cost(QUANT)), expect, rtol=1e-6)
  # Hard: bits rounded (4.5 rounds to 4 with round-half-even).
  expect_h = 216 * 64 * 64 + 1152 * 16 * 4 * 4 + 160 * 8 * 6
  np.testing.assert_allclose(
    float(m.cost(QUANT, hard=True)), expect_h, rtol=1e-6
  )
  assert m.uniform_cost(3) == 216 * 64 * 64 + 1152 * 16 * 9 + 160 * 8 * 3


def test_bits_are_clamped_like_the_quantizer():
  m = C.CostModel(LAYERS[1:2], 'size')
  q = {
    'mid': {'kernel_bits': jnp.full((16,), 11.0), 'input_bits': jnp.array(1.0)}
  }
  assert float(m.cost(q)) == 1152 * 8


def test_penalty_gradient_above_b_max_points_back_inside():
  m = C.CostModel(LAYERS[1:2], 'size')
  q = {
    'mid': {'kernel_bits': jnp.full((16,), 11.0), 'input_bits': jnp.array(6.0)}
  }
  target = 1152 * 5.0
  # Cost 1152 * 8 above the target: descent must lower the bits (positive
  # gradient), slope numel / channels / target.
  g = jax.grad(lambda q: P.Penalty(form='abs')(m.cost(q), target))(q)
  np.testing.assert_allclose(
    g['mid']['kernel_bits'], 1152 / 16 / target, rtol=1e-6
  )
  # A target above the cost would pull the bits further up: blocked.
  g = jax.grad(lambda q: P.Penalty(form='abs')(m.cost(q), 1152 * 9.0))(q)
  np.testing.assert_array_equal(g['mid']['kernel_bits'], 0.0)


def test_hard_cost_rounds_signed_bits_like_the_quantizer():
  lw = dict(fixed=None, bounds=(0.0, 8.0))
  q = {'l': {'kernel_bits': jnp.array([0.4, 1.2, 1.7, 3.4])}}
  for min_bits, bits in ((2, [0, 2, 2, 3]), (1, [0, 1, 2, 3])):
    m = C.CostModel(
      [
        C.LayerCost(
          'l',
          numel=40,
          macs=1,
          out_channels=4,
          weight=C.TensorBits(
            per_channel=True, min_nonzero_bits=min_bits, **lw
          ),
          act=FIX8,
        )
      ],
      'size',
    )
    assert float(m.cost(q, hard=True)) == 10 * sum(bits)
    assert m.integer_cost(q) == 10 * sum(bits)
    # Fractional: linear in b (the quantizer mixes b / m of the first grid).
    assert float(m.cost(q)) == pytest.approx(10 * (0.4 + 1.2 + 1.7 + 3.4))


def test_cost_records_know_signs():
  import flax.linen as nn
  import fracq

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.relu(nn.Dense(8, name='fc1')(x))
      x = nn.relu(nn.Dense(6, name='fc2')(x))
      return nn.Dense(3, name='fc3')(x)

  x = jax.random.normal(jax.random.key(0), (4, 5))
  spec = fracq.FracBitsSpec(bits=4, bit_bounds=(0.0, 8.0))
  rules = [
    fracq.Rule(
      module_path='fc2',
      weight=dataclasses.replace(spec, signed=False),
      act=spec,
    ),
    fracq.Rule(
      module_path='fc3',
      weight=dataclasses.replace(spec, range_method='dorefa'),
      act=spec,
    ),
    fracq.Rule(weight=spec, act=spec),
  ]
  qm = fracq.quantize(
    MLP(), rules, x, budget=fracq.Budget(kind='bitops', uniform_bits=4)
  )
  layers = {layer.path: layer for layer in qm.cost_model.layers}
  m = {
    p: (layer.weight.min_nonzero_bits, layer.act.min_nonzero_bits)
    for p, layer in layers.items()
  }
  # Signed kernel and input: 2; fc2's kernel is unsigned by its spec, its
  # input comes after a ReLU; fc3's DoReFa kernel has a real 1-bit grid.
  assert m == {'fc1': (2, 2), 'fc2': (1, 1), 'fc3': (1, 1)}


def test_budget_forms_and_impossible_budget():
  m = C.CostModel(LAYERS, 'size')
  i8 = (216 + 1152 + 160) * 8
  assert m.resolve(C.Budget(kind='size', absolute=6000)) == 6000
  assert m.resolve(C.Budget(kind='size', compression=2.0)) == i8 / 2
  assert m.resolve(C.Budget(kind='size', uniform_bits=3)) == (
    216 * 8 + 1152 * 3 + 160 * 8
  )
  with pytest.raises(ValueError, match='Impossible budget'):
    m.resolve(C.Budget(kind='size', absolute=100))
  # Above the cost with every learned bit at its upper bound (8): refused.
  max_cost = (216 + 1152 + 160) * 8
  assert m.resolve(C.Budget(kind='size', uniform_bits=8)) == max_cost
  with pytest.raises(ValueError, match='Unreachable budget') as e:
    m.resolve(C.Budget(kind='size', uniform_bits=9))
  assert f'maximum reachable {max_cost:,}' in str(e.value)
  assert 'Raise the upper bit bound' in str(e.value)
  with pytest.raises(ValueError, match='Unreachable budget'):
    m.resolve(C.Budget(kind='size', compression=0.9))
  with pytest.raises(ValueError, match='exactly one form'):
    C.Budget(kind='size', absolute=1, compression=2)
  with pytest.raises(ValueError, match='does not match'):
    m.resolve(C.Budget(kind='bitops', compression=2))


def test_penalty_gradient_matches_finite_differences():
  m = C.CostModel(LAYERS, 'bitops')
  target = m.uniform_cost(4)
  i8 = m.int8_cost()
  for form in P.FORMS:
    pen = P.Penalty(form=form, weight=2.0, power=2 if form == 'nncf' else 1)

    def f(q):
      return pen(m.cost(q), target, int8_cost=i8)

    g = jax.grad(f)(QUANT)
    eps = 0.05  # float32 costs ~1e6: a larger step, exact on bilinear parts
    for path, name, idx in [
      ('mid', 'kernel_bits', 3),
      ('mid', 'input_bits', None),
      ('fc', 'input_bits', None),
    ]:

      def bump(d):
        q = jax.tree_util.tree_map(lambda x: x, QUANT)
        v = q[path][name]
        q[path][name] = v.at[idx].add(d) if idx is not None else v + d
        return float(f(q))

      fd = (bump(eps) - bump(-eps)) / (2 * eps)
      an = g[path][name][idx] if idx is not None else g[path][name]
      np.testing.assert_allclose(
        float(an), fd, rtol=5e-3, err_msg=f'{form} {path}/{name}'
      )


def test_penalty_values_by_hand():
  assert float(
    P.Penalty(form='abs', weight=1.0)(110.0, 100.0)
  ) == pytest.approx(0.1)
  assert float(
    P.Penalty(form='abs', weight=1.0, unit=8e6)(16e6, 8e6)
  ) == pytest.approx(1.0)
  assert float(P.Penalty(form='hinge')(90.0, 100.0)) == 0.0
  assert float(P.Penalty(form='l2', weight=3.0)(120.0, 100.0)) == pytest.approx(
    0.12
  )
  # NNCF: 40 * |800/400 - 800/500| = 40 * 0.4
  assert float(
    P.Penalty(form='nncf', weight=40.0)(400.0, 500.0, int8_cost=800.0)
  ) == pytest.approx(16.0)
  # Warm-up halves the weight at half the ramp; the schedule moves the
  # target from the start cost.
  pen = P.Penalty(form='abs', weight=1.0, warmup_steps=10, schedule_steps=10)
  v = pen(150.0, 100.0, step=5, start_cost=200.0)  # target 150 -> 0
  assert float(v) == pytest.approx(0.0)
  v = pen(100.0, 100.0, step=5, start_cost=200.0)  # |100-150|/150 * 0.5
  assert float(v) == pytest.approx(0.5 * 50 / 150)
  with pytest.raises(ValueError, match='form'):
    P.Penalty(form='l3')


def _layers_known_sizes():
  sizes = [1000, 2000, 3000, 4000, 500, 700]
  return [
    C.LayerCost(
      f'l{i}', numel=n, macs=n * 10, out_channels=4, weight=LEARN, act=FIX8
    )
    for i, n in enumerate(sizes)
  ]


def test_hard_assignment_never_exceeds_target():
  layers = _layers_known_sizes()
  m = C.CostModel(layers, 'size')
  rng = np.random.RandomState(0)
  for trial in range(5):
    quant = {
      layer.path: {'kernel_bits': jnp.array(rng.uniform(2.2, 7.8))}
      for layer in layers
    }
    target = m.resolve(C.Budget(kind='size', uniform_bits=4.0 + 0.3 * trial))
    res = P.hard_assign(quant, m, target)
    bits = [float(res.quant[layer.path]['kernel_bits']) for layer in layers]
    assert all(b == int(b) and 2 <= b <= 8 for b in bits)
    cost = sum(layer.numel * b for layer, b in zip(layers, bits))
    assert cost == res.cost
    assert cost <= target
    if res.within_tolerance:
      assert cost >= 0.99 * target
    else:
      assert 'could not land' in res.message
  # Idempotent: assigning again changes nothing.
  again = P.hard_assign(res.quant, m, target)
  assert again.cost == res.cost


def test_hard_assignment_at_a_uniform_budget_needs_a_spread_above_one_bit():
  """At a budget equal to a uniform 3-bit model's size, the one global
  offset lifts a layer to 4 bits only where another drops to 2 to pay for
  it: learned bits less than one bit apart round to 3 everywhere, whatever
  their order (experiments/lm_bits.py reports each run's spread)."""
  layers = _layers_known_sizes()
  m = C.CostModel(layers, 'size')
  target = m.resolve(C.Budget(kind='size', uniform_bits=3.0))
  assert target == 3 * sum(layer.numel for layer in layers)
  rng = np.random.RandomState(0)
  for _ in range(20):
    learned = rng.uniform(2.5, 3.4) + rng.uniform(0.0, 0.99, len(layers))
    quant = {
      layer.path: {'kernel_bits': jnp.array(b)}
      for layer, b in zip(layers, learned)
    }
    res = P.hard_assign(quant, m, target)
    assert [
      float(res.quant[layer.path]['kernel_bits']) for layer in layers
    ] == [3.0] * len(layers), learned
  # A spread of 1.2 bits: the small l4 learned 3.9, the large l3 2.7. The
  # largest offset within the budget (-0.2, up to float32 rounding of the
  # learned bits) lifts l4 to 4 bits and drops l3 to 2.
  learned = {layer.path: 3.0 for layer in layers}
  learned.update(l4=3.9, l3=2.7)
  quant = {p: {'kernel_bits': jnp.array(b)} for p, b in learned.items()}
  res = P.hard_assign(quant, m, target)
  bits = {p: float(q['kernel_bits']) for p, q in res.quant.items()}
  assert bits == {
    'l0': 3.0,
    'l1': 3.0,
    'l2': 3.0,
    'l3': 2.0,
    'l4': 4.0,
    'l5': 3.0,
  }
  assert res.delta == pytest.approx(-0.2, abs=1e-6)
  assert res.cost == target + 500 - 4000


def _reference_round(b, delta, lo, hi, signed):
  """Hard-assignment rounding written out in numpy, one tensor."""
  v = np.clip(b, lo, hi) + delta
  if signed and v < 2:
    k = 0.0 if v < 1 else 2.0
  else:
    k = float(np.round(v))
  lo_int, hi_int = np.ceil(lo), np.floor(hi)
  if signed and 0 < lo_int < 2:
    lo_int = 2.0
  return float(np.clip(k, lo_int, hi_int))


def test_hard_assignment_is_the_closest_offset_from_below():
  rng = np.random.RandomState(1)
  for trial in range(8):
    n = rng.randint(2, 7)
    sizes = rng.randint(50, 5000, size=n)
    signed = rng.rand(n) < 0.5
    lows = rng.choice([0.0, 2.0], size=n)
    layers = [
      C.LayerCost(
        f'l{i}',
        numel=int(sizes[i]),
        macs=1,
        out_channels=1,
        weight=C.TensorBits(
          fixed=None,
          bounds=(lows[i], 8.0),
          min_nonzero_bits=2 if signed[i] else 1,
        ),
        act=FIX8,
      )
      for i in range(n)
    ]
    m = C.CostModel(layers, 'size')
    bits = rng.uniform(0.1, 7.9, size=n)
    quant = {f'l{i}': {'kernel_bits': jnp.float32(bits[i])} for i in range(n)}
    target = rng.uniform(m.bound_cost('min'), m.bound_cost('max'))
    res = P.hard_assign(quant, m, target)

    def ref_cost(delta):
      return sum(
        layer.numel
        * _reference_round(
          float(np.float32(b)),
          delta,
          layer.weight.bounds[0],
          8.0,
          layer.weight.min_nonzero_bits == 2,
        )
        for layer, b in zip(layers, bits)
      )

    # The cost only changes where some b + delta crosses a rounding
    # threshold: try both sides of every one of them.
    cuts = np.concatenate(
      [np.arange(0.5, 9, 1.0) - b for b in bits] + [1.0 - bits]
    )
    deltas = np.concatenate([cuts - 1e-6, cuts + 1e-6, [-9.0, 0.0, 9.0]])
    best = max(c for c in map(ref_cost, deltas) if c <= target)
    assert res.cost <= target
    assert res.cost == best, (trial, res.cost, best, target)
    got = [float(res.quant[f'l{i}']['kernel_bits']) for i in range(n)]
    assert sum(layer.numel * g for layer, g in zip(layers, got)) == res.cost
    assert all(g != 1.0 for g, s in zip(got, signed) if s)


def test_hard_assignment_refuses_an_impossible_target():
  # A fractional lower bound rounds up: 2.5 bits cost less than 3.
  lw = C.TensorBits(fixed=None, bounds=(2.5, 8.0))
  m = C.CostModel(
    [C.LayerCost('l', numel=100, macs=1, out_channels=1, weight=lw, act=FIX8)],
    'size',
  )
  target = m.resolve(C.Budget(kind='size', absolute=260))
  with pytest.raises(ValueError, match='cannot meet the target'):
    P.hard_assign({'l': {'kernel_bits': jnp.float32(2.6)}}, m, target)


def test_hard_assignment_exact_case():
  # Two equal layers at 3.6 and 4.4 bits: a uniform-4 target is met exactly
  # by plain rounding (delta 0).
  layers = [
    C.LayerCost(
      f'l{i}', numel=100, macs=100, out_channels=1, weight=LEARN, act=FIX8
    )
    for i in range(2)
  ]
  m = C.CostModel(layers, 'size')
  q = {
    'l0': {'kernel_bits': jnp.array(3.6)},
    'l1': {'kernel_bits': jnp.array(4.4)},
  }
  res = P.hard_assign(q, m, 800.0)
  assert res.delta == 0.0 and res.cost == 800.0 and res.within_tolerance
  # A lower target needs a negative offset: 600 = 3 + 3 bits.
  res = P.hard_assign(q, m, 600.0)
  assert res.cost == 600.0 and res.delta < 0


@pytest.mark.parametrize('kind', ['size', 'bitops'])
def test_uniform_equivalent_bits_inverts_uniform_cost(kind):
  m = C.CostModel(LAYERS, kind)
  for k in (0.5, 2.0, 3.3, 4.0, 5.75, 8.0, 11.0):
    assert m.uniform_equivalent_bits(m.uniform_cost(k)) == pytest.approx(
      k, rel=1e-12
    )
  # By hand: size is linear in k, BitOPs quadratic ('mid' learns both).
  if kind == 'size':
    assert m.uniform_equivalent_bits(216 * 8 + 1152 * 3 + 160 * 8) == 3.0
  else:
    fixed = 216 * 64 * 64
    target = fixed + 1152 * 16 * 5.0**2 + 160 * 8 * 5.0
    assert m.uniform_equivalent_bits(target) == pytest.approx(5.0, rel=1e-12)
  with pytest.raises(ValueError, match='below the cost of the fixed'):
    m.uniform_equivalent_bits(m.uniform_cost(0.0) - 1.0)
  fixed_only = C.CostModel(LAYERS[:1], kind)
  with pytest.raises(ValueError, match='No learned bit-width'):
    fixed_only.uniform_equivalent_bits(1e6)


def test_hard_assignment_does_not_take_the_cost_just_above():
  # Plain rounding (4 + 4 bits = 800) is 0.1% above a 799 target: within the
  # old +-1% but over the budget. One offset drops the 3.6 layer to 3 bits.
  layers = [
    C.LayerCost(
      f'l{i}', numel=100, macs=100, out_channels=1, weight=LEARN, act=FIX8
    )
    for i in range(2)
  ]
  m = C.CostModel(layers, 'size')
  q = {
    'l0': {'kernel_bits': jnp.array(3.6)},
    'l1': {'kernel_bits': jnp.array(4.4)},
  }
  res = P.hard_assign(q, m, 799.0)
  assert res.cost == 700.0 and res.delta < 0
  assert float(res.quant['l0']['kernel_bits']) == 3.0
  assert float(res.quant['l1']['kernel_bits']) == 4.0
  assert not res.within_tolerance and 'could not land' in res.message
