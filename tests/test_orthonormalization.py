"""Specification of the refresh's Cholesky-QR orthonormalisation and its Householder fallback.

The oracle is NumPy's float64 QR with its columns' signs set so that ``R``'s diagonal is
positive: the one QR factor of a full-rank matrix. Where ``Y`` is rank-deficient or too badly
conditioned for float32, ``Q`` is not determined by ``Y`` and the tests check what defines a QR
factor instead: orthonormal columns, and ``QᵀY`` upper triangular (so ``Q``'s first k columns
span ``Y``'s first k: the column order the sorted power step relies on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runner import assert_close, assert_equal, assert_updates_close, run_optimizer

import soap_optax
from soap_optax import _linalg
from soap_optax._eigenbasis import RefreshConfig

N = 64
METHODS = ("cholesky_qr2", "shifted_cholesky_qr3")
# ‖QᵀQ − I‖_F of a float32 orthonormalisation of a 64 × 64 matrix: a few units of rounding
# per entry (Householder's own is about 3e-6 here).
ORTHONORMAL = 2e-5


def _cholesky(matrix, method):
  result = jax.jit(_linalg.cholesky_qr2, static_argnames="shift")(
    jnp.asarray(matrix, jnp.float32), shift=method == "shifted_cholesky_qr3"
  )
  return np.asarray(result.basis, np.float64), np.asarray(result.fallback)


def _orthogonal(rng, n=N):
  return np.linalg.qr(rng.standard_normal((n, n)))[0]


def _statistic(rng, eigenvalues):
  u = _orthogonal(rng, len(eigenvalues))
  return (u * eigenvalues) @ u.T


def _power_step(statistic, basis):
  """``L Q`` rounded to float32, as the refresh hands it over."""
  return (statistic @ basis).astype(np.float32)


def _near_eigenbasis(rng, statistic, drift=1e-3):
  """``L``'s eigenbasis (descending) moved a little: the basis a refresh starts from."""
  _, vectors = np.linalg.eigh(statistic)
  return np.linalg.qr(vectors[:, ::-1] + drift * rng.standard_normal(statistic.shape))[0]


def _oracle_q(y):
  q, r = np.linalg.qr(np.asarray(y, np.float64))
  return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _orthonormality_error(q):
  return np.linalg.norm(q.T @ q - np.eye(q.shape[-1]))


def _assert_orthonormal(q):
  assert np.all(np.isfinite(q)), "non-finite basis"
  error = _orthonormality_error(q)
  assert error <= ORTHONORMAL, f"‖QᵀQ − I‖_F = {error}"


def _assert_triangular(q, y, rtol=1e-5):
  """``QᵀY`` upper triangular and ``R``'s diagonal non-negative, to float32 rounding of ``Y``."""
  r = q.T @ np.asarray(y, np.float64)
  scale = np.linalg.norm(y)
  below = np.linalg.norm(np.tril(r, -1))
  assert below <= rtol * scale, f"‖tril(QᵀY)‖ = {below}, ‖Y‖ = {scale}"
  assert np.all(np.diag(r) >= -rtol * scale), np.diag(r).min()


# -- the cases where Cholesky-QR must hold on its own ----------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_well_conditioned_power_step_is_qrs_q_without_fallback(method):
  rng = np.random.default_rng(0)
  statistic = _statistic(rng, np.logspace(0, -2, N))
  y = _power_step(statistic, _near_eigenbasis(rng, statistic))
  q, fallback = _cholesky(y, method)
  assert_equal(fallback, False)
  _assert_orthonormal(q)
  assert_close(q, _oracle_q(y), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_zero_padded_block_with_sentinel_is_qrs_q_without_fallback(method):
  """A ragged block: the real 48 × 48 part, zero padding carrying the −1 sentinel."""
  rng = np.random.default_rng(1)
  real = 48
  padded = np.zeros((N, N))
  padded[:real, :real] = _statistic(rng, np.logspace(0, -2, real))
  flags = np.r_[np.zeros(real), np.ones(N - real)]
  statistic = np.asarray(_linalg.sentinel_padding(jnp.asarray(padded), jnp.asarray(flags)))
  assert_close(np.diag(statistic)[real:], -np.ones(N - real))  # the sentinel is there
  y = _power_step(statistic, _near_eigenbasis(rng, statistic))
  q, fallback = _cholesky(y, method)
  assert_equal(fallback, False)
  _assert_orthonormal(q)
  assert_close(q, _oracle_q(y), atol=1e-5)


def test_shifted_pass_handles_a_condition_plain_cholesky_qr2_cannot():
  """κ(Y) = 3·10⁴: its square is beyond float32, the shifted first pass brings it within."""
  rng = np.random.default_rng(2)
  y = _power_step(_statistic(rng, np.logspace(0, -np.log10(3e4), N)), _orthogonal(rng))
  assert np.linalg.cond(y.astype(np.float64)) > 1e4
  q2, fallback2 = _cholesky(y, "cholesky_qr2")
  q3, fallback3 = _cholesky(y, "shifted_cholesky_qr3")
  assert_equal(fallback2, True)
  assert_equal(fallback3, False)
  _assert_orthonormal(q2)
  _assert_orthonormal(q3)
  # float32 Householder and Cholesky-QR alike resolve Q to about κ·u here.
  assert_close(q3, _oracle_q(y), atol=2e-3)


# -- the cases where it must fall back, and the fallback be a QR factor -----------------------


def _rank_deficient(rng):
  """The Gram matrix of a thin gradient (64 × 16): rank 16, as early in training."""
  g = rng.standard_normal((N, N // 4))
  return g @ g.T


def _padded_rank_deficient(rng):
  """A ragged block whose real part is rank-deficient too: zeros below the sentinels."""
  padded = np.zeros((N, N))
  g = rng.standard_normal((48, 8))
  padded[:48, :48] = g @ g.T
  flags = np.r_[np.zeros(48), np.ones(N - 48)]
  return np.asarray(_linalg.sentinel_padding(jnp.asarray(padded), jnp.asarray(flags)))


FALLBACK_CASES = {
  "rank n/4": _rank_deficient,
  "zero-padded, rank-deficient": _padded_rank_deficient,
  "spread 1e6": lambda rng: _statistic(rng, np.logspace(0, -6, N)),
  "spread 1e12": lambda rng: _statistic(rng, np.logspace(0, -12, N)),
}


@pytest.mark.parametrize("case", FALLBACK_CASES)
@pytest.mark.parametrize("method", METHODS)
def test_ill_conditioned_power_step_falls_back_to_an_orthonormal_qr_factor(method, case):
  rng = np.random.default_rng(3)
  statistic = FALLBACK_CASES[case](rng)
  y = _power_step(statistic, _orthogonal(rng))
  q, fallback = _cholesky(y, method)
  assert_equal(fallback, True)
  _assert_orthonormal(q)
  _assert_triangular(q, y)


@pytest.mark.parametrize("method", METHODS)
def test_rank_deficient_leading_columns_span_the_range(method):
  """Rank r: the first r columns of Q span Y's range, the rest are orthogonal to it."""
  rng = np.random.default_rng(4)
  g = rng.standard_normal((N, N // 4))
  y = _power_step(g @ g.T, np.eye(N))  # the first r columns already span the range
  q, _ = _cholesky(y, method)
  rank = N // 4
  projector = g @ np.linalg.pinv(g)
  assert_close(projector @ q[:, :rank], q[:, :rank], atol=1e-4)
  assert_close(projector @ q[:, rank:], np.zeros((N, N - rank)), atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_zero_matrix_falls_back_to_an_orthonormal_basis(method):
  q, fallback = _cholesky(np.zeros((N, N)), method)
  assert_equal(fallback, True)
  _assert_orthonormal(q)


@pytest.mark.parametrize("method", METHODS)
def test_nan_matrix_is_flagged_and_left_non_finite_for_the_refresh_guard(method):
  """A NaN is not hidden behind a valid-looking basis: the matrix is flagged, its result stays
  non-finite (so the refresh keeps the previous basis, as with QR), and the stack's other
  matrices are unaffected."""
  rng = np.random.default_rng(5)
  statistic = _statistic(rng, np.logspace(0, -2, N))
  good = _power_step(statistic, _near_eigenbasis(rng, statistic))
  broken = good.copy()
  broken[3, 7] = np.nan
  result = jax.jit(_linalg.cholesky_qr2, static_argnames="shift")(
    jnp.asarray(np.stack([good, broken, good])), shift=method == "shifted_cholesky_qr3"
  )
  q, fallback = np.asarray(result.basis, np.float64), np.asarray(result.fallback)
  assert_equal(fallback, np.array([False, True, False]))
  assert not np.all(np.isfinite(q[1]))
  for i in (0, 2):
    assert_close(q[i], _oracle_q(good), atol=1e-5)


# The forms of a stack: the platform's choice, and each of the two it chooses between (the
# looped one on CPU, the batched one elsewhere), so that both are checked on CPU.
STACK_FORMS = {
  "platform": lambda m: tuple(_linalg.cholesky_qr2(m))[:2],
  "looped": lambda m: (lambda q, ok: (q, ~ok))(*_linalg._cholesky_qr_looped(m, False)),
  "batched": lambda m: (lambda q, ok: (q, ~ok))(*_linalg._cholesky_qr_batched(m, False)),
}


@pytest.mark.parametrize("form", STACK_FORMS)
def test_stack_falls_back_matrix_by_matrix(form):
  """Only the failing matrices of a stack are replaced; each result is its own matrix's QR."""
  rng = np.random.default_rng(6)
  statistic = _statistic(rng, np.logspace(0, -2, N))
  good = _power_step(statistic, _near_eigenbasis(rng, statistic))
  bad = _power_step(_rank_deficient(rng), _orthogonal(rng))
  stack = np.stack([bad, good, bad, good])
  q, fallback = jax.jit(STACK_FORMS[form])(jnp.asarray(stack))
  q, fallback = np.asarray(q, np.float64), np.asarray(fallback)
  assert_equal(fallback, np.array([True, False, True, False]))
  for i, y in enumerate(stack):
    _assert_orthonormal(q[i])
    _assert_triangular(q[i], y)
  assert_close(q[1], _oracle_q(good), atol=1e-5)


# -- the option of eigenbasis_refresh ----------------------------------------------------------


def test_unknown_orthonormalization_is_rejected_by_name():
  with pytest.raises(ValueError, match="orthonormalization"):
    soap_optax.eigenbasis_refresh(orthonormalization="svd")
  with pytest.raises(ValueError, match="orthonormalization"):
    RefreshConfig(orthonormalization="cholesky")


def test_default_orthonormalization_is_householder_qr():
  assert RefreshConfig().orthonormalization == "qr"


def _soap_from_blocks(orthonormalization, first_basis, **refresh):
  rule = soap_optax.LayoutRule(block_size=12)
  return optax.chain(
    soap_optax.kronecker_stats(0.95, layout=rule),
    soap_optax.eigenbasis_refresh(
      3, layout=rule, first_basis=first_basis, orthonormalization=orthonormalization, **refresh
    ),
    soap_optax.rotated_adam(0.9, 0.95, 1e-8),
    optax.scale(-1e-2),
  )


def _soap_run_inputs(shapes=None):
  rng = np.random.default_rng(7)
  shapes = shapes or {"thin": (24, 2), "ragged": (20, 6), "square": (8, 8)}
  params = {k: np.zeros(shape, np.float32) for k, shape in shapes.items()}
  grads = [
    {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    for _ in range(10)
  ]
  return params, grads


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("first_basis", ["eigh", "qr"])
def test_soap_with_cholesky_qr_follows_soap_with_qr(method, first_basis):
  """Ten steps with refreshes at 3, 6 and 9: a thin gradient (rank-deficient factors, the
  fallback), a ragged one (block_size 12 cuts 20 into 12 + 8 zero-padded) and a square one.

  The bases differ in their columns' signs (and in float32 rounding); a step uses a basis as
  ``Q … Qᵀ`` and Adam's moments follow it, so the updates agree to rounding."""
  params, grads = _soap_run_inputs()
  reference = run_optimizer(_soap_from_blocks("qr", first_basis), params, grads, jnp.float32)
  ours = run_optimizer(_soap_from_blocks(method, first_basis), params, grads, jnp.float32)
  assert_updates_close(params, ours, reference, tol=1e-5)


def test_adaptive_refresh_with_warm_iterations_follows_qr():
  """τ > 0 refreshes one factor at a time (single matrices) and max_qr_iterations > 1 runs the
  warm power/QR loop: both orthonormalise through the option too.

  On factors of full rank from the first step (square blocks), where the update depends
  continuously on the basis. With rank-deficient factors it does not: the basis of their null
  space is set by rounding, and the next gradient, which leaves the old range, is normalised
  coordinate by coordinate in it; Householder QR against itself with gradients perturbed by
  1e-6 moved the thin and ragged parameters' updates above by 25–40 %. Warm iterations keep
  re-orthonormalising those rounding-defined columns, so the two methods part there."""
  params, grads = _soap_run_inputs({"square": (8, 8), "blocked": (24, 24)})
  refresh = {"refresh_tolerance": 0.05, "max_qr_iterations": 3}
  reference = run_optimizer(_soap_from_blocks("qr", "qr", **refresh), params, grads, jnp.float32)
  ours = run_optimizer(
    _soap_from_blocks("cholesky_qr2", "qr", **refresh), params, grads, jnp.float32
  )
  assert_updates_close(params, ours, reference, tol=1e-5)
