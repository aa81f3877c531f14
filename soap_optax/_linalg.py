"""Numerical kernels on plain arrays: mode products, factor statistics, eigenbases.

Nothing here knows about optax, pytrees or meshes; every function takes and returns arrays, so
each can be checked against NumPy on its own. Tensors are in the working layout
``(num_blocks, d_0, …, d_{r-1})`` and factors are stacks ``(num_blocks, n, n)``: block ``b`` of
the tensor is rotated by factor ``b``. The decompositions work on one symmetric matrix; callers
``vmap`` or ``lax.map`` them over stacks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

Array = jax.Array

# The matmuls that rotate gradients and build statistics decide the optimizer's numerics. On
# accelerators JAX's default float32 matmul may drop to bf16/TF32 passes, so the default is full
# precision; `precision` arguments let a user trade it for speed, measured (BUILD_NOTES.md).
HIGHEST = lax.Precision.HIGHEST

# What a block's `precision` argument accepts (besides a `jax.lax.Precision`).
MatmulPrecision = Literal["highest", "high", "default", "bfloat16"] | lax.Precision
PRECISIONS = ("highest", "high", "default", "bfloat16")


class Matmul(NamedTuple):
  """How the statistics and rotations multiply: XLA's precision, and the operand dtype.

  ``operands=None`` multiplies in the inputs' dtype; ``jnp.bfloat16`` rounds both operands to
  bfloat16 and accumulates in the inputs' (float32) dtype — a TPU's default float32 matmul, made
  explicit, so that it behaves the same on every platform (on a CPU too, where XLA ignores
  ``precision``).
  """

  precision: lax.Precision = HIGHEST
  operands: Any = None


FULL = Matmul()


def matmul_settings(precision: MatmulPrecision = "highest") -> Matmul:
  """The :class:`Matmul` of a block's ``precision`` argument (raises on an unknown one)."""
  if isinstance(precision, lax.Precision):
    return Matmul(precision)
  named = {
    "highest": Matmul(lax.Precision.HIGHEST),
    "high": Matmul(lax.Precision.HIGH),
    "default": Matmul(lax.Precision.DEFAULT),
    "bfloat16": Matmul(lax.Precision.DEFAULT, jnp.bfloat16),
  }
  if precision not in named:
    raise ValueError(
      f"precision must be one of {PRECISIONS} or a jax.lax.Precision, got {precision!r}."
    )
  return named[precision]


def _dot_general(x: Array, y: Array, dims, matmul: Matmul) -> Array:
  if matmul.operands is None:
    return lax.dot_general(x, y.astype(x.dtype), dims, precision=matmul.precision)
  return lax.dot_general(
    x.astype(matmul.operands),
    y.astype(matmul.operands),
    dims,
    precision=matmul.precision,
    preferred_element_type=x.dtype,
  )


def mode_product(
  x: Array, mats: Sequence[Array | None], *, transpose: bool, matmul: Matmul | None = None
) -> Array:
  """Multiplies axis ``k`` of every block of ``x`` by that block's ``mats[k]`` (or transpose).

  With ``transpose=True`` this rotates *into* the bases (``x ×_k Q_kᵀ``, the reference's
  ``project``); with ``transpose=False`` it rotates back out (``x ×_k Q_k``). Axes whose entry is
  ``None`` are left as they are. ``matmul`` sets the products' precision (full by default).
  """
  matmul = matmul or FULL
  if x.shape[0] == 1:
    # One block: plain contractions, the layout measured fastest on CPU for the unblocked case.
    single = [None if m is None else m[0] for m in mats]
    return _mode_product_single(x[0], single, transpose, matmul)[None]
  for axis, mat in enumerate(mats):
    if mat is None:
      continue
    contract = 1 if transpose else 2  # Q's row index goes into the basis, its column out of it
    dims = (((axis + 1,), (contract,)), ((0,), (0,)))
    x = jnp.moveaxis(_dot_general(x, mat, dims, matmul), -1, axis + 1)
  return x


def _mode_product_single(x: Array, mats, transpose: bool, matmul: Matmul) -> Array:
  for axis, mat in enumerate(mats):
    if mat is None:
      continue
    contract = 0 if transpose else 1
    dims = (((axis,), (contract,)), ((), ()))
    x = jnp.moveaxis(_dot_general(x, mat, dims, matmul), -1, axis)
  return x


def factor_statistic(x: Array, axis: int, matmul: Matmul | None = None) -> Array:
  """``X_(k) X_(k)ᵀ`` per block: each block contracted with itself over every axis but ``axis``.

  ``axis`` counts the block's own axes (0 is the first axis after the block index).
  """
  matmul = matmul or FULL
  others = tuple(i for i in range(1, x.ndim) if i != axis + 1)
  if x.shape[0] == 1:
    single = tuple(i - 1 for i in others)
    return _dot_general(x[0], x[0], ((single, single), ((), ())), matmul)[None]
  return _dot_general(x, x, ((others, others), ((0,), (0,))), matmul)


def debias(decay, count: Array, dtype=jnp.float32) -> Array:
  """``1 − decayᵗ`` at update ``t = count`` (the initialising call is not counted).

  Computed as ``−expm1(t·log(decay))`` with the logarithm taken in float64 for a Python
  ``decay``: a decay just below 1 (0.999999999, say) is 1.0 in float32, where ``1 − decayᵗ``
  would be 0 and the bias correction infinite.
  """
  t = jnp.maximum(count, 1).astype(dtype)
  if isinstance(decay, (int, float)):
    log = math.log(decay) if decay > 0 else -math.inf
    return -jnp.expm1(t * log)
  return -jnp.expm1(t * jnp.log(decay))


def divide(numerator: Array, denominator: Array) -> Array:
  """``numerator / denominator``, and 0 where the denominator is 0 (a moment never fed)."""
  return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1), 0)


def finite(x: Array, axis: int | Sequence[int] | None = None) -> Array:
  """Whether the entries of ``x`` are all finite (along ``axis``), read off their sum.

  A NaN or an Inf makes the sum non-finite (``∞ − ∞`` is NaN), so no fault is missed; the sum
  of finite entries is non-finite only when it overflows (accumulated in float32 at least, so
  beyond ``3.4e38``), and an array that large is treated as a fault too: its squares, which
  the statistics and second moments hold, would overflow first. One reduction per array, where
  testing each entry was a kernel more per array (12 of SOAP's 170 kernels on a 2-layer GPT):
  the update tests every gradient and every refresh's eigenvalues.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.isfinite(jnp.sum(x, axis=axis, dtype=dtype))


def all_finite(arrays: Sequence[Array]) -> Array:
  """A scalar bool: every entry of every array is finite (True for no arrays)."""
  with jax.named_scope("all_finite"):
    flag = jnp.all(jnp.asarray([finite(a) for a in arrays], dtype=bool))
    # XLA rewrites the reduction over per-array flags as a chain of ANDs, one per array, and then
    # copies that cheap chain into every fusion that reads the flag: one per parameter, so the
    # compiled program grew with the square of the number of parameters. A square root is an op
    # XLA will not copy into several fusions, so the flag is computed once and read everywhere.
    return jnp.sqrt(flag.astype(jnp.float32)) > 0


# -- one factor's eigenbasis ------------------------------------------------------------------


class Eigenbasis(NamedTuple):
  """A factor's basis after a decomposition or refresh.

  Attributes:
    basis: orthonormal columns ``Q`` (n × n).
    order: the permutation applied to the previous basis's columns (int32; the identity when the
      basis was recomputed from scratch or kept).
    eigenvalues: estimates of ``L``'s eigenvalues along ``basis``'s columns.
    refreshed: whether ``basis`` differs from the previous one.
    iterations: QR iterations spent (0 for ``eigh`` or a kept basis).
  """

  basis: Array
  order: Array
  eigenvalues: Array
  refreshed: Array
  iterations: Array


def eigh_descending(matrix: Array) -> tuple[Array, Array]:
  """Eigenvalues (descending) and orthonormal eigenvectors of symmetric matrices ``(…, n, n)``.

  Reads the lower triangle only, as LAPACK and the reference's ``torch.linalg.eigh`` do; making
  the input symmetric first cost a kernel per factor size. ``eigh`` does not raise in JAX: a
  failed decomposition comes back as NaN, in the eigenvalues and the eigenvectors alike, and the
  refresh keeps the previous basis there (its guard reads the eigenvalues), so a failure costs a
  stale basis until the next refresh, never a wrong one. An earlier retry with a shifted matrix
  put a second ``eigh`` and its tests into the compiled program of every factor size (39 of
  SOAP's 226 kernels on a 2-layer GPT, about a third of its compile time) for a failure never
  seen on finite statistics.
  """
  w, v = jnp.linalg.eigh(matrix, symmetrize_input=False)
  return w[..., ::-1], v[..., ::-1]


def eigh_basis(matrix: Array) -> Eigenbasis:
  """The exact eigenbases of ``(…, n, n)`` matrices, eigenvalues descending."""
  w, v = eigh_descending(matrix)
  batch, n = matrix.shape[:-2], matrix.shape[-1]
  order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*batch, n))
  return Eigenbasis(v, order, w, jnp.ones(batch, bool), jnp.zeros(batch, jnp.int32))


def diagonal_estimates(basis: Array, product: Array) -> Array:
  """``diag(Qᵀ L Q)`` from ``Q`` and ``L Q``: the eigenvalue estimates along ``Q``'s columns."""
  return jnp.einsum("...ij,...ij->...j", basis, product)


def _off_diagonal_square(basis: Array, product: Array, estimates: Array) -> Array:
  """``‖B − diag B‖²_F`` for ``B = QᵀLQ``, from ``Q``, ``LQ`` and ``diag B``.

  ``Q`` is orthonormal, so ``‖B − diag B‖_F = ‖Qᵀ(LQ − Q diag B)‖_F = ‖LQ − Q diag B‖_F``: an n²
  residual of the product the refresh forms anyway, with no second n³ product. The residual is
  formed entry by entry, so its rounding is relative to ``‖L‖``'s entries (≈ 1e-7·‖L‖ in
  float32), not to ``‖L‖²``: the shortcut ``‖L‖² − ‖diag B‖²`` cancelled to 0 whenever the
  off-diagonal mass fell below float32's resolution of ``‖L‖²`` and so called stale bases fresh.
  """
  residual = product - basis * estimates[..., None, :]
  return jnp.sum(jnp.square(residual), axis=(-2, -1))


def _norm_square(matrix: Array, padding: Array | float) -> Array:
  """``‖L‖²_F`` of the real part: each zero-padded coordinate carries a −1 sentinel (see
  :func:`sentinel_padding`) on ``L``'s diagonal, which must not count."""
  return jnp.sum(jnp.square(matrix), axis=(-2, -1)) - padding


def off_diagonal_ratio(matrix: Array, basis: Array) -> Array:
  """``‖B − diag(B)‖_F / ‖B‖_F`` with ``B = QᵀLQ``: how far ``Q`` is from diagonalising ``L``.

  *Purifying Shampoo*'s adaptive refresh skips a factor while this is at most τ; the refresh's
  test (:func:`is_stale`) and :func:`~soap_optax.diagnostics` compute this same quantity, the
  same way. Works on single matrices and on stacks ``(…, n, n)``; 0 for a zero ``L``.

  Examples:
    >>> L = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> soap_optax.off_diagonal_ratio(L, jnp.eye(2))  # √2 / √10
    Array(0.4472136, dtype=float32)
    >>> Q = jnp.array([[1.0, 1.0], [1.0, -1.0]]) / jnp.sqrt(2.0)  # L's eigenvectors
    >>> bool(soap_optax.off_diagonal_ratio(L, Q) < 1e-6)  # 0 up to float32 rounding
    True
  """
  product = jnp.matmul(matrix, basis, precision=HIGHEST)
  estimates = diagonal_estimates(basis, product)
  off = _off_diagonal_square(basis, product, estimates)
  total = _norm_square(matrix, 0.0)
  return jnp.sqrt(off / jnp.where(total > 0, total, 1))


def is_stale(
  matrix: Array,
  basis: Array,
  product: Array,
  estimates: Array,
  tolerance,
  padding: Array | float = 0.0,
) -> Array:
  """Purifying Shampoo's test ``‖B − diag B‖_F > τ‖B‖_F`` for ``B = QᵀLQ``.

  Takes ``LQ`` (``product``) and ``diag B`` (``estimates``), which the power step reuses, and
  measures the off-diagonal mass as :func:`off_diagonal_ratio` does, without cancellation, so the
  test is accurate for any τ down to float rounding of ``L``'s entries. ``padding`` is the number
  of zero-padded coordinates, whose −1 sentinels (see :func:`sentinel_padding`) sit on ``B``'s
  diagonal and must not count towards ``‖B‖``.
  """
  off = _off_diagonal_square(basis, product, estimates)
  return off > jnp.square(tolerance) * _norm_square(matrix, padding)


def orthonormalize(matrix: Array) -> Array:
  """The ``Q`` of the QR decomposition of every matrix in a ``(…, n, n)`` stack.

  On GPUs JAX lowers a batched QR to cuBLAS' batched ``geqrf``, which is made for tiny
  matrices: on an H200 (jax 0.11.2) 12 matrices of 1536 × 1536 took 8.2 s that way against
  88 ms for one cuSOLVER QR after another, so there the stack is looped. On CPU (LAPACK, one
  matrix at a time either way) and TPU the batched form is kept. The choice is made when the
  program is lowered for its platform; the compiled program has no branch.
  """
  if matrix.ndim == 2:
    return jnp.linalg.qr(matrix)[0]
  stack = matrix.reshape(-1, *matrix.shape[-2:])

  def looped(m):
    return lax.map(lambda a: jnp.linalg.qr(a)[0], m)

  def batched(m):
    return jnp.linalg.qr(m)[0]

  q = lax.platform_dependent(stack, cuda=looped, rocm=looped, default=batched)
  return q.reshape(matrix.shape)


def permute(x: Array, order: Array, axis: int) -> Array:
  """``x`` with ``axis`` of each matrix of a stack reordered: ``x[…, order[i], …]``.

  ``order`` is ``(*batch, n)``, a permutation per leading index of ``x``; ``axis`` counts within
  one such entry. One gather per entry (``vmap``): ``take_along_axis`` builds a full-rank index
  array and bounds masks, about three times the compiled instructions, and the second moments'
  permutation alone was about a quarter of a 16-layer GPT's compile.
  """
  # "clip": a permutation is in range, and clamping costs no mask (the default fills with NaN).
  pick = functools.partial(jnp.take, axis=axis, mode="clip", unique_indices=True)
  for _ in range(order.ndim - 1):
    pick = jax.vmap(pick)
  return pick(x, order)


def run_time_offsets(sizes: Sequence[int]) -> list[Array]:
  """Where consecutive parts of ``sizes`` start along an axis, as values XLA cannot see through.

  Slices at constant offsets each fuse into a kernel of their own; at run-time offsets (passed
  into a runtime branch as operands) the slices of equal shape share one kernel, so a split
  back into many parts no longer grows the compiled program with their number.
  """
  starts = np.cumsum(sizes) - np.asarray(sizes)
  return lax.optimization_barrier([jnp.asarray(s, jnp.int32) for s in starts])


def slice_at(x: Array, start: Array, size: int) -> Array:
  """``x[start : start + size]`` at a run-time ``start`` that is in range by construction (from
  :func:`run_time_offsets`): JAX's wrapping of negative offsets is three ops per slice."""
  return lax.dynamic_slice_in_dim(x, start, size, allow_negative_indices=False)


def sorted_power_step(
  product: Array, estimates: Array, orthonormalization: Orthonormalization = "qr"
) -> tuple[Array, Array]:
  """SOAP's refresh: order the old basis by its estimates, one power step ``L Q``, then QR.

  Takes ``L Q`` (already computed for the estimates) and returns the new basis and the order.
  Sorting keeps the columns of large eigenvalues first, as ``eigh``'s first basis has them, so
  the diagonal statistics held in the basis can follow with the same permutation.
  ``orthonormalization`` names the QR's method (see :func:`orthonormalize_by`).
  """
  order = jnp.argsort(-estimates, axis=-1, stable=True).astype(jnp.int32)
  sorted_product = permute(product, order, axis=-1)
  basis = orthonormalize_by(sorted_product, orthonormalization)
  return basis, order


def warm_qr_iterations(
  matrix: Array, basis: Array, tolerance, max_iterations, padding=0.0, orthonormalization="qr"
) -> tuple[Array, Array, Array]:
  """Further power steps + QR from ``basis`` while it is stale, up to ``max_iterations`` in all.

  ``basis`` counts as the first iteration. Works on ``(…, n, n)`` stacks, each matrix stopping
  on its own. Returns the bases, their eigenvalue estimates and the numbers of QR iterations.
  ``orthonormalization`` names the QR's method (see :func:`orthonormalize_by`).
  """

  def measure(q):
    product = matrix @ q
    estimates = diagonal_estimates(q, product)
    return product, estimates, is_stale(matrix, q, product, estimates, tolerance, padding)

  def going(i, stale):
    return (i < max_iterations) & stale

  def body(carry):
    i, q, product, estimates, stale = carry
    go = going(i, stale)
    q = jnp.where(go[..., None, None], orthonormalize_by(product, orthonormalization), q)
    product, new_estimates, new_stale = measure(q)
    estimates = jnp.where(go[..., None], new_estimates, estimates)
    return i + go.astype(jnp.int32), q, product, estimates, jnp.where(go, new_stale, stale)

  first = (jnp.ones(basis.shape[:-2], jnp.int32), basis, *measure(basis))
  iterations, basis, _, estimates, _ = lax.while_loop(
    lambda carry: jnp.any(going(carry[0], carry[-1])), body, first
  )
  return basis, estimates, iterations


def sentinel_padding(matrix: Array, padding: ArrayLike) -> Array:
  """``L − diag(padding)`` for ``(…, n, n)`` statistics and ``(…, n)`` 0/1 padding flags.

  Gives the zero padding of a ragged block the eigenvalue −1. The statistics of a padded block
  are zero on the padding, and zero may also be an eigenvalue of the real part; a decomposition
  could then mix the two. With −1 on the padding's diagonal (below every eigenvalue of the real,
  positive semi-definite part) the padding is an invariant subspace of its own, sorted last, and
  the real block's basis is the one it would have alone.
  """
  eye = jnp.eye(matrix.shape[-1], dtype=matrix.dtype)
  return matrix - jnp.asarray(padding, matrix.dtype)[..., None, :] * eye


# -- Cholesky-QR: an orthonormalisation made of matmuls ----------------------------------------

# How the refresh's power step orthonormalises ``L Q`` (RefreshConfig.orthonormalization).
Orthonormalization = Literal["qr", "cholesky_qr2", "shifted_cholesky_qr3"]
ORTHONORMALIZATIONS = ("qr", "cholesky_qr2", "shifted_cholesky_qr3")

# The most ``‖Q₁ᵀQ₁ − I‖_F`` a Cholesky-QR pass may leave for the next pass to be trusted: then
# ``κ(Q₁)² ≤ (1 + ½)/(1 − ½) = 3``, and one more pass is orthonormal to a few units of rounding
# (Yamamoto et al. 2015). Above it, or with a non-finite factor, the matrix goes to Householder.
CHOLESKY_QR_BOUND = 0.5


class CholeskyQR(NamedTuple):
  """Cholesky-QR's orthonormal factors and, per matrix, whether Householder QR replaced them.

  Attributes:
    basis: ``Q`` with ``Y = Q R``, ``R`` upper triangular with a positive diagonal, ``(…, n, n)``.
    fallback: ``(…)`` bool, True where the Cholesky passes failed and ``basis`` is Householder's
      (with its columns' signs set to the same convention).
  """

  basis: Array
  fallback: Array


def _gram(y: Array) -> Array:
  return jnp.matmul(jnp.swapaxes(y, -1, -2), y, precision=HIGHEST)


def _cholesky_pass(y: Array, gram: Array) -> Array:
  """``Y R⁻¹`` for ``R = chol(gram)ᵀ``: one triangular solve, no inverse formed.

  JAX's Cholesky returns NaN where ``gram`` is not numerically positive definite, which the
  fallback test sees as a non-finite factor.
  """
  lower = jnp.linalg.cholesky(gram, symmetrize_input=False)
  return lax.linalg.triangular_solve(lower, y, left_side=False, lower=True, transpose_a=True)


def _orthonormality_error(gram: Array) -> Array:
  """``‖G − I‖_F`` per matrix; NaN where ``G`` is not finite."""
  eye = jnp.eye(gram.shape[-1], dtype=gram.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(gram - eye), axis=(-2, -1)))


def _qr_positive_diagonal(y: Array) -> Array:
  """Householder ``Q`` of ``Y``, its columns' signs set so that ``R``'s diagonal is ≥ 0.

  ``diag R = diag(QᵀY)`` costs n² (no product of matrices); a zero pivot keeps its sign.
  """
  q = orthonormalize(y)
  pivots = jnp.sum(q * y, axis=-2)
  return q * jnp.where(pivots < 0, -1, 1).astype(q.dtype)[..., None, :]


def cholesky_qr2(matrix: Array, *, shift: bool = False) -> CholeskyQR:
  """Orthonormalises each ``(…, n, n)`` matrix by Cholesky-QR2, falling back to Householder QR.

  Two passes of ``R = chol(YᵀY)ᵀ, Y ← Y R⁻¹``: each is a product, a Cholesky and a triangular
  solve, work that accelerators do at matmul speed, where Householder QR is a chain of thin
  panel updates. The columns keep their order (the ``Q`` of ``Y``'s QR, with ``R``'s diagonal
  positive: Householder's ``Q`` up to column signs). ``YᵀY`` squares ``Y``'s condition number,
  so a pass needs ``κ(Y) ≲ u^{-1/2}`` (≈ 3·10³ in float32): SOAP's statistics break that when
  they are rank-deficient (early in training, batch × sequence below the axis length), on
  zero-padded blocks and with widely spread spectra. So each matrix is tested: if the first
  pass's ``Q₁`` is not finite or ``‖Q₁ᵀQ₁ − I‖_F`` (read off the second pass's Gram matrix, at no
  cost) exceeds :data:`CHOLESKY_QR_BOUND`, or the result is not finite, that matrix is
  recomputed by Householder QR. The fallback is a branch per matrix inside ``lax.map``, so only
  the failed matrices pay for a QR (under ``vmap`` the branch becomes a select and every matrix
  pays for both). On GPUs and TPUs the stack's Cholesky passes run batched before that loop; on
  CPU each matrix is done whole inside the loop, which measured as fast as the batched passes
  on a lightly loaded machine and up to 3× faster on a busy one (XLA's batched products, 12 ×
  384², ``docs/benchmarks.md``). The choice is made when the program is lowered for its
  platform.

  ``shift=True`` makes it a shifted Cholesky-QR3 (Fukaya et al. 2020): a first pass on
  ``YᵀY + sI``, then Cholesky-QR2 of its result. The shift ``s = 11(m + n + 1)·u·‖Y‖²_F`` bounds
  the rounding errors of the Gram matrix (``≤ m·u·‖Y‖²_F``) and of its Cholesky factorisation
  (``≤ (n+1)·u·‖Y‖²_F``) with the paper's safety factor 11, so the shifted matrix stays positive
  definite; it is the paper's ``11(mn + n(n+1))·u·‖Y‖²₂`` with the Frobenius norm kept instead of
  being bounded by ``n‖Y‖²₂``, which for square n × n blocks would shift by about ``‖Y‖²₂`` itself
  and gain nothing. The first pass leaves ``κ(Q₁) ≈ √s / σ_min(Y)``, so in float32 matrices up to
  ``κ(Y) ≈ 10⁴``–``10⁵`` (n = 256) pass instead of ``≈ 10³``, for a third pass's work.

  Products are at ``Precision.HIGHEST`` in the input's dtype (float32 in the refresh).

  Args:
    matrix: ``(…, n, n)`` matrices to orthonormalise (square: the power step's ``L Q``).
    shift: whether to start with the shifted pass (Cholesky-QR3).

  Returns:
    A :class:`CholeskyQR`: the orthonormal factors and where Householder QR was used.

  References:
    Fukaya et al., `CholeskyQR2: a simple and communication-avoiding algorithm for computing a
    tall-skinny QR factorization on a large-scale parallel system
    <https://doi.org/10.1109/ScalA.2014.11>`_, 2014.
    Yamamoto et al., `Roundoff error analysis of the CholeskyQR2 algorithm
    <https://etna.math.kent.edu/vol.44.2015/pp306-326.dir/pp306-326.pdf>`_, 2015.
    Fukaya et al., `Shifted Cholesky QR for computing the QR factorization of ill-conditioned
    matrices <https://doi.org/10.1137/18M1218212>`_, 2020.
  """
  if matrix.ndim == 2:
    q, ok = _cholesky_qr_single(matrix, shift)
    return CholeskyQR(q, ~ok)
  shape = matrix.shape
  q, ok = lax.platform_dependent(
    matrix.reshape(-1, *shape[-2:]),
    cpu=lambda m: _cholesky_qr_looped(m, shift),
    default=lambda m: _cholesky_qr_batched(m, shift),
  )
  return CholeskyQR(q.reshape(shape), ~ok.reshape(shape[:-2]))


def _cholesky_qr_single(matrix: Array, shift: bool) -> tuple[Array, Array]:
  """One matrix: the Cholesky passes, and Householder QR in a branch where they failed."""
  q, ok = _cholesky_qr_passes(matrix, shift)
  return lax.cond(ok, lambda: q, lambda: _qr_positive_diagonal(matrix)), ok


def _cholesky_qr_looped(stack: Array, shift: bool) -> tuple[Array, Array]:
  """A ``(K, n, n)`` stack one matrix at a time (CPU)."""
  return lax.map(lambda a: _cholesky_qr_single(a, shift), stack)


def _cholesky_qr_batched(stack: Array, shift: bool) -> tuple[Array, Array]:
  """A ``(K, n, n)`` stack's passes batched, then a per-matrix branch to Householder QR."""
  q, ok = _cholesky_qr_passes(stack, shift)

  def one(operands):
    a, qa, fine = operands
    return lax.cond(fine, lambda: qa, lambda: _qr_positive_diagonal(a))

  return lax.map(one, (stack, q, ok)), ok


def _cholesky_qr_passes(matrix: Array, shift: bool) -> tuple[Array, Array]:
  """Cholesky-QR2 (or shifted -QR3) without the fallback: ``Q`` and, per matrix, whether it
  passed the test of :func:`cholesky_qr2`."""
  # Scaling Y's columns changes R, not Q (Y D = Q (R D) for a positive diagonal D), and the
  # power step's Y = L Q is ill-conditioned mostly through its column norms: with Q close to
  # L's eigenbasis, L Q ≈ Q Λ. Unit columns leave the condition of the basis' drift, so widely
  # spread but well-resolved spectra pass. A zero column stays zero (and falls back).
  norms = jnp.sqrt(jnp.sum(jnp.square(matrix), axis=-2, keepdims=True))
  y = matrix / jnp.where(norms > 0, norms, 1)
  if shift:
    m, n = matrix.shape[-2:]
    unit = jnp.finfo(matrix.dtype).eps / 2
    gram = _gram(y)
    size = jnp.trace(gram, axis1=-2, axis2=-1)  # ‖Y‖²_F
    s = 11 * (m + n + 1) * unit * size
    # Exactly zero for a zero Y, where no shift can help: that matrix falls back.
    y = _cholesky_pass(y, gram + s[..., None, None] * jnp.eye(n, dtype=gram.dtype))
  q1 = _cholesky_pass(y, _gram(y))
  gram = _gram(q1)
  q = _cholesky_pass(q1, gram)
  error = _orthonormality_error(gram)  # NaN when q1 is not finite
  return q, (error <= CHOLESKY_QR_BOUND) & jnp.all(jnp.isfinite(q), axis=(-2, -1))


def orthonormalize_by(matrix: Array, orthonormalization: Orthonormalization = "qr") -> Array:
  """The orthonormal factor of each matrix by the named method.

  ``"qr"`` is :func:`orthonormalize` (Householder); ``"cholesky_qr2"`` and
  ``"shifted_cholesky_qr3"`` are :func:`cholesky_qr2` without and with the shifted first pass,
  Householder where they fail. All give the ``Q`` of the columns' QR in their order; the
  Cholesky forms fix its column signs (``R``'s diagonal positive), Householder's follow LAPACK.
  """
  if orthonormalization == "qr":
    return orthonormalize(matrix)
  if orthonormalization in ("cholesky_qr2", "shifted_cholesky_qr3"):
    return cholesky_qr2(matrix, shift=orthonormalization == "shifted_cholesky_qr3").basis
  raise ValueError(
    f"orthonormalization must be one of {ORTHONORMALIZATIONS}, got {orthonormalization!r}."
  )
