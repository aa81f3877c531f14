"""The Kronecker factor statistics ``L_k ← β L_k + (1 − β) G_(k) G_(k)ᵀ``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _linalg
from soap_optax._carrier import KroneckerUpdate, per_leaf, per_parameter
from soap_optax._layout import LayoutRule


class KroneckerStatsState(NamedTuple):
  """State of :func:`kronecker_stats`.

  Attributes:
    count: number of updates made so far (skipped, non-finite steps not counted).
    stats: per parameter, a tuple with one factor statistic per working axis (``None`` for an
      axis without a factor).
  """

  count: jax.Array
  stats: optax.Params


def _stats_dtype(param_dtype, dtype):
  # Statistics are at least float32 (bf16 gradients would lose the small eigenvalues), and
  # float64 when the parameters are.
  return jnp.dtype(dtype) if dtype is not None else jnp.promote_types(param_dtype, jnp.float32)


def kronecker_stats(
  beta: float = 0.95,
  *,
  layout: LayoutRule | None = None,
  dtype=None,
) -> optax.GradientTransformation:
  """Accumulates Shampoo's Kronecker factor statistics; the first block of every composition.

  For each parameter and each axis ``k`` that the layout gives a factor, keeps an exponential
  moving average (not bias-corrected, as in the SOAP reference) of ``G_(k) G_(k)ᵀ``, the
  gradient contracted with itself over all other axes. For a matrix these are Shampoo's ``L`` and
  ``R``.

  Each gradient leaf is passed on as a :class:`~soap_optax.KroneckerUpdate` that carries the
  reshaped gradient, the updated statistics and the step count to the blocks after it. If any
  gradient of the tree holds a NaN or an Inf, the step is marked non-finite: the statistics and
  the count are kept, and the later blocks skip the step too.

  Args:
    beta: decay of the moving average (SOAP's ``shampoo_beta``), in ``[0, 1)``.
    layout: the :class:`~soap_optax.LayoutRule` shared by all blocks of the composition.
    dtype: dtype of the statistics; by default float32, or float64 for float64 parameters.

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  layout = layout or LayoutRule()

  def init_fn(params):
    def init_leaf(p):
      dt = _stats_dtype(p.dtype, dtype)
      sizes = layout.layout(p.shape).factor_sizes
      return tuple(None if n is None else jnp.zeros((n, n), dt) for n in sizes)

    return KroneckerStatsState(jnp.zeros([], jnp.int32), per_leaf(init_leaf, params))

  def update_fn(updates, state, params=None):
    del params
    finite = _linalg.all_finite(jax.tree.leaves(updates))

    def update_leaf(g, stats):
      lay = layout.layout(g.shape)
      dt = _stats_dtype(g.dtype, dtype)
      working = g.astype(dt).reshape(lay.working_shape)
      new_stats = tuple(
        None if s is None else jnp.where(finite, _ema(s, working, k), s)
        for k, s in enumerate(stats)
      )
      carrier = KroneckerUpdate(
        grad=working,
        count=state.count,
        finite=finite,
        stats=new_stats,
        layout=lay,
        dtype=g.dtype,
      )
      return carrier, new_stats

    def _ema(s, working, k):
      return beta * s + (1 - beta) * _linalg.factor_statistic(working, k).astype(s.dtype)

    carriers, new_stats = per_parameter(update_leaf, 2, updates, state.stats)
    count = state.count + finite.astype(jnp.int32)
    return carriers, KroneckerStatsState(count, new_stats)

  return optax.GradientTransformation(init_fn, update_fn)
