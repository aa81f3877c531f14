"""Diagonal optimizers run in the eigenbasis of the Kronecker factors.

SOAP (:func:`rotated_adam`), Adafactor in Shampoo's eigenbasis (:func:`rotated_adafactor`) and
eigenvalue-corrected Shampoo (:func:`eigenvalue_corrected`) differ only in which moments they keep
and in which basis; the rotations and the transfer of moments across a refresh are shared here.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from soap_optax._carrier import (
  KroneckerUpdate,
  check_layout,
  expect_carriers,
  per_leaf,
  per_parameter,
)
from soap_optax._layout import LayoutRule
from soap_optax._linalg import mode_product


class RotatedAdamState(NamedTuple):
  """State of :func:`rotated_adam`.

  Attributes:
    mu: first moment, held in the current eigenbasis, in the parameters' shapes.
    nu: second moment, held in the current eigenbasis, in the parameters' shapes.
  """

  mu: optax.Updates
  nu: optax.Updates


def moment_dtype_for(param_dtype, dtype):
  return jnp.dtype(dtype) if dtype is not None else jnp.promote_types(param_dtype, jnp.float32)


def into_basis(x, bases):
  """Rotates a working-shape array into the eigenbasis: ``x ×_k Q_kᵀ``."""
  return mode_product(x, bases, transpose=True)


def out_of_basis(x, bases):
  """Rotates a working-shape array out of the eigenbasis: ``x ×_k Q_k``."""
  return mode_product(x, bases, transpose=False)


def diagonal_scaling(per_axis, ndim: int):
  """The outer product of per-axis vectors (``None`` = all ones), broadcastable to ``ndim``."""
  scale = 1.0
  for axis, vec in enumerate(per_axis):
    if vec is not None:
      shape = [1] * ndim
      shape[axis] = vec.shape[0]
      scale = scale * vec.reshape(shape)
  return scale


def bias_correction(count, b1, b2, dtype):
  """Adam's step-size factor ``√(1 − b2ᵗ) / (1 − b1ᵗ)`` at update ``t = count``."""
  t = jnp.maximum(count, 1).astype(dtype)
  return jnp.sqrt(1 - b2**t) / (1 - b1**t)


def is_live(carrier: KroneckerUpdate):
  """Whether this step updates moments and returns a step.

  The first call only initialises statistics and bases; a non-finite step is skipped.
  """
  return carrier.finite & (carrier.count > 0)


def carry_to_next_basis(carrier: KroneckerUpdate, first_moments=(), diagonals=()):
  """Moves moments held in ``carrier.basis`` into ``carrier.next_basis``.

  First moments (vectors in the eigenbasis) are rotated exactly, ``m ← m ×_k (Q_newᵀ Q_old)``;
  diagonal statistics (second moments, corrected eigenvalues) cannot be rotated, so they are
  permuted with the refresh's column ``order``, as the SOAP reference does. The work is done
  under a ``lax.cond``: a step in which no factor was refreshed pays nothing.
  """
  refreshed = [r for r in carrier.refreshed if r is not None]
  if not refreshed:
    return tuple(first_moments), tuple(diagonals)

  def transfer(ms, ds):
    # Out of the old basis and into the new one: two mode products per axis. Forming
    # Q_newᵀ Q_old instead would cost an extra n³ per factor, more for every non-square shape.
    ms = tuple(into_basis(out_of_basis(m, carrier.basis), carrier.next_basis) for m in ms)
    new_ds = []
    for d in ds:
      for axis, order in enumerate(carrier.order):
        # An axis reduced to length 1 (Adafactor's row or column sums) needs no permutation.
        if order is not None and d.shape[axis] == order.shape[0]:
          d = jnp.take(d, order, axis=axis)
      new_ds.append(d)
    return ms, tuple(new_ds)

  any_refreshed = jnp.any(jnp.stack(refreshed))
  return lax.cond(
    any_refreshed, transfer, lambda ms, ds: (ms, ds), tuple(first_moments), tuple(diagonals)
  )


def rotated_adam(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  correct_bias: bool = True,
  normalize_grads: bool = False,
  moment_dtype=None,
) -> optax.GradientTransformation:
  """Adam in the eigenbasis of the Kronecker factors: SOAP's update direction.

  Each step rotates the gradient into the bases ``Q_k`` (``G' = G ×_k Q_kᵀ``), updates Adam's
  moments there, and rotates the normalised step back out:

    m ← b1 m + (1 − b1) G',   v ← b2 v + (1 − b2) G'²,
    u = c_t · (m / (√v + eps)) ×_k Q_k,   c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)

  following the SOAP reference (``eps`` is added to ``√v`` before the bias correction, which is
  folded into the step size). On the first call (count 0) the update is zero and the moments
  stay zero: that call only sets up statistics and bases. When a factor's basis is refreshed, the
  first moment is rotated exactly into the new basis and the second moment is permuted with the
  new column order. The update is returned in each parameter's shape and dtype, ready for
  standard optax transformations (weight decay, learning rate) behind it.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1)``.
    eps: added to ``√v``.
    correct_bias: apply Adam's bias correction ``c_t``.
    normalize_grads: divide each parameter's direction by its root mean square (SOAP's
      ``normalize_grads``), before the bias correction.
    moment_dtype: dtype of the moments; float32 by default (float64 for float64 parameters).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """

  def init_fn(params):
    def zeros(p):
      return jnp.zeros(p.shape, moment_dtype_for(p.dtype, moment_dtype))

    return RotatedAdamState(jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "rotated_adam", "basis", "eigenbasis_refresh")

    def update_leaf(carrier: KroneckerUpdate, mu, nu):
      shape = carrier.layout.working_shape
      m = mu.reshape(shape)
      v = nu.reshape(shape)
      g = into_basis(carrier.grad, carrier.basis).astype(m.dtype)
      m = b1 * m + (1 - b1) * g
      v = b2 * v + (1 - b2) * jnp.square(g)
      direction = out_of_basis(m / (jnp.sqrt(v) + eps), carrier.basis)
      if normalize_grads:
        rms = jnp.sqrt(jnp.mean(jnp.square(direction)))
        direction = direction / (1e-30 + rms)
      if correct_bias:
        direction = direction * bias_correction(carrier.count, b1, b2, m.dtype)
      (m,), (v,) = carry_to_next_basis(carrier, (m,), (v,))

      live = is_live(carrier)
      new_mu = jnp.where(live, m.reshape(mu.shape), mu)
      new_nu = jnp.where(live, v.reshape(nu.shape), nu)
      update = carrier.restore(jnp.where(live, direction, 0))
      return update, new_mu, new_nu

    new_updates, mu, nu = per_parameter(update_leaf, 3, updates, state.mu, state.nu)
    return new_updates, RotatedAdamState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class RotatedAdafactorState(NamedTuple):
  """State of :func:`rotated_adafactor`.

  Attributes:
    mu: first moment in the eigenbasis, in the parameters' shapes.
    nu: per parameter, ``(row, col)``, the moving
      averages of the rotated squared gradient summed over the column and the row axis
      (``keepdims``), when the working shape has two axes or more; else ``(full,)``, an
      unfactored second moment.
  """

  mu: optax.Updates
  nu: optax.Updates


def factored_axes(shape) -> tuple[int, int] | None:
  """The two largest axes (row, column), as Adafactor factors them; None below two axes."""
  if len(shape) < 2:
    return None
  ranked = sorted(range(len(shape)), key=lambda i: shape[i])  # stable: ties keep axis order
  return ranked[-2], ranked[-1]


def _adafactor_second_moment(g2, nu, b2, axes):
  """Updates Adafactor's (row, col) or (full,) averages with ``g2`` and returns ``V``."""
  if axes is None:
    (full,) = nu
    full = b2 * full + (1 - b2) * g2
    return (full,), full
  row_axis, col_axis = axes
  row, col = nu
  row = b2 * row + (1 - b2) * jnp.sum(g2, axis=col_axis, keepdims=True)
  col = b2 * col + (1 - b2) * jnp.sum(g2, axis=row_axis, keepdims=True)
  v = row * col / jnp.sum(row, axis=row_axis, keepdims=True)
  return (row, col), v


def rotated_adafactor(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  layout: LayoutRule | None = None,
  eps2: float = 1e-30,
  correct_bias: bool = True,
  moment_dtype=None,
) -> optax.GradientTransformation:
  r"""Adafactor in the eigenbasis of the Kronecker factors.

  The SOAP paper shows that Shampoo with power 1/2 is Adafactor run in the eigenbasis of
  Shampoo's preconditioner. This block is that optimizer, with SOAP's conventions: the rotated
  gradient ``G'`` feeds a first moment ``m`` (in the eigenbasis) and Adafactor's factored second
  moment — moving averages ``r`` and ``c`` of the row and column sums of ``G'² + eps2`` over the
  two largest working axes, recombined as ``V = r cᵀ / Σr``. Parameters with fewer than two
  working axes keep an unfactored ``V``, as Adafactor does. The step is
  ``c_t · (m / (√V + eps))`` rotated back, ``c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)``; there is no update
  clipping and no parameter scaling. At a refresh ``m`` is rotated exactly and ``r``, ``c``
  permuted with the new column order.

  Args:
    b1: decay of the first moment.
    b2: decay of the factored second moment.
    eps: added to ``√V``.
    layout: the :class:`~soap_optax.LayoutRule` of the composition (the factored axes are those
      of the working shape, so the state's shapes depend on it).
    eps2: added to ``G'²`` before the sums (Adafactor's ε₁), so that ``Σr`` is never zero.
    correct_bias: apply the bias correction ``c_t``.
    moment_dtype: dtype of the moments (default float32, float64 for float64 params).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3).
    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  layout = layout or LayoutRule()

  def init_fn(params):
    def init_nu(p):
      dt = moment_dtype_for(p.dtype, moment_dtype)
      shape = layout.layout(p.shape).working_shape
      axes = factored_axes(shape)
      if axes is None:
        return (jnp.zeros(shape, dt),)
      row_shape, col_shape = list(shape), list(shape)
      row_shape[axes[1]] = 1
      col_shape[axes[0]] = 1
      return jnp.zeros(row_shape, dt), jnp.zeros(col_shape, dt)

    mu = jax.tree.map(lambda p: jnp.zeros(p.shape, moment_dtype_for(p.dtype, moment_dtype)), params)
    return RotatedAdafactorState(mu, per_leaf(init_nu, params))

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "rotated_adafactor", "basis", "eigenbasis_refresh")

    def update_leaf(carrier: KroneckerUpdate, mu, nu):
      check_layout(carrier, layout, "rotated_adafactor")
      m = mu.reshape(carrier.layout.working_shape)
      g = into_basis(carrier.grad, carrier.basis).astype(m.dtype)
      m = b1 * m + (1 - b1) * g
      axes = factored_axes(carrier.layout.working_shape)
      new_nu, v = _adafactor_second_moment(jnp.square(g) + eps2, nu, b2, axes)
      direction = out_of_basis(m / (jnp.sqrt(v) + eps), carrier.basis)
      if correct_bias:
        direction = direction * bias_correction(carrier.count, b1, b2, m.dtype)
      (m,), new_nu = carry_to_next_basis(carrier, (m,), new_nu)

      live = is_live(carrier)
      new_mu = jnp.where(live, m.reshape(mu.shape), mu)
      new_nu = tuple(jnp.where(live, n, o) for n, o in zip(new_nu, nu, strict=True))
      return carrier.restore(jnp.where(live, direction, 0)), new_mu, new_nu

    new_updates, mu, nu = per_parameter(update_leaf, 3, updates, state.mu, state.nu)
    return new_updates, RotatedAdafactorState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)


class EigenvalueCorrectedState(NamedTuple):
  """State of :func:`eigenvalue_corrected`.

  Attributes:
    mu: first moment, in the *parameter* basis.
    nu: corrected eigenvalues ``D``: the moving average of the squared gradient in the eigenbasis.
  """

  mu: optax.Updates
  nu: optax.Updates


def eigenvalue_corrected(
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  moment_dtype=None,
) -> optax.GradientTransformation:
  r"""Eigenvalue-corrected Shampoo (EShampoo): Shampoo's eigenbasis with Adam-like eigenvalues.

  Following *Purifying Shampoo* and Distributed Shampoo's eigenvalue-corrected preconditioner,
  the first moment stays in the parameter basis while the preconditioner's eigenvalues are
  replaced by a running second moment measured in the eigenbasis:

    M ← b1 M + (1 − b1) G,    D ← b2 D + (1 − b2) (G ×_k Q_kᵀ)^⊙2,
    u = [ (M̂ ×_k Q_kᵀ) / (√D̂ + eps) ] ×_k Q_k,   M̂ = M / (1 − b1ᵗ),  D̂ = D / (1 − b2ᵗ).

  ``eps`` is added after the bias correction (as Distributed Shampoo does; SOAP adds it before).
  The step uses the basis from before this step's refresh, like every block of the family, and
  ``D`` is permuted with the refresh's column order. With the identity basis this is Adam.

  Args:
    b1: decay of the first moment (in the parameter basis).
    b2: decay of the corrected eigenvalues.
    eps: added to ``√D̂``.
    moment_dtype: dtype of ``M`` and ``D`` (default float32, float64 for float64 params).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
    George et al., `Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis
    <https://arxiv.org/abs/1806.03884>`_, 2018.
  """

  def init_fn(params):
    def zeros(p):
      return jnp.zeros(p.shape, moment_dtype_for(p.dtype, moment_dtype))

    return EigenvalueCorrectedState(jax.tree.map(zeros, params), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "eigenvalue_corrected", "basis", "eigenbasis_refresh")

    def update_leaf(carrier: KroneckerUpdate, mu, nu):
      shape = carrier.layout.working_shape
      m = b1 * mu.reshape(shape) + (1 - b1) * carrier.grad.astype(mu.dtype)
      d = b2 * nu.reshape(shape) + (1 - b2) * jnp.square(
        into_basis(carrier.grad, carrier.basis).astype(nu.dtype)
      )
      t = jnp.maximum(carrier.count, 1).astype(m.dtype)
      m_hat = into_basis(m / (1 - b1**t), carrier.basis)
      d_hat = d / (1 - b2**t)
      direction = out_of_basis(m_hat / (jnp.sqrt(d_hat) + eps), carrier.basis)
      _, (d,) = carry_to_next_basis(carrier, (), (d,))

      live = is_live(carrier)
      new_mu = jnp.where(live, m.reshape(mu.shape), mu)
      new_nu = jnp.where(live, d.reshape(nu.shape), nu)
      return carrier.restore(jnp.where(live, direction, 0)), new_mu, new_nu

    new_updates, mu, nu = per_parameter(update_leaf, 3, updates, state.mu, state.nu)
    return new_updates, EigenvalueCorrectedState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)
