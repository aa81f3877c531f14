"""The optimizers, each a short ``optax.chain`` of the public blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from soap_optax import _checks
from soap_optax._eigenbasis import eigenbasis_refresh
from soap_optax._layout import LayoutRule
from soap_optax._momentum import ema_momentum
from soap_optax._rotated import eigenvalue_corrected, rotated_adafactor, rotated_adam
from soap_optax._shampoo import shampoo_precondition
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


def _check_common(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, precondition_frequency):
  _checks.check_learning_rate(learning_rate)
  _checks.check_unit_interval("b1", b1)
  _checks.check_unit_interval("b2", b2)
  if shampoo_beta is not None:
    _checks.check_unit_interval("shampoo_beta", shampoo_beta)
  _checks.check_nonnegative("eps", eps)
  _checks.check_nonnegative("weight_decay", weight_decay)
  _checks.check_positive_int("precondition_frequency", precondition_frequency)


def _kronecker_chain(
  direction,
  *,
  learning_rate,
  weight_decay,
  weight_decay_mask,
  beta,
  layout,
  precondition_frequency,
  stagger_refresh,
  stats_dtype,
  basis_dtype,
  **refresh_options,
):
  """The family's common frame around a ``direction`` block (or blocks).

  ``kronecker_stats → eigenbasis_refresh → direction → learning rate → after-step decay``,
  wrapped so that a step with a non-finite gradient is skipped.
  """
  tx = optax.chain(
    kronecker_stats(beta, layout=layout, dtype=stats_dtype),
    eigenbasis_refresh(
      precondition_frequency,
      layout=layout,
      stagger=stagger_refresh,
      dtype=stats_dtype if basis_dtype is None else basis_dtype,
      **refresh_options,
    ),
    *direction,
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_step(learning_rate, weight_decay, weight_decay_mask),
  )
  return optax.with_extra_args_support(skip_nonfinite_steps(tx))


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
  stagger_refresh: bool = False,
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
    stagger_refresh: spread the factors' refreshes over each window of
      ``precondition_frequency`` steps instead of refreshing all at once (same work, no slow
      step; changes the schedule, so off by default).
    stats_dtype: dtype of the factor statistics (default float32, float64 for float64 params).
    basis_dtype: dtype of the eigenbases (default: as the statistics).
    moment_dtype: dtype of Adam's moments (default float32, float64 for float64 params).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _check_common(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, precondition_frequency)
  layout = LayoutRule(max_precond_dim, merge_dims, precondition_1d)
  return _kronecker_chain(
    (
      rotated_adam(
        b1,
        b2,
        eps,
        correct_bias=correct_bias,
        normalize_grads=normalize_grads,
        moment_dtype=moment_dtype,
      ),
    ),
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    beta=b2 if shampoo_beta is None else shampoo_beta,
    layout=layout,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    stats_dtype=stats_dtype,
    basis_dtype=basis_dtype,
  )


def shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  shampoo_beta: float | None = None,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  precondition_frequency: int = 10,
  max_precond_dim: int = 10000,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  exponent: float = 0.5,
  trace_scaling: bool = False,
  grafting: str = "adam",
  graft_eps: float = 1e-8,
  *,
  relative_eps: bool = True,
  method: str = "eigh",
  refresh_tolerance: float = 0.0,
  max_qr_iterations: int = 1,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  stagger_refresh: bool = False,
  stats_dtype=None,
  basis_dtype=None,
  moment_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  """Shampoo (power 1/2 by default) with Adam grafting and momentum.

  Composition::

    chain(kronecker_stats(b2), eigenbasis_refresh(precondition_frequency, method="eigh"),
          shampoo_precondition(exponent, eps, grafting="adam"), ema_momentum(b1),
          scale_by_learning_rate(learning_rate), add_decayed_weights_after_step(...))

  The preconditioner ``(L_k + ε)^(−exponent)`` is recomputed (``eigh``) every
  ``precondition_frequency`` updates from the factor statistics; between refreshes it is stale,
  as in every practical Shampoo. The grafted step (layer-wise norm of an Adam step without
  momentum, Distributed Shampoo's grafting) is smoothed by a bias-corrected moving average
  ``optax.ema(b1)``; its count includes the initialising first call.

  Args:
    learning_rate: learning rate or schedule.
    b1: momentum (moving average of the grafted step).
    b2: decay of the factor statistics and of the grafting's second moment.
    shampoo_beta: decay of the factor statistics if it should differ from ``b2``.
    eps: damping added to every factor eigenvalue before the inverse root, relative to the
      factor's largest eigenvalue (see :func:`~soap_optax.shampoo_precondition`).
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: recompute the preconditioner every this many updates.
    max_precond_dim: axes longer than this are not preconditioned.
    merge_dims: merge consecutive axes while their product is at most ``max_precond_dim``.
    precondition_1d: precondition 1-D parameters too.
    exponent: inverse root of each factor (0.5: the SOAP paper's Shampoo-1/2; 0.25: original).
    trace_scaling: the SOAP paper's scalar correction ``tr(L)^(exponent·(K−1))``.
    grafting: ``"adam"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
    graft_eps: epsilon of the grafted optimizer.
    relative_eps: scale ``eps`` by each factor's largest eigenvalue (else absolute).
    method: ``"eigh"`` (exact) or ``"qr"`` (warm-started power iteration) for the refresh.
    refresh_tolerance: adaptive skip test of the refresh (0 refreshes on every schedule).
    max_qr_iterations: QR iterations per refresh when ``method="qr"``.
    weight_decay_mask: which parameters to decay.
    stagger_refresh: spread the factors' refreshes over each window of
      ``precondition_frequency`` steps instead of refreshing all at once (same work, no slow
      step; changes the schedule, so off by default).
    stats_dtype: dtype of the factor statistics.
    basis_dtype: dtype of the eigenbases.
    moment_dtype: dtype of the grafting state and of the momentum.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _check_common(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, precondition_frequency)
  _checks.check_positive("exponent", exponent)
  _checks.check_nonnegative("graft_eps", graft_eps)
  _checks.check_unit_interval("refresh_tolerance", refresh_tolerance, closed=True)
  layout = LayoutRule(max_precond_dim, merge_dims, precondition_1d)
  return _kronecker_chain(
    (
      shampoo_precondition(
        exponent,
        eps,
        relative_eps=relative_eps,
        trace_scaling=trace_scaling,
        grafting=grafting,
        graft_b2=b2,
        graft_eps=graft_eps,
        moment_dtype=moment_dtype,
      ),
      ema_momentum(b1, moment_dtype=moment_dtype),
    ),
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    beta=b2 if shampoo_beta is None else shampoo_beta,
    layout=layout,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    stats_dtype=stats_dtype,
    basis_dtype=basis_dtype,
    refresh_tolerance=refresh_tolerance,
    max_qr_iterations=max_qr_iterations,
    method=method,
  )


def eigen_adafactor(
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
  correct_bias: bool = True,
  *,
  eps2: float = 1e-30,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  stagger_refresh: bool = False,
  stats_dtype=None,
  basis_dtype=None,
  moment_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor in the eigenbasis of Shampoo's preconditioner (the SOAP paper's Shampoo-1/2).

  Composition::

    chain(kronecker_stats(b2), eigenbasis_refresh(precondition_frequency),
          rotated_adafactor(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  Same conventions and defaults as :func:`soap`, with Adafactor's factored second moment in place
  of Adam's: it stores ``m + n`` numbers per matrix instead of ``m·n``.

  Args:
    learning_rate: learning rate or schedule.
    b1: first-moment decay in the eigenbasis.
    b2: decay of the factored second moment.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√V``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: refresh the eigenbases every this many updates.
    max_precond_dim: axes longer than this are not rotated.
    merge_dims: merge consecutive axes while their product is at most ``max_precond_dim``.
    precondition_1d: rotate 1-D parameters too.
    correct_bias: use Adam's bias correction.
    eps2: Adafactor's ε₁, added to the squared rotated gradient.
    weight_decay_mask: which parameters to decay.
    stagger_refresh: spread the factors' refreshes over each window of
      ``precondition_frequency`` steps instead of refreshing all at once (same work, no slow
      step; changes the schedule, so off by default).
    stats_dtype: dtype of the factor statistics.
    basis_dtype: dtype of the eigenbases.
    moment_dtype: dtype of the moments.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _check_common(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, precondition_frequency)
  _checks.check_nonnegative("eps2", eps2)
  layout = LayoutRule(max_precond_dim, merge_dims, precondition_1d)
  return _kronecker_chain(
    (
      rotated_adafactor(
        b1,
        b2,
        eps,
        layout=layout,
        eps2=eps2,
        correct_bias=correct_bias,
        moment_dtype=moment_dtype,
      ),
    ),
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    beta=b2 if shampoo_beta is None else shampoo_beta,
    layout=layout,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    stats_dtype=stats_dtype,
    basis_dtype=basis_dtype,
  )


def eshampoo(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: float = 0.9,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  precondition_frequency: int = 10,
  max_precond_dim: int = 10000,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  refresh_tolerance: float = 0.01,
  max_qr_iterations: int = 3,
  *,
  weight_decay_mask: Any | Callable[[optax.Params], Any] | None = None,
  stagger_refresh: bool = False,
  stats_dtype=None,
  basis_dtype=None,
  moment_dtype=None,
) -> optax.GradientTransformationExtraArgs:
  """Eigenvalue-corrected Shampoo with the adaptive eigenbasis refresh of *Purifying Shampoo*.

  Composition::

    chain(kronecker_stats(b2),
          eigenbasis_refresh(precondition_frequency, refresh_tolerance=τ, max_qr_iterations=k),
          eigenvalue_corrected(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  Every ``precondition_frequency`` updates each factor's basis is tested
  (``‖B − diag(B)‖_F ≤ τ‖B‖_F`` with ``B = QᵀLQ``) and refreshed by warm-started QR iterations only
  when it has gone stale, so that well-converged factors cost almost nothing.

  Args:
    learning_rate: learning rate or schedule.
    b1: first-moment decay (parameter basis).
    b2: decay of the corrected eigenvalues.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√D̂``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: how often the bases are tested (and refreshed when stale).
    max_precond_dim: axes longer than this are not rotated.
    merge_dims: merge consecutive axes while their product is at most ``max_precond_dim``.
    precondition_1d: rotate 1-D parameters too.
    refresh_tolerance: τ in ``[0, 1]``; 0 refreshes every factor on every schedule.
    max_qr_iterations: the most warm-started QR iterations per refresh.
    weight_decay_mask: which parameters to decay.
    stagger_refresh: spread the factors' refreshes over each window of
      ``precondition_frequency`` steps instead of refreshing all at once (same work, no slow
      step; changes the schedule, so off by default).
    stats_dtype: dtype of the factor statistics.
    basis_dtype: dtype of the eigenbases.
    moment_dtype: dtype of the moments.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  _check_common(learning_rate, b1, b2, shampoo_beta, eps, weight_decay, precondition_frequency)
  _checks.check_unit_interval("refresh_tolerance", refresh_tolerance, closed=True)
  _checks.check_positive_int("max_qr_iterations", max_qr_iterations)
  layout = LayoutRule(max_precond_dim, merge_dims, precondition_1d)
  return _kronecker_chain(
    (eigenvalue_corrected(b1, b2, eps, moment_dtype=moment_dtype),),
    learning_rate=learning_rate,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    beta=b2 if shampoo_beta is None else shampoo_beta,
    layout=layout,
    precondition_frequency=precondition_frequency,
    stagger_refresh=stagger_refresh,
    stats_dtype=stats_dtype,
    basis_dtype=basis_dtype,
    refresh_tolerance=refresh_tolerance,
    max_qr_iterations=max_qr_iterations,
  )
