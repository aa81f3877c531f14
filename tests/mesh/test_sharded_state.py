"""Specification: every alias runs on device meshes, with its state spread over the devices.

Both of JAX's sharding modes (explicit, `jax.make_mesh`'s default, and automatic), 1-D and 2-D
meshes, and parameters sharded FSDP-style, tensor-parallel, mixed or replicated.
"""

from __future__ import annotations

import functools

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformer_layer
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESHES = {
  "explicit-2d": ((4, 2), ("fsdp", "tp"), AxisType.Explicit),
  "auto-2d": ((4, 2), ("fsdp", "tp"), AxisType.Auto),
  "explicit-1d": ((8,), ("data",), AxisType.Explicit),
  "auto-1d": ((8,), ("data",), AxisType.Auto),
}

PARAMS = transformer_layer.PARAMS

# Every alias on the 2-D meshes of both modes; the 1-D meshes with SOAP (each case compiles a
# sharded step, the suite's most expensive thing).
CASES = [
  pytest.param(m, a, id=f"{a}-{m}")
  for m in MESHES
  for a in aliases.ALIASES
  if m.endswith("2d") or a == "soap"
]


@functools.cache
def mesh(kind: str):
  shape, names, axis_type = MESHES[kind]
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))


def tree(kind: str, seed: int, scale: float = 1.0):
  """A parameter-shaped tree of random values, each leaf placed with its sharding."""
  m = mesh(kind)
  rng = np.random.default_rng(seed)
  return {
    name: jax.device_put(
      jnp.asarray(scale * rng.standard_normal(shape), jnp.float32), NamedSharding(m, spec)
    )
    for name, (shape, spec) in PARAMS[len(m.axis_names)].items()
  }


def optimizer(name: str, **overrides):
  """The alias with a refresh every second update and every axis of PARAMS factored."""
  settings = dict(learning_rate=1e-2, precondition_frequency=2, max_precond_dim=256)
  return aliases.make(name, **{**settings, **overrides})


def types(state):
  return jax.tree.map(jax.typeof, state)


def assert_same_shardings(actual, expected):
  """Leaf by leaf, the same devices holding the same pieces (``P(None)`` equals ``P()``)."""
  pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
  checked = 0
  for a, e in pairs:
    assert a.sharding.is_equivalent_to(e.sharding, a.ndim), (a.sharding, e.sharding)
    checked += 1
  assert checked > 0


def factors(state):
  """The keys of the factor statistics in ``state``."""
  stats = optax.tree.get(state, "KroneckerStatsState")
  return list(stats.stats)


def shardings(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def is_auto(kind: str) -> bool:
  return MESHES[kind][2] == AxisType.Auto


@functools.cache
def trained(kind: str, name: str):
  """Init (eager and jitted), then three jitted steps (a refresh at count 2) on ``kind``'s mesh.

  Shared by the tests of one (mesh, alias) pair, so that each pair compiles its step once. On an
  automatic mesh the step is jitted as one is there: its outputs pinned (``out_shardings``) to
  the shardings of the parameters and of the eagerly initialised state. (Without them XLA picks
  the outputs' shardings, for optax's own optimizers too: under ``jax.jit``, ``optax.adam``'s
  init replicates moments that its eager init shards like their parameters.)
  """
  tx = optimizer(name)
  traces = []

  def step(params, state, grads):
    traces.append(1)  # runs once per trace: a second one would be a recompilation
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  with jax.set_mesh(mesh(kind)):
    params = tree(kind, 0)
    init, jitted_init = tx.init(params), jax.jit(tx.init)(params)
    pinned = (shardings(params), shardings(init), shardings(params))
    step = jax.jit(step, out_shardings=pinned if is_auto(kind) else None)
    state, steps = init, []
    for seed in range(1, 4):
      params, state, updates = step(params, state, tree(kind, seed))
      steps.append((params, state, updates))
  return init, jitted_init, steps, len(traces)


@pytest.mark.parametrize("kind, name", CASES)
def test_state_types_and_shardings_stay_those_of_init_through_jitted_updates(kind, name):
  init, _, steps, _ = trained(kind, name)
  assert factors(init), "the test needs factored parameters"
  for _, state, _ in steps:
    assert types(state) == types(init)
    assert_same_shardings(state, init)


@pytest.mark.parametrize("kind, name", CASES)
def test_init_under_jit_gives_the_state_of_eager_init(kind, name):
  """Same types (on an explicit mesh they carry the shardings); on an automatic mesh, where the
  types carry none, the placement of a jitted init is XLA's choice (see `trained`)."""
  init, jitted_init, _, _ = trained(kind, name)
  assert types(jitted_init) == types(init)
  if not is_auto(kind):
    assert_same_shardings(jitted_init, init)


@pytest.mark.parametrize("kind, name", CASES)
def test_updates_keep_the_parameter_shardings_and_nothing_recompiles(kind, name):
  _, _, steps, traces = trained(kind, name)
  # Three steps, crossing a refresh, traced once; and since the parameters and the state leave
  # each step sharded as they entered it (this test and the one above), compiled once.
  assert traces == 1
  params, _, updates = steps[-1]
  expected = tree(kind, 0)
  for key, u in updates.items():
    assert u.sharding.is_equivalent_to(expected[key].sharding, u.ndim), key
    assert params[key].sharding.is_equivalent_to(expected[key].sharding, u.ndim), key
    assert np.all(np.isfinite(np.asarray(u))), key


def _bytes_on(device, tree) -> int:
  return sum(
    shard.data.nbytes
    for leaf in jax.tree.leaves(tree)
    for shard in leaf.addressable_shards
    if shard.device == device
  )


@pytest.mark.parametrize("kind", ["explicit-2d", "auto-2d"])
@pytest.mark.parametrize("name", aliases.ALIASES)
def test_each_device_holds_at_most_1_5_times_its_share_of_the_state(kind, name):
  _, _, steps, _ = trained(kind, name)
  state = steps[-1][1]
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  worst = max(_bytes_on(device, state) for device in jax.devices())
  assert worst <= 1.5 * total / 8, worst / (total / 8)


# -- the sharded run computes what one device computes -------------------------------------------

# Only the short side of each kernel is factored (max_precond_dim 16), and it is four times
# shorter than the other: its statistic is a well-conditioned Wishart matrix from the first
# gradient on (eigenvalues of G Gᵀ / 64 within [0.25, 2.25]), so every eigenbasis is unique up
# to signs, its eigenvalues are apart, and two runs that differ by the order of their float32
# sums (a sharded contraction adds in another order) stay within float32's noise.
WELL_CONDITIONED = {
  "wide": ((16, 64), P("fsdp", "tp")),
  "tall": ((64, 16), P("tp", "fsdp")),
  "vector": ((64,), P("tp")),
}


NUMERICS = [
  pytest.param("explicit-2d", "soap", id="soap-explicit-2d"),
  pytest.param("explicit-2d", "shampoo", id="shampoo-explicit-2d"),
  pytest.param("auto-2d", "eshampoo", id="eshampoo-auto-2d"),
  pytest.param("explicit-2d", "eigen_adafactor", id="eigen_adafactor-explicit-2d"),
]


def _single_against_sharded(kind, name, table, seed, calls=3, **overrides):
  """The same ``calls`` steps of alias ``name`` (a refresh at count 2) on one device and sharded
  as ``table`` says on ``kind``'s mesh; asserts that the state's types stay those of init and
  that the parameters keep their shardings, and returns the (start, single-device, sharded)
  parameters and the sharded run's last state."""
  rng = np.random.default_rng(seed)
  values = [
    {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in table.items()}
    for _ in range(1 + calls)
  ]
  tx = optimizer(name, max_precond_dim=16, **overrides)

  def run(place):
    params = place(values[0])
    state = tx.init(params)
    step = jax.jit(tx.update)
    for grads in values[1:]:
      updates, new_state = step(place(grads), state, params)
      assert types(new_state) == types(state)
      params, state = optax.apply_updates(params, updates), new_state
    assert_same_shardings(params, place(values[0]))
    return jax.tree.map(np.asarray, params), state

  m = mesh(kind)
  single, _ = run(lambda t: jax.device_put(t, jax.devices()[0]))
  with jax.set_mesh(m):
    sharded, state = run(
      lambda t: {k: jax.device_put(v, NamedSharding(m, table[k][1])) for k, v in t.items()}
    )
  return values[0], single, sharded, state


def assert_equal_runs(start, single, sharded):
  assert start
  for key in start:
    change = single[key] - start[key]
    error = np.linalg.norm(sharded[key] - single[key]) / np.linalg.norm(change)
    assert error < 1e-5, (key, error)


@pytest.mark.parametrize("kind, name", NUMERICS)
def test_a_sharded_run_equals_the_single_device_run(kind, name):
  start, single, sharded, _ = _single_against_sharded(kind, name, WELL_CONDITIONED, 3)
  assert_equal_runs(start, single, sharded)


# -- a scanned model's stacked layers (stacked_axes=1) --------------------------------------------

STACKED = {
  "kernel": ((4, 16, 64), P(None, "fsdp", "tp")),  # 4 layers of the well-conditioned "wide"
  "bias": ((4, 64), P(None, "tp")),
}


# Two stacked kernels, so that two factors can refresh at different steps.
STACKED_TWO_FACTORS = {
  **STACKED,
  "tall_kernel": ((4, 64, 16), P(None, "tp", "fsdp")),  # 4 layers of the well-conditioned "tall"
}
STACKED_CASES = [
  pytest.param("explicit-2d", "soap", STACKED, {}, id="soap-explicit-2d"),
  pytest.param("auto-2d", "shampoo", STACKED, {}, id="shampoo-auto-2d"),
  # Blocks of 32 along the long axes, which the shards cut too (the short sides, still factored,
  # keep 32 rows or columns per block: well conditioned), and the two factors' refreshes
  # staggered over the window of 2 updates: blocks and stagger on a mesh, in one case for the
  # cost of one compile. Tolerance 0 makes every scheduled refresh happen, so that the counts
  # show the stagger: after 4 calls (counts 0 to 3) one factor has refreshed at count 2, the
  # other at counts 1 and 3 (without the stagger, both at count 2 only).
  pytest.param(
    "explicit-2d",
    "eshampoo",
    STACKED_TWO_FACTORS,
    dict(block_size=32, stagger_refresh=True, refresh_tolerance=0.0),
    id="eshampoo-blocks-staggered-explicit-2d",
  ),
  # Grouping equal layouts keeps the parameters' shardings in both modes. Under automatic
  # sharding each parameter is a group of its own, placed as the parameter is (the bias's update
  # came back P('fsdp', 'tp') where the parameter is P(None, 'tp') when its moments were spread).
  pytest.param(
    "explicit-2d", "soap", STACKED, dict(group_equal_layouts=True), id="soap-grouped-explicit-2d"
  ),
  pytest.param(
    "auto-2d", "soap", STACKED, dict(group_equal_layouts=True), id="soap-grouped-auto-2d"
  ),
]


@pytest.mark.parametrize("kind, name, table, overrides", STACKED_CASES)
def test_stacked_layers_keep_their_sharding_and_equal_the_single_device_run(
  kind, name, table, overrides
):
  calls = 4 if overrides.get("stagger_refresh") else 3
  *runs, state = _single_against_sharded(kind, name, table, 4, calls, stacked_axes=1, **overrides)
  assert_equal_runs(*runs)
  if overrides.get("block_size"):  # 4 layers of 2 blocks each: 8 statistics per factor
    stats = optax.tree.get(state, "KroneckerStatsState").stats
    assert {key: x.shape[0] for key, x in stats.items()} == dict.fromkeys(stats, 8), stats
  if overrides.get("stagger_refresh"):
    refreshes = optax.tree.get(state, "refreshes")
    counts = {key: int(np.max(np.asarray(n))) for key, n in refreshes.items()}
    assert len(counts) == 2 and len(set(counts.values())) == 2, counts  # the refreshes spread
