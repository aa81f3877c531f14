"""Shampoo's preconditioner applied through the eigendecompositions of its factors."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from soap_optax import _checks, _grafting
from soap_optax._grafting import Grafting
from soap_optax._layout import LayoutRule
from soap_optax._linalg import MatmulPrecision, debias
from soap_optax._rotated import Moment, eigenbasis_optimizer


class ShampooPreconditionState(NamedTuple):
  """State of :func:`shampoo_precondition`.

  Attributes:
    mu: the filtered gradient (EMA of the gradient with ``b1``) in the parameter basis, or
      ``optax.EmptyState()`` when ``b1`` is 0.
    graft_nu: the grafted optimizer's second moment in the parameter basis, or
      ``optax.EmptyState()`` when the grafting needs none.

  With ``LayoutRule(group_equal_layouts=True)`` every field is instead a flat dict keyed by group
  (as the statistics are), each entry in the group's working layout ``(num_blocks, *block)``.
  """

  mu: optax.Updates
  graft_nu: optax.Updates


def _inverse_roots(carrier, exponent, eps, relative_eps):
  """Per factored axis, ``(max(λ, 0) + ε)^(−exponent)`` per block, zero on the padding."""
  scales: list[jax.Array | None] = []
  for axis, w in enumerate(carrier.eigenvalues):
    if w is None:
      scales.append(None)
      continue
    # Eigenvalues of a PSD matrix computed in floating point can come out slightly negative.
    w = jnp.maximum(w, 0)
    # Eigenvalues below rounding level (≈ 1e-7·λ_max in float32) are noise; an absolute ε tiny
    # enough not to bias the large ones would raise that noise to the power −exponent.
    damping = eps * jnp.max(w, axis=-1, keepdims=True) if relative_eps else eps
    # A factor with no statistics yet (all zero, no damping) carries no information: no step
    # along it, rather than 0 · ∞.
    damped = w + damping
    scale = jnp.where(damped > 0, jnp.where(damped > 0, damped, 1) ** (-exponent), 0)
    padding = carrier.layout.padding(axis)
    scales.append(scale if padding is None else jnp.where(padding, 0, scale))
  return scales


def _outer(per_axis, ndim: int):
  """The outer product of per-axis ``(num_blocks, n)`` vectors, broadcastable to ``ndim``."""
  scale = 1.0
  for axis, vec in enumerate(per_axis):
    if vec is not None:
      shape = [vec.shape[0]] + [1] * (ndim - 1)
      shape[axis + 1] = vec.shape[1]
      scale = scale * vec.reshape(shape)
  return scale


def shampoo_precondition(
  exponent: float = 0.5,
  eps: float = 1e-6,
  *,
  b1: float = 0.0,
  relative_eps: bool = True,
  trace_scaling: bool = False,
  grafting: Grafting = "adam",
  graft_b2: float = 0.999,
  graft_eps: float = 1e-8,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  precision: MatmulPrecision = "highest",
  layout: LayoutRule | None = None,
) -> optax.GradientTransformation:
  r"""Preconditions with Shampoo's factors: ``M̂ ×_k (L_k + ε)^(−exponent)``, optionally grafted.

  Uses the bases ``Q_k`` and eigenvalue estimates ``λ_k`` provided by
  :func:`~soap_optax.eigenbasis_refresh` (from its last refresh, so stale in between, like
  Shampoo's inverse roots). Per factored axis the preconditioner is
  ``Q_k diag((max(λ_k, 0) + ε_k)^(−exponent)) Q_kᵀ``: ε_k is added to each eigenvalue *before*
  the inverse root, i.e. to the factor itself (``(L_k + ε_k I)^(−exponent)``). With
  ``relative_eps`` (the default) ``ε_k = eps · max(λ_k)``, so the damping follows the scale of
  the statistics; otherwise ``ε_k = eps`` (Distributed Shampoo's form, whose default 1e-12 is
  meant for float64 roots: in float32 it lets rounding noise in near-null directions dominate the
  step, and left the example language model at loss 4.1 where ``eps=1e-6`` reached 2.5).
  ``exponent=0.5`` is the SOAP paper's Shampoo with power 1/2 (``L^(−1/2) G R^(−1/2)``);
  ``exponent=0.25`` is the original Shampoo ``L^(−1/4) G R^(−1/4)``. The rotation never forms an
  inverse root: the vector is rotated into the eigenbases, scaled coordinate-wise and rotated
  back.

  The exponent belongs to each factored axis and does not depend on how many there are: the
  preconditioner is ``H^(−exponent)`` for ``H = ⊗_k L_k`` with the identity on every axis that
  has no factor (left out by ``max_precond_dim`` or by the rule's ``factor_axes``). A matrix
  with its right side left out is stepped by ``(L + ε)^(−exponent) M̂``: with the default 0.5,
  the inverse square root of one-sided Shampoo (full-matrix AdaGrad over the rows), which is
  what Google's Distributed Shampoo computes for a one-sided preconditioner, its root ``2K``
  counting the ``K`` preconditioned axes. ``exponent=0.25`` stays 0.25 on a one-sided
  parameter (no re-derivation from ``K``), and ``trace_scaling``'s ``tr(L)^(exponent·(K−1))`` is
  1 there.

  What is preconditioned is Distributed Shampoo's filtered gradient ``M̂``: with ``b1 > 0``,
  ``M ← b1 M + (1 − b1) G`` bias-corrected by the number of real updates (so the first real step
  is a full step), else the gradient itself. Grafting (layer-wise learning-rate grafting) keeps
  Shampoo's direction but takes, per block, the norm of another optimizer's step on ``M̂``:
  ``"sgd"`` (``M̂``), ``"rmsprop"`` or ``"adam"`` (``M̂ / (√ν + graft_eps)``, ``ν`` an EMA of the
  raw ``G²``; ``"adam"`` bias-corrects ``ν``), or ``"none"``. A parameter with no factored axis
  takes the grafted optimizer's step itself (``M̂`` when grafting is ``"none"``).

  Args:
    exponent: the inverse root applied to each factor (> 0).
    eps: damping added to every eigenvalue before the root (relative, see above).
    b1: Distributed Shampoo's gradient filtering (``betas[0]``), in ``[0, 1)``.
    relative_eps: scale ``eps`` by each factor's largest eigenvalue.
    trace_scaling: multiply by ``tr(L)^(exponent·(K−1))`` for K factored axes (the SOAP paper's
      scalar correction of Algorithm 1 that makes Shampoo-1/2 equal Adafactor in the eigenbasis).
    grafting: ``"none"``, ``"sgd"``, ``"rmsprop"`` or ``"adam"``.
    graft_b2: decay of the grafted optimizer's second moment.
    graft_eps: the grafted optimizer's epsilon.
    moment_dtype: storage dtype of ``M`` and ``ν`` (default float32, float64 for float64
      params).
    mu_dtype: storage dtype of ``M`` alone, overriding ``moment_dtype`` for it.
    precision: of the rotations' matmuls: ``"highest"`` (the default), ``"high"``,
      ``"default"``, ``"bfloat16"`` or a ``jax.lax.Precision`` (see
      :func:`~soap_optax.kronecker_stats`).
    layout: the :class:`~soap_optax.LayoutRule` of the composition; needed only when it groups
      parameters (``group_equal_layouts``), whose moments are then kept per group.

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`;
    it returns plain update arrays in each parameter's shape (float32 for low-precision
    parameters).

  Examples:
    >>> rule = soap_optax.LayoutRule()
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.999, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule, method="eigh"),
    ...   soap_optax.shampoo_precondition(0.5, b1=0.9, grafting="adam"),
    ... )
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones((3, 2))}, state)  # initialises
    >>> updates, state = tx.update({"w": jnp.ones((3, 2))}, state)
    >>> float(jnp.linalg.norm(updates["w"]))  # Adam's first step: norm √6
    2.449...

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
    Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023.
  """
  _grafting.check_grafting(grafting)
  _checks.check_positive("exponent", exponent)
  _checks.check_nonnegative("eps", eps)
  _checks.check_unit_interval("b1", b1)
  _checks.check_unit_interval("graft_b2", graft_b2)
  _checks.check_nonnegative("graft_eps", graft_eps)
  _checks.check_float_dtype("moment_dtype", moment_dtype)
  _checks.check_float_dtype("mu_dtype", mu_dtype)
  filtered = not (isinstance(b1, (int, float)) and b1 == 0)
  moments = []
  if filtered:
    moments.append(Moment("mu", "parameter"))
  if _grafting.needs_second_moment(grafting):
    moments.append(Moment("graft_nu", "parameter"))

  def direction(carrier, moments, rotation):
    new = {}
    vector = carrier.grad
    if filtered:
      new["mu"] = optax.tree.update_moment(carrier.grad, moments["mu"], b1, 1)
      vector = new["mu"] / debias(b1, carrier.count, vector.dtype)
    nu = None
    if "graft_nu" in moments:
      nu = new["graft_nu"] = _grafting.update_second_moment(
        moments["graft_nu"], carrier.grad, graft_b2
      )
    grafted = _grafting.grafted_step(grafting, vector, nu, carrier.count, graft_b2, graft_eps)
    if carrier.layout.num_factors == 0:
      return (vector if grafted is None else grafted), new
    scales = _inverse_roots(carrier, exponent, eps, relative_eps)
    step = rotation.out(rotation.into(vector) * _outer(scales, vector.ndim))
    if trace_scaling:
      # Ĥ = ⊗_k L_k / tr(L)^(K−1) matches the scale of E[g gᵀ] (tr L_k = E‖G‖² for every k), so
      # Ĥ^(−e) carries the scalar tr(L)^(e(K−1)); for a matrix and e = 1/2, the SOAP paper's
      # tr(L)^(1/2).
      factored = [w for w in carrier.eigenvalues if w is not None]
      trace = jnp.sum(jnp.maximum(factored[0], 0), axis=-1)
      power = trace ** (exponent * (len(factored) - 1))
      step = step * power.reshape((-1,) + (1,) * (step.ndim - 1))
    if grafted is not None:
      step = _grafting.graft(step, grafted)
    return step, new

  def state_type(*fields):
    values = dict(zip((m.name for m in moments), fields, strict=True))
    empty = optax.EmptyState()
    return ShampooPreconditionState(values.get("mu", empty), values.get("graft_nu", empty))

  return eigenbasis_optimizer(
    "shampoo_precondition",
    moments,
    direction,
    state_type,
    moment_dtype=moment_dtype,
    moment_dtypes={"mu": mu_dtype},
    needs="eigenvalues",
    layout=layout,
    precision=precision,
  )
