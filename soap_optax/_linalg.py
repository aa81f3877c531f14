"""Numerical kernels on plain arrays: mode products, factor statistics, eigenbases.

Nothing here knows about optax or pytrees; every function takes and returns arrays, so each can
be checked against NumPy on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# The matmuls that rotate gradients and build statistics decide the optimizer's numerics. On
# accelerators JAX's default float32 matmul may drop to bf16/TF32 passes, so ask for full
# precision unless a caller opts out.
HIGHEST = lax.Precision.HIGHEST


def mode_product(
  x: Array, mats: Sequence[Array | None], *, transpose: bool, precision=HIGHEST
) -> Array:
  """Multiplies every axis ``k`` of ``x`` by ``mats[k]`` (or its transpose).

  With ``transpose=True`` this rotates *into* the bases (``x ×_k Q_kᵀ``, the reference's
  ``project``); with ``transpose=False`` it rotates back out (``x ×_k Q_k``). Axes whose entry is
  ``None`` are left as they are.
  """
  for axis, mat in enumerate(mats):
    if mat is None:
      continue
    # contract x's axis with the row index of Q (into the basis) or the column index (out).
    contract = 0 if transpose else 1
    y = jnp.tensordot(x, mat.astype(x.dtype), axes=((axis,), (contract,)), precision=precision)
    x = jnp.moveaxis(y, -1, axis)
  return x


def factor_statistic(x: Array, axis: int, *, precision=HIGHEST) -> Array:
  """``X_(k) X_(k)ᵀ``: ``x`` contracted with itself over every axis but ``axis``."""
  others = tuple(i for i in range(x.ndim) if i != axis)
  return jnp.tensordot(x, x, axes=(others, others), precision=precision)


def eigh_descending(matrix: Array) -> tuple[Array, Array]:
  """Eigenvalues (descending) and orthonormal eigenvectors of a symmetric matrix.

  ``eigh`` does not raise in JAX: a failure shows up as non-finite output. Then the matrix is
  retried with a small diagonal shift (which leaves eigenvectors unchanged and lifts exact
  degeneracies that some solvers trip over); if that fails too, the identity is returned, so a
  caller always receives a finite, orthonormal basis.
  """
  n = matrix.shape[-1]
  eye = jnp.eye(n, dtype=matrix.dtype)

  def solve(m):
    w, v = jnp.linalg.eigh(m, symmetrize_input=True)
    return w[::-1], v[:, ::-1]

  def is_finite(w, v):
    return jnp.all(jnp.isfinite(w)) & jnp.all(jnp.isfinite(v))

  def retry():
    scale = jnp.nan_to_num(jnp.trace(matrix) / n, nan=1.0, posinf=1.0, neginf=1.0)
    shifted = jnp.nan_to_num(matrix) + (jnp.abs(scale) * 1e-6 + 1e-30) * eye
    w, v = solve(shifted)
    ok = is_finite(w, v)
    return jnp.where(ok, w, jnp.zeros((n,), matrix.dtype)), jnp.where(ok, v, eye)

  w, v = solve(matrix)
  return lax.cond(is_finite(w, v), lambda: (w, v), retry)


def all_finite(arrays: Sequence[Array]) -> Array:
  """A scalar bool: every entry of every array is finite (True for no arrays)."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in arrays], dtype=bool))
