"""The adaptive eigenbasis refresh of *Purifying Shampoo*, inside `eigenbasis_refresh`."""

from __future__ import annotations

import functools

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params
from runner import assert_close, assert_equal

import soap_optax

FREQUENCY = 5
CALLS = 21  # the first eigh, then scheduled refreshes at counts 5, 10, 15, 20


def _refresh_chain(**kwargs):
  layout = soap_optax.LayoutRule()
  return optax.chain(
    soap_optax.kronecker_stats(0.9, layout=layout),
    soap_optax.eigenbasis_refresh(FREQUENCY, layout=layout, **kwargs),
  )


@functools.cache
def refresh_step(tolerance, iterations, first_basis):
  """``(tx, jitted update)`` of the refresh chain with this τ, ``max_qr_iterations`` and first
  basis: built once for the module (call it with positional arguments, which key the cache), so
  that tests with the same settings and gradient shape share one compilation."""
  tx = _refresh_chain(
    refresh_tolerance=tolerance, max_qr_iterations=iterations, first_basis=first_basis
  )
  return tx, jax.jit(tx.update)


def _run(grads, tolerance, iterations, first_basis="eigh"):
  """The records of the last call and the refresh's final state."""
  tx, step = refresh_step(tolerance, iterations, first_basis)
  state = tx.init(grads[0])
  for g in grads:
    carriers, state = step(g, state)
  return carriers, state[1]


def per_factor(keyed, name="w"):
  """The entries of parameter ``name``'s two factors in a keyed state field, one block each."""
  assert set(keyed) == {f"{name}:0", f"{name}:1"}, set(keyed)
  out = []
  for axis in (0, 1):
    value = keyed[f"{name}:{axis}"]
    assert value.shape[0] == 1, value.shape
    out.append(value[0])
  return out


def _random_grads(seed, shape, n=CALLS):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for _ in range(n)]


def test_zero_tolerance_refreshes_every_factor_at_every_scheduled_step():
  # (With the first basis from QR, to share qr_first_run's compiled step: it counts as a refresh
  # just as the first eigh does.)
  _, state = _run(_random_grads(0, (6, 8)), 0.0, 1, first_basis="qr")
  assert [int(r) for r in per_factor(state.refreshes)] == [5, 5]  # the first eigh + 4 schedules


def test_tolerance_one_never_refreshes_after_the_first_basis():
  grads = _random_grads(1, (6, 8))
  _, state = _run(grads, 1.0, 3)
  assert [int(r) for r in per_factor(state.refreshes)] == [1, 1]


def test_tolerance_is_checked_per_factor():
  """Left statistics that stay diagonal in their first basis skip; the right ones refresh."""
  rng = np.random.default_rng(2)
  scales = np.diag([4.0, 3.0, 2.0, 1.0])
  grads = []
  for _ in range(CALLS):
    # Rows orthonormal: G Gᵀ = diag(scales²) every step, while Gᵀ G keeps turning.
    rows = np.linalg.qr(rng.standard_normal((6, 4)))[0].T
    grads.append({"w": jnp.asarray(scales @ rows, jnp.float32)})
  _, state = _run(grads, 1e-3, 1)
  left, right = (int(r) for r in per_factor(state.refreshes))
  assert left == 1
  assert right == 5


@pytest.mark.parametrize("max_qr_iterations", [1, 3])
def test_qr_iterations_respect_the_maximum(max_qr_iterations):
  # A tolerance float32 cannot reach forces every refresh to use all its iterations.
  _, state = _run(_random_grads(3, (6, 8)), 1e-9, max_qr_iterations)
  assert [int(i) for i in per_factor(state.qr_iterations)] == [max_qr_iterations] * 2


def test_more_qr_iterations_diagonalise_the_factor_better():
  grads = _random_grads(4, (6, 8))
  ratios = []
  for iterations in (1, 3):  # τ unreachable: every refresh runs all its iterations
    carriers, state = _run(grads, 1e-9, iterations)
    stats = carriers["w"].stats[0][0]
    ratios.append(float(soap_optax.off_diagonal_ratio(stats, per_factor(state.basis)[0])))
  assert ratios[1] < ratios[0], ratios


def test_skipped_factor_keeps_its_basis_and_reports_diag_b_as_eigenvalues():
  rng = np.random.default_rng(5)
  scales = np.diag([4.0, 3.0, 2.0, 1.0])
  grads = [
    {"w": jnp.asarray(scales @ np.linalg.qr(rng.standard_normal((6, 4)))[0].T, jnp.float32)}
    for _ in range(FREQUENCY + 1)
  ]
  tx, step = refresh_step(1e-3, 1, "eigh")
  state = tx.init(grads[0])
  for g in grads[:-1]:
    _, state = step(g, state)
  before = np.asarray(per_factor(state[1].basis)[0], np.float64)
  carriers, state = step(grads[-1], state)
  assert int(per_factor(state[1].qr_iterations)[0]) == 0  # the setting this test is about
  assert_equal(per_factor(state[1].basis)[0], before)
  b = before.T @ np.asarray(carriers["w"].stats[0][0], np.float64) @ before
  # Measured: 1.6e-8 relative (the float32 product against float64).
  assert_close(per_factor(state[1].eigenvalues)[0], np.diag(b), rtol=1e-7)


def _primitive_names(jaxpr, into_branches):
  """Primitive names, descending into nested jaxprs (`jit`, loops) but into the branches of
  `cond` only when ``into_branches``."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    if eqn.primitive.name != "cond" or into_branches:
      for sub in jaxprs_in_params(eqn.params):
        names.extend(_primitive_names(sub, into_branches))
  return names


def test_refresh_work_lives_inside_runtime_branches():
  """QR and eigh only run inside `cond`/`switch` branches: a skipped factor pays nothing."""
  tx = _refresh_chain(refresh_tolerance=0.1, max_qr_iterations=2)
  g = {"w": jnp.ones((6, 8))}
  state = tx.init(g)
  jaxpr = jax.make_jaxpr(tx.update)(g, state).jaxpr
  everywhere = _primitive_names(jaxpr, into_branches=True)
  outside_branches = _primitive_names(jaxpr, into_branches=False)
  assert {"qr", "eigh"} <= set(everywhere)
  assert not {"qr", "eigh"} & set(outside_branches)
  # One runtime branch for both factors' stacks (they share a phase), each factor's skip test a
  # branch inside it.
  assert outside_branches.count("cond") == 1


def test_staggered_refresh_spreads_factors_over_the_window_with_the_same_count():
  grads = {
    "a": jnp.ones((8, 6)),
    "b": jnp.ones((6, 4)),
  }
  layout = soap_optax.LayoutRule()
  tx = optax.chain(
    soap_optax.kronecker_stats(0.9, layout=layout),
    soap_optax.eigenbasis_refresh(4, layout=layout, stagger=True),
  )
  rng = np.random.default_rng(6)
  state = tx.init(grads)
  step = jax.jit(tx.update)
  per_step = []
  for _ in range(9):  # the first eigh, then counts 1..8: two windows of 4
    g = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in grads.items()}
    before = {key: int(r[0]) for key, r in state[1].refreshes.items()}
    _, state = step(g, state)
    assert len(before) == 4  # two factors per parameter, one block each
    per_step.append(sum(int(r[0]) - before[key] for key, r in state[1].refreshes.items()))
  assert per_step[0] == 4  # every factor's first eigh
  # Over each window of 4 steps every one of the 4 factors refreshes exactly once...
  assert sum(per_step[1:5]) == 4 and sum(per_step[5:9]) == 4
  # ...and never all at the same step.
  assert max(per_step[1:]) < 4


# -- first_basis="qr": no eigh anywhere ----------------------------------------------------------


@pytest.mark.parametrize("tolerance", [0.0, 0.1], ids=["fixed-schedule", "adaptive"])
def test_first_basis_qr_puts_no_eigh_in_the_program(tolerance):
  """Not even inside a branch that never runs: the program holds QR and no eigh at all."""
  tx = _refresh_chain(first_basis="qr", refresh_tolerance=tolerance, max_qr_iterations=2)
  g = {"w": jnp.ones((6, 8))}
  names = _primitive_names(jax.make_jaxpr(tx.update)(g, tx.init(g)).jaxpr, into_branches=True)
  assert "qr" in names
  assert "eigh" not in names


@pytest.mark.parametrize("name", aliases.ALIAS_PARAMS)
def test_every_alias_with_first_basis_qr_puts_no_eigh_in_the_program(name):
  method = {"method": "qr"} if name == "shampoo" else {}  # shampoo refreshes by eigh by default
  tx = aliases.make(name, first_basis="qr", **method)
  params = {"w": jnp.ones((6, 3)), "b": jnp.ones((3,))}
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  names = _primitive_names(jaxpr, into_branches=True)
  assert "qr" in names
  assert "eigh" not in names


@pytest.fixture(scope="module")
def qr_first_run():
  """The refresh chain with first_basis="qr": (records, state) after each of CALLS calls."""
  tx, step = refresh_step(0.0, 1, "qr")
  grads = _random_grads(7, (6, 8))
  state, out = tx.init(grads[0]), []
  for g in grads:
    carriers, state = step(g, state)
    out.append((carriers, state))
  return out


def test_first_basis_qr_gives_orthonormal_bases_at_every_call(qr_first_run):
  for _, state in qr_first_run:
    for q in per_factor(state[1].basis):
      q = np.asarray(q, np.float64)
      # Measured: 4.4e-7.
      assert_close(q.T @ q, np.eye(q.shape[0]), atol=3e-6)


def test_first_basis_qr_is_the_qr_refresh_started_from_the_identity(qr_first_run):
  """``Q = qr(L[:, order])``, the columns of ``L`` (= ``L I``) sorted by ``diag L`` descending.

  A (6, 8) gradient gives the 8 x 8 factor rank 6: QR fixes its first 6 columns up to sign, and
  of the last two only their span (the null space).
  """
  carriers, state = qr_first_run[0]
  rank = 6
  for stat, q in zip(carriers["w"].stats, per_factor(state[1].basis), strict=True):
    stat, q = np.asarray(stat[0], np.float64), np.asarray(q, np.float64)
    order = np.argsort(-np.diag(stat), kind="stable")
    want, _ = np.linalg.qr(stat[:, order])
    signs = np.sign(np.sum(q * want, axis=0))  # QR is unique up to column signs
    # Measured: 6.2e-7 (float32 QR against float64).
    assert_close((q * signs)[:, :rank], want[:, :rank], atol=4e-6)
    null, want_null = q[:, rank:], want[:, rank:]
    assert_close(null @ null.T, want_null @ want_null.T, atol=4e-6)
  assert [int(r) for r in per_factor(state[1].refreshes)] == [1, 1]
