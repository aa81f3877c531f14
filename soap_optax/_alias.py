"""The optimizers, each a short ``optax.chain`` of the public blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax._eigenbasis import eigenbasis_refresh
from soap_optax._layout import LayoutRule
from soap_optax._rotated import rotated_adam
from soap_optax._stats import kronecker_stats
from soap_optax._weight_decay import add_decayed_weights_after_step

# apply_if_finite gives up after this many consecutive bad steps and applies them anyway; we
# never want that, so the limit is the largest count its int32 counter can hold.
_NEVER = int(jnp.iinfo(jnp.int32).max)


def skip_nonfinite_steps(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``tx`` so that a step with a NaN or Inf gradient is skipped: zero update, state kept.

  This is ``optax.apply_if_finite`` that never gives up; its state counts the skipped steps
  (``total_notfinite``), which is worth logging.
  """
  return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER)


def soap(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: float = 0.95,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  precondition_frequency: int = 10,
  max_precond_dim: int = 10000,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  correct_bias: bool = True,
  *,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  stats_dtype=None,
  basis_dtype=None,
  moment_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

  Composition::

    chain(kronecker_stats(shampoo_beta), eigenbasis_refresh(precondition_frequency),
          rotated_adam(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  wrapped so that a step with a non-finite gradient is skipped (zero update, state kept). With
  the defaults it reproduces the authors' PyTorch SOAP step for step: the first call only
  initialises the statistics and the bases (zero update, no decay); each step's basis predates its
  gradient; the bases are refreshed (sorted power step + QR) at updates 10, 20, …; the step size
  is ``lr·√(1−b2ᵗ)/(1−b1ᵗ)`` with ``eps`` added to ``√v``; weight decay ``p ← p − lr·wd·p`` is
  applied after the step.

  Args:
    learning_rate: learning rate or schedule (called with the update count, from 0).
    b1: Adam's first-moment decay in the eigenbasis.
    b2: Adam's second-moment decay in the eigenbasis.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√v``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: refresh the eigenbases every this many updates.
    max_precond_dim: axes longer than this are not rotated (0 gives Adam).
    merge_dims: merge consecutive axes while their product is at most ``max_precond_dim``.
    precondition_1d: rotate 1-D parameters too.
    normalize_grads: divide each parameter's direction by its RMS.
    correct_bias: use Adam's bias correction.
    weight_decay_mask: which parameters to decay (tree of bools or a function of the params);
      ``None`` decays all, as the reference does.
    stats_dtype: dtype of the factor statistics (default float32, float64 for float64 params).
    basis_dtype: dtype of the eigenbases (default: as the statistics).
    moment_dtype: dtype of Adam's moments (default float32, float64 for float64 params).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _checks.check_learning_rate(learning_rate)
  _checks.check_unit_interval("b1", b1)
  _checks.check_unit_interval("b2", b2)
  if shampoo_beta is not None:
    _checks.check_unit_interval("shampoo_beta", shampoo_beta)
  _checks.check_nonnegative("eps", eps)
  _checks.check_nonnegative("weight_decay", weight_decay)
  _checks.check_positive_int("precondition_frequency", precondition_frequency)
  layout = LayoutRule(max_precond_dim, merge_dims, precondition_1d)

  tx = optax.chain(
    kronecker_stats(b2 if shampoo_beta is None else shampoo_beta, layout=layout, dtype=stats_dtype),
    eigenbasis_refresh(precondition_frequency, layout=layout, dtype=basis_dtype),
    rotated_adam(
      b1,
      b2,
      eps,
      correct_bias=correct_bias,
      normalize_grads=normalize_grads,
      moment_dtype=moment_dtype,
    ),
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_step(learning_rate, weight_decay, weight_decay_mask),
  )
  return optax.with_extra_args_support(skip_nonfinite_steps(tx))
