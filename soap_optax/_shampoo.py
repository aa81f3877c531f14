"""Shampoo's preconditioner applied through the eigendecompositions of its factors."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax._carrier import KroneckerUpdate, expect_carriers, per_leaf, per_parameter
from soap_optax._rotated import diagonal_scaling, into_basis, moment_dtype_for, out_of_basis

GRAFTING = ("none", "sgd", "rmsprop", "adam")


class ShampooPreconditionState(NamedTuple):
  """State of :func:`shampoo_precondition`.

  Attributes:
    graft_nu: the grafted optimizer's diagonal second moment, in the parameter basis (``None``
      per parameter when the grafting needs none).
  """

  graft_nu: optax.Updates


def _root_scale(eigenvalues, exponent, eps, relative_eps):
  # Eigenvalues of a PSD matrix computed in floating point can come out slightly negative.
  eigenvalues = jnp.maximum(eigenvalues, 0)
  if relative_eps:
    # Eigenvalues below rounding level (≈ 1e-7·λ_max in float32) are noise; an absolute ε tiny
    # enough not to bias the large ones would raise that noise to the power −exponent.
    eps = eps * jnp.max(eigenvalues)
  return (eigenvalues + eps) ** (-exponent)


def shampoo_direction(
  carrier: KroneckerUpdate, exponent, eps, trace_scaling: bool, relative_eps: bool = False
):
  """``G ×_k Q_k diag((λ_k + ε)^(−exponent)) Q_kᵀ`` for the factored axes of one parameter.

  The inverse roots are never formed: the gradient is rotated into the eigenbases, scaled
  coordinate-wise by the outer product of the per-axis factors, and rotated back, which costs
  two mode products per axis instead of an ``n³`` matrix product per factor.
  """
  scales = [
    None if w is None else _root_scale(w, exponent, eps, relative_eps).astype(carrier.grad.dtype)
    for w in carrier.eigenvalues
  ]
  rotated = into_basis(carrier.grad, carrier.basis)
  direction = out_of_basis(rotated * diagonal_scaling(scales, rotated.ndim), carrier.basis)
  if trace_scaling:
    # Ĥ = ⊗_k L_k / tr(L)^(K−1) matches the scale of E[g gᵀ] (tr L_k = E‖G‖² for every k), so
    # Ĥ^(−e) carries the scalar tr(L)^(e(K−1)); for a matrix and e = 1/2, the SOAP paper's
    # tr(L)^(1/2).
    factored = [w for w in carrier.eigenvalues if w is not None]
    trace = jnp.sum(jnp.maximum(factored[0], 0))
    direction = direction * trace ** (exponent * (len(factored) - 1))
  return direction


def shampoo_precondition(
  exponent: float = 0.5,
  eps: float = 1e-6,
  *,
  relative_eps: bool = True,
  trace_scaling: bool = False,
  grafting: str = "adam",
  graft_b2: float = 0.999,
  graft_eps: float = 1e-8,
  moment_dtype=None,
) -> optax.GradientTransformation:
  r"""Preconditions with Shampoo's factors: ``G ×_k (L_k + ε)^(−exponent)``, optionally grafted.

  Uses the bases ``Q_k`` and eigenvalue estimates ``λ_k`` provided by
  :func:`~soap_optax.eigenbasis_refresh` (from its last refresh, so stale in between, like
  Shampoo's inverse roots). Per factored axis the preconditioner is
  ``Q_k diag((max(λ_k, 0) + ε_k)^(−exponent)) Q_kᵀ``: ε_k is added to each eigenvalue *before*
  the inverse root, i.e. to the factor itself (``(L_k + ε_k I)^(−exponent)``). With
  ``relative_eps`` (the default) ``ε_k = eps · max(λ_k)``, so the damping follows the scale of
  the statistics; otherwise ``ε_k = eps``. (An absolute 1e-12, Distributed Shampoo's default for
  float64 roots, lets float32 rounding noise in near-null directions dominate the step: on the
  example language model it left the loss at 4.1 where ``eps=1e-6`` reached 2.5.)
  ``exponent=0.5`` is the SOAP paper's Shampoo with power 1/2 (``Ĥ^(−1/2)`` with ``Ĥ = L ⊗ R``, i.e.
  ``L^(−1/2) G R^(−1/2)``); ``exponent=0.25`` is the original Shampoo ``L^(−1/4) G R^(−1/4)``.

  Grafting (Distributed Shampoo's layer-wise learning-rate grafting) keeps Shampoo's direction
  but takes the norm of another optimizer's step on the same gradient: ``"sgd"`` (the gradient),
  ``"rmsprop"`` or ``"adam"`` (``G / (√ν + graft_eps)``, with ``ν`` an EMA of ``G²``; ``"adam"``
  bias-corrects ``ν``), or ``"none"``. A parameter with no factored axis takes the grafted
  optimizer's step itself (the gradient when grafting is ``"none"``).

  Args:
    exponent: the inverse root applied to each factor (> 0).
    eps: damping added to every eigenvalue before the root (relative, see above).
    relative_eps: scale ``eps`` by each factor's largest eigenvalue.
    trace_scaling: multiply by ``tr(L)^(exponent·(K−1))`` for K factored axes (the SOAP paper's
      scalar correction of Algorithm 1 that makes Shampoo-1/2 equal Adafactor in the eigenbasis).
    grafting: ``"none"``, ``"sgd"``, ``"rmsprop"`` or ``"adam"``.
    graft_b2: decay of the grafted optimizer's second moment.
    graft_eps: the grafted optimizer's epsilon.
    moment_dtype: dtype of the grafting state (default float32, float64 for float64 params).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`;
    it returns plain update arrays in each parameter's shape and dtype.

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Shi et al., `A Distributed Data-Parallel PyTorch Implementation of the Distributed Shampoo
    Optimizer <https://arxiv.org/abs/2309.06497>`_, 2023.
  """
  if grafting not in GRAFTING:
    raise ValueError(f"grafting must be one of {GRAFTING}, got {grafting!r}.")
  needs_nu = grafting in ("rmsprop", "adam")

  def init_fn(params):
    if not needs_nu:
      return ShampooPreconditionState(per_leaf(lambda p: None, params))

    def init_leaf(p):
      return jnp.zeros(p.shape, moment_dtype_for(p.dtype, moment_dtype))

    return ShampooPreconditionState(jax.tree.map(init_leaf, params))

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "shampoo_precondition", "eigenvalues", "eigenbasis_refresh")

    def update_leaf(carrier: KroneckerUpdate, nu):
      live = carrier.finite & (carrier.count > 0)
      g = carrier.grad
      new_nu = nu
      graft = None
      if grafting == "sgd":
        graft = g
      elif needs_nu:
        v = graft_b2 * nu.reshape(g.shape) + (1 - graft_b2) * jnp.square(g).astype(nu.dtype)
        new_nu = jnp.where(live, v.reshape(nu.shape), nu)
        if grafting == "adam":
          t = jnp.maximum(carrier.count, 1).astype(v.dtype)
          v = v / (1 - graft_b2**t)
        graft = (g / (jnp.sqrt(v) + graft_eps)).astype(g.dtype)

      if carrier.layout.num_factors == 0:
        direction = g if graft is None else graft
      else:
        direction = shampoo_direction(carrier, exponent, eps, trace_scaling, relative_eps)
        if graft is not None:
          norm = jnp.linalg.norm(direction)
          ratio = jnp.linalg.norm(graft) / jnp.where(norm > 0, norm, 1)
          direction = jnp.where(norm > 0, direction * ratio, 0)
      return carrier.restore(jnp.where(live, direction, 0)), new_nu

    new_updates, nu = per_parameter(update_leaf, 2, updates, state.graft_nu)
    return new_updates, ShampooPreconditionState(nu)

  return optax.GradientTransformation(init_fn, update_fn)
