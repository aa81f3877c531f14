"""Specification of `soap_optax.diagnostics`: values checked on cases computed by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from runner import assert_close, assert_equal

import soap_optax


def _states(state):
  """The statistics and eigenbasis states inside an alias's state."""
  chain = state.inner_state
  return chain[0], chain[1]


def _with_factor(state, key, stats, basis, eigenvalues, refreshes, iterations):
  """``state`` with one factor's statistics, basis and counters replaced by hand."""
  stats_state, bases = _states(state)
  stats_state = stats_state._replace(stats={**stats_state.stats, key: stats})
  bases = bases._replace(
    basis={**bases.basis, key: basis},
    eigenvalues={**bases.eigenvalues, key: eigenvalues},
    refreshes={**bases.refreshes, key: refreshes},
    qr_iterations={**bases.qr_iterations, key: iterations},
  )
  inner = (stats_state, bases, *state.inner_state[2:])
  return state._replace(inner_state=inner)


def _hand_made_state():
  tx = soap_optax.soap()
  state = tx.init({"w": jnp.zeros((2, 3))})
  return _with_factor(
    state,
    "w:0",
    stats=jnp.array([[[2.0, 1.0], [1.0, 2.0]]]),  # L, one block
    basis=jnp.eye(2)[None],  # Q = I, so B = L
    eigenvalues=jnp.array([[3.0, 0.5]]),
    refreshes=jnp.array([4], jnp.int32),
    iterations=jnp.array([2], jnp.int32),
  )


def test_staleness_is_the_off_diagonal_share_of_the_rotated_statistic():
  report = soap_optax.diagnostics(_hand_made_state())
  # B = L = [[2, 1], [1, 2]]: ‖B − diag B‖_F = √2, ‖B‖_F = √10.
  assert_close(report.factors["w:0"].staleness, [np.sqrt(2 / 10)], rtol=1e-6)


def test_staleness_is_zero_in_the_exact_eigenbasis():
  q = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)  # the eigenvectors of [[2, 1], [1, 2]]
  state = _with_factor(
    _hand_made_state(),
    "w:0",
    stats=jnp.array([[[2.0, 1.0], [1.0, 2.0]]]),
    basis=jnp.asarray(q, jnp.float32)[None],
    eigenvalues=jnp.array([[3.0, 1.0]]),
    refreshes=jnp.array([1], jnp.int32),
    iterations=jnp.array([0], jnp.int32),
  )
  assert_close(soap_optax.diagnostics(state).factors["w:0"].staleness, [0.0], atol=1e-6, rtol=1e-7)


def test_counters_and_spectrum_are_read_from_the_state():
  factor = soap_optax.diagnostics(_hand_made_state()).factors["w:0"]
  assert_equal(factor.refreshes, [4])
  assert_equal(factor.qr_iterations, [2])
  assert_close(factor.eigenvalue_max, [3.0], rtol=1e-7)
  assert_close(factor.eigenvalue_min, [0.5], rtol=1e-7)
  assert_close(factor.eigenvalue_spread, [6.0], rtol=1e-7)


def test_every_factor_of_every_parameter_is_reported():
  tx = soap_optax.soap(max_precond_dim=4)
  params = {"w": jnp.zeros((3, 4)), "wide": jnp.zeros((2, 9)), "b": jnp.zeros(3)}
  report = soap_optax.diagnostics(tx.init(params))
  assert sorted(report.factors) == ["w:0", "w:1", "wide:0"]


def test_skipped_non_finite_steps_are_counted_for_an_alias():
  tx = soap_optax.eshampoo()
  params = {"w": jnp.zeros((2, 3))}
  state = tx.init(params)
  for g in (jnp.ones((2, 3)), jnp.full((2, 3), jnp.nan), jnp.ones((2, 3))):
    _, state = tx.update({"w": g}, state, params)
  assert int(soap_optax.diagnostics(state).skipped_steps) == 1


def test_skipped_non_finite_steps_are_counted_for_a_hand_built_chain():
  rule = soap_optax.LayoutRule()
  tx = optax.chain(
    soap_optax.kronecker_stats(layout=rule),
    soap_optax.eigenbasis_refresh(layout=rule),
    soap_optax.rotated_adam(),
  )
  state = tx.init({"w": jnp.zeros((2, 3))})
  for g in (jnp.ones((2, 3)), jnp.full((2, 3), jnp.inf), jnp.full((2, 3), jnp.nan)):
    _, state = tx.update({"w": g}, state)
  assert int(soap_optax.diagnostics(state).skipped_steps) == 2


def test_diagnostics_under_jit_equal_the_eager_values():
  state = _hand_made_state()
  eager = soap_optax.diagnostics(state)
  jitted = jax.jit(soap_optax.diagnostics)(state)
  chex_leaves = zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True)
  count = 0
  for a, b in chex_leaves:
    assert_close(a, b, rtol=1e-6)
    count += 1
  assert count > 0


def test_a_refreshed_basis_is_fresh_and_staleness_grows_until_the_next_refresh():
  tx = soap_optax.soap(precondition_frequency=5)
  rng = np.random.default_rng(0)
  params = {"w": jnp.zeros((4, 6))}
  state = tx.init(params)
  staleness = []
  for _ in range(6):  # the first eigh, then counts 1..5: the refresh at 5
    g = {"w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)}
    _, state = tx.update(g, state, params)
    staleness.append(float(soap_optax.diagnostics(state).factors["w:0"].staleness[0]))
  assert staleness[0] < 1e-5  # eigh's basis diagonalises the statistics it was computed from
  assert all(s > 1e-3 for s in staleness[1:5])  # new gradients leave the old basis behind
  assert staleness[5] < staleness[4]  # a power step + QR moves the basis back towards them
