"""Momentum as a bias-corrected moving average, with its state in float32.

Deprecated (``soap_optax.ema_momentum`` warns): no optimizer of the family uses it since Shampoo
filters the gradient before preconditioning, and ``optax.ema(decay, debias=True,
accumulator_dtype=jnp.float32)`` covers its use. Removed in the next release.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from soap_optax import _checks
from soap_optax._carrier import storage_dtype

EmaMomentumState = optax.EmaState


def ema_momentum(decay: float = 0.9, *, moment_dtype: DTypeLike | None = None):
  """``optax.ema(decay, debias=True)`` whose average is float32 for low-precision updates.

  ``optax.ema`` keeps its average in the updates' dtype (or one ``accumulator_dtype`` for the
  whole tree); here each leaf's average is at least float32 (float64 for float64 updates, or
  ``moment_dtype``), and each update comes back in its incoming dtype. Like ``optax.ema``, the
  debiasing counts every call. (The family's Shampoo no longer uses it: it filters the gradient
  before preconditioning, see :func:`~soap_optax.shampoo_precondition`.)

  Args:
    decay: the momentum coefficient, in ``[0, 1)``.
    moment_dtype: storage dtype of the average; default ``promote_types(dtype, float32)``.

  Returns:
    An ``optax.GradientTransformation`` whose state is an ``optax.EmaState``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from soap_optax._momentum import ema_momentum
    >>> tx = ema_momentum(0.9)
    >>> u = {"w": jnp.ones(2, jnp.bfloat16)}
    >>> state = tx.init(u)
    >>> state.ema["w"].dtype, tx.update(u, state)[0]["w"].dtype
    (dtype('float32'), dtype(bfloat16))
  """
  _checks.check_unit_interval("decay", decay)
  _checks.check_float_dtype("moment_dtype", moment_dtype)
  inner = optax.ema(decay, debias=True)

  def init_fn(params):
    def zeros(p):
      return jnp.zeros_like(p, dtype=storage_dtype(p.dtype, moment_dtype))

    return inner.init(jax.tree.map(zeros, params))

  def update_fn(updates, state, params=None):
    del params
    widened = jax.tree.map(lambda u, m: u.astype(m.dtype), updates, state.ema)
    averaged, state = inner.update(widened, state)
    return jax.tree.map(lambda a, u: a.astype(u.dtype), averaged, updates), state

  return optax.GradientTransformation(init_fn, update_fn)
