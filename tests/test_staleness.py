"""Specification of the one staleness measure ``‖B − diag B‖_F / ‖B‖_F``, ``B = QᵀLQ``.

The adaptive refresh's test (``_linalg.is_stale``), ``soap_optax.off_diagonal_ratio`` and
``soap_optax.diagnostics`` all measure it; they must agree with a float64 NumPy oracle that forms
``B`` itself, down to small ratios, in float32 and float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runner import assert_close

import soap_optax
from soap_optax import _linalg

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


@pytest.fixture(autouse=True)
def float64_enabled():
  """float64 arrays stay float64 (the float32 cases pass float32 arrays explicitly)."""
  with jax.enable_x64(True):
    yield


def oracle_ratio(matrix, basis) -> float:
  """``‖B − diag B‖_F / ‖B‖_F`` with ``B = QᵀLQ`` formed in float64 (or better, for tiny ratios:
  from the float64 residual of the exact ``B``)."""
  L, Q = (np.asarray(x, np.float64) for x in (matrix, basis))
  B = Q.T @ L @ Q
  off = B - np.diag(np.diag(B))
  return float(np.linalg.norm(off) / np.linalg.norm(B))


def nearly_diagonalising(n, angle, seed):
  """A spectrum-spread PSD ``L`` and the basis of its eigenvectors turned by ``angle``."""
  rng = np.random.default_rng(seed)
  eigenvectors, _ = np.linalg.qr(rng.standard_normal((n, n)))
  L = eigenvectors @ np.diag(np.geomspace(1.0, 1e-3, n)) @ eigenvectors.T
  generator = rng.standard_normal((n, n))
  turn = np.linalg.qr(np.eye(n) + angle * (generator - generator.T))[0]
  return L, eigenvectors @ turn


def stale(matrix, basis, tolerance, dtype):
  L, Q = jnp.asarray(matrix, dtype), jnp.asarray(basis, dtype)
  product = jnp.matmul(L, Q, precision=jax.lax.Precision.HIGHEST)
  estimates = _linalg.diagonal_estimates(Q, product)
  return bool(_linalg.is_stale(L, Q, product, estimates, tolerance))


def test_the_issue_example_is_measured_exactly_in_float32():
  """``L = [[1, 1e-5], [1e-5, 0.5]]``, ``Q = I``: the earlier shortcut ``‖L‖² − ‖diag B‖²``
  cancelled to 0 here and called the basis fresh for τ = 1e-5."""
  L = jnp.array([[1.0, 1e-5], [1e-5, 0.5]], jnp.float32)
  Q = jnp.eye(2, dtype=jnp.float32)
  expected = oracle_ratio(L, Q)  # 1.2649e-5
  assert_close(soap_optax.off_diagonal_ratio(L, Q), expected, rtol=1e-4)
  assert stale(L, Q, 1e-5, jnp.float32)
  assert not stale(L, Q, 1.3e-5, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [1e-1, 1e-3, 3e-5])
def test_the_ratio_matches_the_oracle_down_to_small_ratios(dtype, angle):
  L, Q = nearly_diagonalising(12, angle, seed=0)
  expected = oracle_ratio(L.astype(dtype), Q.astype(dtype))
  got = soap_optax.off_diagonal_ratio(jnp.asarray(L, dtype), jnp.asarray(Q, dtype))
  assert_close(got, expected, rtol=2e-2 if dtype == np.float32 else 1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("angle", [1e-2, 1e-4])
def test_the_refresh_test_decides_on_either_side_of_the_ratio(dtype, angle):
  L, Q = nearly_diagonalising(12, angle, seed=1)
  ratio = oracle_ratio(L.astype(dtype), Q.astype(dtype))
  assert stale(L, Q, 0.95 * ratio, dtype)
  assert not stale(L, Q, 1.05 * ratio, dtype)


def test_padding_sentinels_do_not_count_towards_the_norm():
  """A ragged block's padding carries −1 on ``L``'s diagonal inside the refresh; with the padding
  count passed, the test measures the real part alone."""
  L, Q = nearly_diagonalising(6, 1e-2, seed=2)
  ratio = oracle_ratio(L, Q)
  padded_L = np.zeros((8, 8))
  padded_L[:6, :6] = L
  padded_Q = np.eye(8)
  padded_Q[:6, :6] = Q
  sentinel = _linalg.sentinel_padding(jnp.asarray(padded_L), jnp.asarray([0.0] * 6 + [1.0] * 2))
  Qj = jnp.asarray(padded_Q)
  product = sentinel @ Qj
  estimates = _linalg.diagonal_estimates(Qj, product)
  assert bool(_linalg.is_stale(sentinel, Qj, product, estimates, 0.95 * ratio, 2.0))
  assert not bool(_linalg.is_stale(sentinel, Qj, product, estimates, 1.05 * ratio, 2.0))


def test_diagnostics_report_the_same_ratio_as_the_refresh_measures():
  L, Q = nearly_diagonalising(5, 1e-3, seed=3)
  L32, Q32 = jnp.asarray(L, jnp.float32)[None], jnp.asarray(Q, jnp.float32)[None]
  stats = soap_optax.KroneckerStatsState(
    jnp.ones([], jnp.int32), {"w:0": L32}, jnp.zeros([], jnp.int32)
  )
  bases = soap_optax.EigenbasisState(
    basis={"w:0": Q32},
    eigenvalues={"w:0": _linalg.diagonal_estimates(Q32, L32 @ Q32)},
    refreshes={"w:0": jnp.ones((1,), jnp.int32)},
    qr_iterations={"w:0": jnp.ones((1,), jnp.int32)},
  )
  report = soap_optax.diagnostics((stats, bases))
  expected = oracle_ratio(L.astype(np.float32), Q.astype(np.float32))
  assert_close(report.factors["w:0"].staleness, [expected], rtol=2e-2)
  assert_close(report.factors["w:0"].staleness, soap_optax.off_diagonal_ratio(L32, Q32), rtol=0)
