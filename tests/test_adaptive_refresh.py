"""The adaptive eigenbasis refresh of *Purifying Shampoo*, inside `eigenbasis_refresh`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params

import soap_optax

FREQUENCY = 5
CALLS = 21  # the first eigh, then scheduled refreshes at counts 5, 10, 15, 20


def _refresh_chain(**kwargs):
  layout = soap_optax.LayoutRule()
  return optax.chain(
    soap_optax.kronecker_stats(0.9, layout=layout),
    soap_optax.eigenbasis_refresh(FREQUENCY, layout=layout, **kwargs),
  )


def _run(tx, grads):
  state = tx.init(grads[0])
  step = jax.jit(tx.update)
  for g in grads:
    _, state = step(g, state)
  return state[1]


def _random_grads(seed, shape, n=CALLS):
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.standard_normal(shape), jnp.float32)} for _ in range(n)]


def test_zero_tolerance_refreshes_every_factor_at_every_scheduled_step():
  state = _run(_refresh_chain(refresh_tolerance=0.0), _random_grads(0, (6, 8)))
  assert [int(r) for r in state.refreshes["w"]] == [5, 5]  # the first eigh + 4 schedules


def test_tolerance_one_never_refreshes_after_the_first_basis():
  grads = _random_grads(1, (6, 8))
  state = _run(_refresh_chain(refresh_tolerance=1.0, max_qr_iterations=3), grads)
  assert [int(r) for r in state.refreshes["w"]] == [1, 1]


def test_tolerance_is_checked_per_factor():
  """Left statistics that stay diagonal in their first basis skip; the right ones refresh."""
  rng = np.random.default_rng(2)
  scales = np.diag([4.0, 3.0, 2.0, 1.0])
  grads = []
  for _ in range(CALLS):
    # Rows orthonormal: G Gᵀ = diag(scales²) every step, while Gᵀ G keeps turning.
    rows = np.linalg.qr(rng.standard_normal((6, 4)))[0].T
    grads.append({"w": jnp.asarray(scales @ rows, jnp.float32)})
  state = _run(_refresh_chain(refresh_tolerance=1e-3, max_qr_iterations=2), grads)
  left, right = (int(r) for r in state.refreshes["w"])
  assert left == 1
  assert right == 5


@pytest.mark.parametrize("max_qr_iterations", [1, 3])
def test_qr_iterations_respect_the_maximum(max_qr_iterations):
  # A tolerance float32 cannot reach forces every refresh to use all its iterations.
  tx = _refresh_chain(refresh_tolerance=1e-9, max_qr_iterations=max_qr_iterations)
  state = _run(tx, _random_grads(3, (6, 8)))
  assert [int(i) for i in state.qr_iterations["w"]] == [max_qr_iterations] * 2


def test_more_qr_iterations_diagonalise_the_factor_better():
  grads = _random_grads(4, (8, 8))
  ratios = []
  for iterations in (1, 8):
    tx = _refresh_chain(refresh_tolerance=1e-9, max_qr_iterations=iterations)
    state = tx.init(grads[0])
    step = jax.jit(tx.update)
    for g in grads:
      carriers, state = step(g, state)
    stats = carriers["w"].stats[0]
    ratios.append(float(soap_optax.off_diagonal_ratio(stats, state[1].basis["w"][0])))
  assert ratios[1] < ratios[0]


def test_skipped_factor_keeps_its_basis_and_reports_diag_b_as_eigenvalues():
  rng = np.random.default_rng(5)
  scales = np.diag([4.0, 3.0, 2.0, 1.0])
  grads = [
    {"w": jnp.asarray(scales @ np.linalg.qr(rng.standard_normal((6, 4)))[0].T, jnp.float32)}
    for _ in range(FREQUENCY + 1)
  ]
  tx = _refresh_chain(refresh_tolerance=1e-3)
  state = tx.init(grads[0])
  step = jax.jit(tx.update)
  for g in grads[:-1]:
    _, state = step(g, state)
  before = state[1].basis["w"][0]
  carriers, state = step(grads[-1], state)
  after = state[1].basis["w"][0]
  np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  b = np.asarray(before).T @ np.asarray(carriers["w"].stats[0]) @ np.asarray(before)
  np.testing.assert_allclose(state[1].eigenvalues["w"][0], np.diag(b), rtol=1e-5)


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
  assert outside_branches.count("cond") >= 2  # one runtime branch per factor


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
    before = jax.tree.map(np.asarray, state[1].refreshes)
    _, state = step(g, state)
    after = jax.tree.map(np.asarray, state[1].refreshes)
    per_step.append(
      sum(
        int(x) - int(y)
        for x, y in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
      )
    )
  assert per_step[0] == 4  # every factor's first eigh
  # Over each window of 4 steps every one of the 4 factors refreshes exactly once...
  assert sum(per_step[1:5]) == 4 and sum(per_step[5:9]) == 4
  # ...and never all at the same step.
  assert max(per_step[1:]) < 4
