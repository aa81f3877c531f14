"""Specification of argument validation and of the behaviour on degenerate or faulty gradients."""

from __future__ import annotations

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIAS_PARAMS

from soap_optax import (
  KroneckerUpdate,
  LayoutRule,
  eigenbasis_refresh,
  kronecker_stats,
  rotated_adam,
)

SHAPES = {"w": (6, 3), "b": (3,)}  # the shapes of the shared reference step (see aliases.py)


def params_and_grads(steps, seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)

  def tree():
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}

  return tree(), [tree() for _ in range(steps)]


def assert_all_finite(tree):
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      assert np.all(np.isfinite(np.asarray(x, np.float64)))


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, e)


def assert_zero(tree):
  for x in jax.tree.leaves(tree):
    np.testing.assert_array_equal(x, np.zeros(x.shape))


def orthonormality_error(q):
  q = np.asarray(q, np.float64)
  return np.max(np.abs(q.T @ q - np.eye(q.shape[0])))


# -- argument validation ---------------------------------------------------------------------

INVALID = [
  ("learning_rate", -1e-3),
  ("b1", -0.1),
  ("b1", 1.0),
  ("b2", -0.1),
  ("b2", 1.0),
  ("eps", -1e-8),
  ("precondition_frequency", 0),
  ("max_precond_dim", -1),
]


@pytest.mark.parametrize("argument, value", INVALID, ids=[f"{a}={v}" for a, v in INVALID])
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_invalid_argument_raises_a_value_error_naming_it_at_construction(name, argument, value):
  aliases.require(name, argument)
  with pytest.raises(ValueError, match=argument):
    aliases.make(name, **{argument: value})


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_boundary_values_are_accepted(name):
  boundary = dict(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0, precondition_frequency=1)
  boundary.update(max_precond_dim=0, weight_decay=0.0)
  aliases.make(name, **boundary)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_learning_rate_schedule_is_accepted(name):
  tx = aliases.make(name, learning_rate=optax.linear_schedule(1e-2, 0.0, 100))
  params, grads = params_and_grads(1)
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(tx.update, grads[0], state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_traced_hyperparameters_are_accepted(name):
  """As optax.inject_hyperparams and a jitted sweep pass them: tracers, checked by nobody."""
  hyper = aliases.numeric_hyperparams(name)
  params, grads = params_and_grads(1)

  def first_two_updates(hyper):
    tx = aliases.make(name, **hyper)
    state = tx.init(params)
    _, state = tx.update(grads[0], state, params)
    return tx.update(grads[0], state, params)[0]

  jax.eval_shape(first_two_updates, {k: jnp.float32(v) for k, v in hyper.items()})


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_inject_hyperparams_does_not_reject_its_traced_hyperparameters(name):
  hyper = aliases.numeric_hyperparams(name)
  static = [a for a in aliases.parameters(name) if a not in hyper]
  factory = optax.inject_hyperparams(aliases.ALIASES[name], static_args=static)
  tx = factory(**aliases.kwargs_for(name))
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
    assert_all_finite(state)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_zero_gradient_after_training_gives_a_finite_update(name):
  tx, step = aliases.reference(name)
  params, grads = params_and_grads(6)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for g in [*grads[:2], zeros, zeros, *grads[2:], zeros]:  # zeros at counts 2, 3 (refresh), 8
    params, state, updates = step(params, state, g)
    assert_all_finite(updates)
    assert_all_finite(state)


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
  assert_all_finite(new_state)


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
  for a, b in zip(jax.tree.leaves(runs[1]), jax.tree.leaves(runs[0]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)


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
BLOCK_SHAPES = {"w": (3, 2), "b": (2,)}


@pytest.fixture(scope="module")
def bare_blocks():
  """kronecker_stats -> eigenbasis_refresh -> rotated_adam, with no apply_if_finite around."""
  tx = optax.chain(kronecker_stats(layout=RULE), eigenbasis_refresh(2, layout=RULE), rotated_adam())
  return tx, jax.jit(tx.update)


def test_the_bare_blocks_skip_a_non_finite_step(bare_blocks):
  tx, update = bare_blocks
  params, grads = params_and_grads(3, shapes=BLOCK_SHAPES)
  state = tx.init(params)
  for g in grads[:2]:
    _, state = update(g, state, params)
  updates, new_state = update(poisoned(grads[2], jnp.nan, "b"), state, params)  # count 2: refresh
  assert_zero(updates)
  assert_trees_equal(new_state, state)


@pytest.fixture(scope="module")
def stats_and_bases():
  tx = optax.chain(kronecker_stats(layout=RULE), eigenbasis_refresh(10, layout=RULE))
  return tx, jax.jit(tx.update)


def test_a_refresh_from_overflowing_statistics_keeps_the_previous_basis(stats_and_bases):
  """A huge but finite gradient at count 10 overflows the float32 statistics to Inf."""
  tx, update = stats_and_bases
  params, grads = params_and_grads(11, shapes={"w": (3, 2)})
  state = tx.init(params)
  for g in grads[:10]:
    _, state = update(g, state, params)
  huge = {"w": grads[10]["w"] * 1e30}
  carriers, new_state = update(huge, state, params)
  stats, old_bases, new_bases = new_state[0].stats["w"], state[1], new_state[1]
  assert not np.all(np.isfinite(stats[0]))  # the setting this test is about
  assert int(new_state[0].count) == 11  # the step itself was finite
  for axis in range(2):
    np.testing.assert_array_equal(new_bases.basis["w"][axis], old_bases.basis["w"][axis])
    assert int(new_bases.refreshes["w"][axis]) == int(old_bases.refreshes["w"][axis])
    assert not bool(carriers["w"].refreshed[axis])
    assert orthonormality_error(new_bases.basis["w"][axis]) < 1e-5


def test_the_first_basis_is_orthonormal_even_when_the_statistics_overflow(stats_and_bases):
  tx, update = stats_and_bases
  params, grads = params_and_grads(1, shapes={"w": (3, 2)})
  _, state = update({"w": grads[0]["w"] * 1e30}, tx.init(params), params)
  for q in state[1].basis["w"]:
    assert np.all(np.isfinite(q))
    assert orthonormality_error(q) < 1e-5


def test_a_refresh_of_a_non_finite_statistic_keeps_that_factor_s_basis():
  """Built by hand: the record reaching eigenbasis_refresh at a scheduled count holds an Inf."""
  block = eigenbasis_refresh(10, layout=RULE)
  rng = np.random.default_rng(0)
  grad = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
  stats = (grad @ grad.T + jnp.eye(3), grad.T @ grad + jnp.eye(2))

  def record(count, stats):
    return {
      "w": KroneckerUpdate(
        grad=grad,
        count=jnp.asarray(count, jnp.int32),
        finite=jnp.asarray(True),
        stats=stats,
        layout=RULE.layout((3, 2)),
        dtype=jnp.float32,
      )
    }

  update = jax.jit(block.update)
  _, state = update(record(0, stats), block.init({"w": grad}))
  bad_stats = (stats[0].at[0, 1].set(jnp.inf), stats[1] * 2)
  carriers, new_state = update(record(10, bad_stats), state)
  # The factor with the Inf keeps its basis; the other one is refreshed.
  np.testing.assert_array_equal(new_state.basis["w"][0], state.basis["w"][0])
  assert int(new_state.refreshes["w"][0]) == 1
  assert not bool(carriers["w"].refreshed[0])
  assert int(new_state.refreshes["w"][1]) == 2
  for q in new_state.basis["w"]:
    assert orthonormality_error(q) < 1e-5
