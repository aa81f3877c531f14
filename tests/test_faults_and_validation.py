"""Specification of argument validation and of the behaviour on degenerate or faulty gradients."""

from __future__ import annotations

import aliases
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIAS_PARAMS
from runner import assert_equal, assert_trees_equal
from test_blocks import CHAIN_SHAPES, chain_blocks  # its compiled chain, shared

from soap_optax import KroneckerUpdate, LayoutRule, _linalg, eigenbasis_refresh

SHAPES = {"w": (6, 3), "b": (3,)}  # the shapes of the shared reference step (see aliases.py)


def params_and_grads(steps, seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)

  def tree():
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}

  return tree(), [tree() for _ in range(steps)]


def assert_zero(tree):
  leaves = jax.tree.leaves(tree)
  assert leaves, "nothing to check"
  for x in leaves:
    assert_equal(x, np.zeros(x.shape))  # a NaN is not zero


def orthonormality_error(q):
  q = np.asarray(q, np.float64)
  return np.max(np.abs(q.T @ q - np.eye(q.shape[0])))


# -- argument validation ---------------------------------------------------------------------

# Every argument an alias validates, with values outside its domain; each alias is checked on the
# arguments its signature has.
INVALID = [
  ("learning_rate", -1e-3),
  ("b1", -0.1),
  ("b1", 1.0),
  ("b2", -0.1),
  ("b2", 1.0),
  ("shampoo_beta", -0.1),
  ("shampoo_beta", 1.0),
  ("eps", -1e-8),
  ("eps2", -1e-30),
  ("weight_decay", -0.01),
  ("precondition_frequency", 0),
  ("precondition_frequency", 2.5),
  ("max_precond_dim", -1),
  ("exponent", 0.0),
  ("exponent", -0.25),
  ("grafting", "adagrad"),
  ("graft_eps", -1e-8),
  ("method", "svd"),
  ("first_basis", "svd"),
  ("refresh_tolerance", -0.01),
  ("refresh_tolerance", 1.5),
  ("max_qr_iterations", 0),
  ("block_size", 0),
  ("stacked_axes", -1),
  ("precision", "float8"),
  ("stats_dtype", "int32"),
  ("basis_dtype", "int8"),
  ("moment_dtype", "not_a_dtype"),
  ("mu_dtype", "int32"),
  ("factor_axes", "diagonal"),
  ("orthonormalization", "gram_schmidt"),
]
INVALID_PARAMS = [
  pytest.param(name, argument, value, id=f"{name}-{argument}={value}")
  for name in aliases.ALIASES
  for argument, value in INVALID
  if argument in aliases.parameters(name)
]


def test_the_invalid_argument_table_covers_every_alias_argument_that_has_a_domain():
  """Every argument but the free ones (flags, masks) is in the table."""
  free = {
    "merge_dims",
    "precondition_1d",
    "normalize_grads",
    "correct_bias",
    "trace_scaling",
    "relative_eps",
    "stagger_refresh",
    "group_equal_layouts",
    "weight_decay_mask",
  }
  arguments = {a for name in aliases.ALIASES for a in aliases.parameters(name)}
  assert arguments - free == {argument for argument, _ in INVALID}


@pytest.mark.parametrize("name, argument, value", INVALID_PARAMS)
def test_an_invalid_argument_raises_a_value_error_naming_it_at_construction(name, argument, value):
  with pytest.raises(ValueError, match=argument):
    aliases.make(name, **{argument: value})


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_boundary_values_are_accepted(name):
  boundary = dict(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0, precondition_frequency=1)
  boundary.update(max_precond_dim=0, weight_decay=0.0)
  aliases.make(name, **boundary)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_traced_hyperparameters_are_accepted(name):
  """As optax.inject_hyperparams and a jitted sweep pass them: tracers, checked by nobody."""
  hyper = aliases.SMALL_NUMERIC
  params, grads = params_and_grads(1)

  def first_two_updates(hyper):
    tx = aliases.make(name, **hyper)
    state = tx.init(params)
    _, state = tx.update(grads[0], state, params)
    return tx.update(grads[0], state, params)[0]

  jax.eval_shape(first_two_updates, {k: jnp.float32(v) for k, v in hyper.items()})


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_inject_hyperparams_does_not_reject_its_traced_hyperparameters(name):
  static = [a for a in aliases.parameters(name) if a not in aliases.SMALL_NUMERIC]
  factory = optax.inject_hyperparams(aliases.ALIASES[name], static_args=static)
  tx = factory(**aliases.SMALL)
  params, grads = params_and_grads(1)
  state = jax.eval_shape(tx.init, params)
  jax.eval_shape(tx.update, grads[0], state, params)


# -- zero gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_all_zero_gradients_give_zero_updates_across_refreshes(name):
  """Zero gradients from the first call on: zero statistics, still no NaN, and no step.

  (The parameters are zero too, so that weight decay has nothing to decay.)
  """
  tx, step = aliases.reference(name)
  params, _ = params_and_grads(0)
  params = jax.tree.map(jnp.zeros_like, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(8):  # refreshes at counts 3 and 6
    params, state, updates = step(params, state, zeros)
    assert_zero(updates)
    chex.assert_tree_all_finite(state)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_zero_gradient_after_training_gives_a_finite_update(name):
  tx, step = aliases.reference(name)
  params, grads = params_and_grads(6)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for g in [*grads[:2], zeros, zeros, *grads[2:], zeros]:  # zeros at counts 2, 3 (refresh), 8
    params, state, updates = step(params, state, g)
    chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(state)


# -- non-finite gradients --------------------------------------------------------------------

BAD = [pytest.param(jnp.nan, id="nan"), pytest.param(jnp.inf, id="inf")]
BAD_LEAF = [
  pytest.param(value, leaf, id=f"{label}-in-{leaf}")
  for value, label in ((jnp.nan, "nan"), (-jnp.inf, "-inf"))
  for leaf in SHAPES
]


def poisoned(grads, value, leaf="w"):
  """``grads`` with one entry of one leaf set to ``value``."""
  return {**grads, leaf: grads[leaf].at[(0,) * grads[leaf].ndim].set(value)}


@pytest.mark.parametrize("value, leaf", BAD_LEAF)
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_step_with_a_non_finite_gradient_is_skipped(name, value, leaf):
  """Zero update for every parameter; statistics, bases, moments and counts all kept."""
  tx, step = aliases.reference(name)
  params, grads = params_and_grads(4)
  state = tx.init(params)
  for g in grads[:3]:
    params, state, _ = step(params, state, g)
  new_params, new_state, updates = step(params, state, poisoned(grads[3], value, leaf))
  assert_zero(updates)
  assert_trees_equal(new_params, params)
  assert_trees_equal(aliases.inner_state(new_state), aliases.inner_state(state))
  chex.assert_tree_all_finite(new_state)


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("bad_call", [0, 3, 5], ids=["first-call", "refresh-call", "plain-call"])
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_training_continues_as_if_the_non_finite_step_never_happened(name, bad_call, value):
  tx, step = aliases.reference(name)
  params, grads = params_and_grads(8)
  with_bad = [*grads[:bad_call], poisoned(grads[bad_call], value), *grads[bad_call:]]
  runs = []
  for sequence in (grads, with_bad):
    p, state = params, tx.init(params)
    for g in sequence:
      p, state, _ = step(p, state, g)
    runs.append((p, aliases.inner_state(state)))
  # Exactly equal: the skipped call changes nothing that the later calls read.
  assert_trees_equal(runs[1], runs[0])


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_skipped_steps_are_counted(name):
  tx, step = aliases.reference(name)
  params, grads = params_and_grads(4)
  state = tx.init(params)
  for g in [grads[0], poisoned(grads[1], jnp.nan), grads[2], poisoned(grads[3], jnp.inf)]:
    params, state, _ = step(params, state, g)
  assert isinstance(state, optax.ApplyIfFiniteState)
  assert int(state.total_notfinite) == 2


# -- the blocks guard themselves ---------------------------------------------------------------

RULE = LayoutRule()


def factor_blocks(keyed, name="w"):
  """The single blocks of parameter ``name``'s two factors in a keyed state field."""
  assert {f"{name}:0", f"{name}:1"} <= set(keyed), set(keyed)
  return [keyed[f"{name}:{axis}"][0] for axis in (0, 1)]


def run_blocks(grads):
  """kronecker_stats -> eigenbasis_refresh (every 10 updates) -> rotated_adam, with no
  apply_if_finite around: test_blocks' chain, whose compiled step is shared. Returns the states
  before the last call, and the last call's ``(records, updates, states)``."""
  init, step = chain_blocks()
  states = init(grads[0])
  for g in grads[:-1]:
    _, _, states = step(g, states)
  return states, step(grads[-1], states)


def test_the_bare_blocks_skip_a_non_finite_step():
  """Zero update; the state is kept but for kronecker_stats' count of skipped steps."""
  _, grads = params_and_grads(11, shapes=CHAIN_SHAPES)
  grads[-1] = poisoned(grads[-1], jnp.nan, "vector")  # count 10: a refresh
  state, (_, updates, new_state) = run_blocks(grads)
  assert_zero(updates)
  skipped = optax.tree.get(new_state, "skipped")
  assert int(skipped) == int(optax.tree.get(state, "skipped")) + 1 == 1
  assert_trees_equal(new_state, optax.tree.set(state, skipped=skipped))


# float32 bases: max |QᵀQ − I| measured at most 3.9e-7.
ORTHONORMAL = 3e-6


def test_a_refresh_from_overflowing_statistics_keeps_the_previous_basis():
  """A huge but finite gradient at count 10 overflows the float32 statistics to Inf."""
  _, grads = params_and_grads(11, shapes=CHAIN_SHAPES)
  grads[-1] = {**grads[-1], "matrix": grads[-1]["matrix"] * 1e30}
  state, (carriers, _, new_state) = run_blocks(grads)
  stats, old_bases, new_bases = new_state[0].stats, state[1], new_state[1]
  assert not np.all(np.isfinite(stats["matrix:0"]))  # the setting this test is about
  assert int(new_state[0].count) == 11  # the step itself was finite
  old_q, new_q = factor_blocks(old_bases.basis, "matrix"), factor_blocks(new_bases.basis, "matrix")
  refreshes = [factor_blocks(b.refreshes, "matrix") for b in (old_bases, new_bases)]
  for axis in range(2):
    assert_trees_equal(new_q[axis], old_q[axis])
    assert refreshes[1][axis] == refreshes[0][axis]
    assert not bool(carriers["matrix"].refreshed[axis][0])
    assert orthonormality_error(new_q[axis]) < ORTHONORMAL


def test_the_first_basis_is_orthonormal_even_when_the_statistics_overflow():
  _, grads = params_and_grads(1, shapes=CHAIN_SHAPES)
  grads[0] = {**grads[0], "matrix": grads[0]["matrix"] * 1e30}
  _, (_, _, state) = run_blocks(grads)
  assert not np.all(np.isfinite(state[0].stats["matrix:0"]))  # the setting this test is about
  for q in factor_blocks(state[1].basis, "matrix"):
    assert orthonormality_error(q) < ORTHONORMAL  # fails on NaN too


def _hand_built_record(grad, count, stats):
  """The record ``eigenbasis_refresh`` receives from ``kronecker_stats``, built by hand."""
  return {
    "w": KroneckerUpdate(
      grad=grad[None],
      count=jnp.asarray(count, jnp.int32),
      finite=jnp.asarray(True),
      stats=stats,
      layout=RULE.layout(grad.shape),
      dtype=jnp.float32,
      name="w",
    )
  }


def _statistics_of(grad):
  return ((grad @ grad.T + jnp.eye(3))[None], (grad.T @ grad + jnp.eye(2))[None])


def test_a_refresh_of_a_non_finite_statistic_keeps_that_factor_s_basis():
  """Built by hand: the record reaching eigenbasis_refresh at a scheduled count holds an Inf."""
  block = eigenbasis_refresh(10, layout=RULE)
  grad = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2)), jnp.float32)
  stats = _statistics_of(grad)
  update = jax.jit(block.update)
  _, state = update(_hand_built_record(grad, 0, stats), block.init({"w": grad}))
  bad_stats = (stats[0].at[0, 0, 1].set(jnp.inf), stats[1] * 2)
  carriers, new_state = update(_hand_built_record(grad, 10, bad_stats), state)
  # The factor with the Inf keeps its basis; the other one is refreshed.
  assert_trees_equal(new_state.basis["w:0"], state.basis["w:0"])
  assert [int(r) for r in factor_blocks(new_state.refreshes)] == [1, 2]
  assert [bool(r[0]) for r in carriers["w"].refreshed] == [False, True]
  for q in factor_blocks(new_state.basis):
    assert orthonormality_error(q) < ORTHONORMAL


def test_a_failed_eigh_keeps_the_identity_until_a_refresh_succeeds(monkeypatch):
  """JAX's ``eigh`` reports a failure as NaN (eigenvalues and eigenvectors). The first bases
  stay the identity, no refresh is counted, and the next scheduled refresh starts from them."""
  real_eigh = jnp.linalg.eigh

  def failing_eigh(matrix, **kwargs):
    w, v = real_eigh(matrix, **kwargs)
    return jnp.full_like(w, jnp.nan), jnp.full_like(v, jnp.nan)

  block = eigenbasis_refresh(10, layout=RULE)
  grad = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)), jnp.float32)
  stats = _statistics_of(grad)
  monkeypatch.setattr(jnp.linalg, "eigh", failing_eigh)
  carriers, state = jax.jit(block.update)(
    _hand_built_record(grad, 0, stats), block.init({"w": grad})
  )
  monkeypatch.undo()
  bases = factor_blocks(state.basis)
  assert len(bases) == 2
  for q in bases:
    assert_equal(q, np.eye(q.shape[0]))
  assert [int(r) for r in factor_blocks(state.refreshes)] == [0, 0]
  assert [bool(r[0]) for r in carriers["w"].refreshed] == [False, False]
  _, state = jax.jit(block.update)(_hand_built_record(grad, 10, stats), state)
  assert [int(r) for r in factor_blocks(state.refreshes)] == [1, 1]
  for q in factor_blocks(state.basis):
    assert orthonormality_error(q) < ORTHONORMAL


@pytest.mark.parametrize("fault", [np.nan, np.inf, -np.inf])
def test_finite_finds_a_single_nan_or_inf(fault):
  x = jnp.ones((3, 40), jnp.float32).at[1, 7].set(fault)
  assert not bool(_linalg.finite(x))
  assert _linalg.finite(x, axis=-1).tolist() == [True, False, True]


def test_finite_finds_infinities_of_both_signs_together():
  assert not bool(_linalg.finite(jnp.array([np.inf, 1.0, -np.inf], jnp.float32)))


def test_finite_sums_half_precision_in_float32():
  """100 000 ones sum to more than float16 holds (65 504): no fault."""
  assert bool(_linalg.finite(jnp.ones(100_000, jnp.float16)))


def test_an_array_whose_sum_overflows_float32_counts_as_a_fault():
  """Documented: such an array's squares (statistics, second moments) overflow long before."""
  assert not bool(_linalg.finite(jnp.full(4, 3e38, jnp.float32)))
