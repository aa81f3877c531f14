"""Adam run in the eigenbasis of the Kronecker factors (SOAP's inner optimizer)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from soap_optax._carrier import KroneckerUpdate, expect_carriers, per_parameter
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


def carry_to_next_basis(carrier: KroneckerUpdate, first_moments=(), diagonals=()):
  """Moves moments held in ``carrier.basis`` into ``carrier.next_basis``.

  First moments (vectors in the eigenbasis) are rotated exactly, ``m ← (Q_newᵀ Q_old) m`` per
  axis; diagonal statistics (second moments, corrected eigenvalues) cannot be rotated, so they are
  permuted with the refresh's column ``order``, as the SOAP reference does. The work is done
  under a ``lax.cond``: a step in which no factor was refreshed pays nothing.
  """
  refreshed = [r for r in carrier.refreshed if r is not None]
  if not refreshed:
    return tuple(first_moments), tuple(diagonals)

  def transfer(ms, ds):
    transitions = [
      None if q is None else jnp.matmul(qn.T, q, precision=lax.Precision.HIGHEST)
      for q, qn in zip(carrier.basis, carrier.next_basis)
    ]
    ms = tuple(mode_product(m, transitions, transpose=False) for m in ms)
    new_ds = []
    for d in ds:
      for axis, order in enumerate(carrier.order):
        if order is not None:
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
      t = jnp.maximum(carrier.count, 1).astype(m.dtype)
      if correct_bias:
        direction = direction * (jnp.sqrt(1 - b2**t) / (1 - b1**t))
      (m,), (v,) = carry_to_next_basis(carrier, (m,), (v,))

      # The first call only initialises; a non-finite step is skipped. Both keep the moments.
      live = carrier.finite & (carrier.count > 0)
      new_mu = jnp.where(live, m.reshape(mu.shape), mu)
      new_nu = jnp.where(live, v.reshape(nu.shape), nu)
      update = carrier.restore(jnp.where(live, direction, 0))
      return update, new_mu, new_nu

    new_updates, mu, nu = per_parameter(update_leaf, 3, updates, state.mu, state.nu)
    return new_updates, RotatedAdamState(mu, nu)

  return optax.GradientTransformation(init_fn, update_fn)
