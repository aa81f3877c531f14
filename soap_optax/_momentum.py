"""Momentum as a bias-corrected moving average, with its state in float32."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax._rotated import moment_dtype_for


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`."""

  count: jax.Array
  mu: optax.Updates


def ema_momentum(decay: float = 0.9, *, moment_dtype=None) -> optax.GradientTransformation:
  """``μ ← decay·μ + (1 − decay)·u``, returning ``μ / (1 − decayᵗ)``.

  ``optax.ema(decay, debias=True)`` with two differences that matter for low-precision
  parameters: the moving average is kept in float32 by default (float64 for float64 params) and
  the update is returned in each incoming update's dtype. Like ``optax.ema``, the count starts
  at the first call, which in the Kronecker family is the initialising one (zero update).

  Args:
    decay: the momentum coefficient, in ``[0, 1)``.
    moment_dtype: dtype of ``μ``; default ``promote_types(dtype, float32)``.

  Returns:
    An ``optax.GradientTransformation``.
  """

  def init_fn(params):
    def zeros(p):
      return jnp.zeros(p.shape, moment_dtype_for(p.dtype, moment_dtype))

    return EmaMomentumState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    mu = jax.tree.map(lambda u, m: decay * m + (1 - decay) * u.astype(m.dtype), updates, state.mu)

    def debias(m, u):
      return (m / (1 - decay ** count.astype(m.dtype))).astype(u.dtype)

    return jax.tree.map(debias, mu, updates), EmaMomentumState(count, mu)

  return optax.GradientTransformation(init_fn, update_fn)
