"""Eigenbases of the Kronecker factors, refreshed on a schedule or when they go stale."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from soap_optax import _linalg
from soap_optax._carrier import (
  check_layout,
  expect_carriers,
  is_carrier,
  per_leaf,
  per_parameter,
)
from soap_optax._layout import LayoutRule

_KEEP, _FIRST, _SCHEDULED = 0, 1, 2


class EigenbasisState(NamedTuple):
  """State of :func:`eigenbasis_refresh`.

  Each field holds, per parameter, a tuple with one entry per working axis (``None`` for an axis
  without a factor).

  Attributes:
    basis: the orthonormal basis ``Q_k`` of each factor (identity before the first step).
    eigenvalues: the eigenvalue estimates matching the columns of ``basis``.
    refreshes: how many times each factor's basis was recomputed (the first ``eigh`` included).
    qr_iterations: QR iterations spent at the factor's last refresh (0 when it was skipped).
  """

  basis: optax.Params
  eigenvalues: optax.Params
  refreshes: optax.Params
  qr_iterations: optax.Params


def off_diagonal_ratio(matrix, basis):
  """``‖B − diag(B)‖_F / ‖B‖_F`` with ``B = QᵀLQ``: how far ``Q`` is from diagonalising ``L``."""
  b = basis.T @ (matrix @ basis)
  off = jnp.linalg.norm(b - jnp.diag(jnp.diag(b)))
  return off / jnp.maximum(jnp.linalg.norm(b), jnp.finfo(b.dtype).tiny)


def _staleness(matrix, basis, lq, tolerance):
  """Purifying Shampoo's test ``‖B − diag B‖_F > τ‖B‖_F`` for ``B = QᵀLQ``, and ``diag(B)``.

  ``Q`` is orthonormal, so ``‖B‖_F = ‖L‖_F`` and ``‖B − diag B‖²_F = ‖L‖²_F − ‖diag B‖²``: the
  test needs only ``diag(B)``, i.e. ``LQ`` (which the power step reuses), not the second product
  ``Qᵀ(LQ)``. The subtraction loses accuracy only for τ near float precision, where every basis
  then counts as stale — the safe side.
  """
  diag = jnp.einsum("ij,ij->j", basis, lq)
  total = jnp.sum(jnp.square(matrix))
  off = jnp.maximum(total - jnp.sum(jnp.square(diag)), 0)
  return off > jnp.square(tolerance) * total, diag


def eigenbasis_refresh(
  precondition_frequency: int = 10,
  *,
  layout: LayoutRule | None = None,
  refresh_tolerance: float = 0.0,
  max_qr_iterations: int = 1,
  method: str = "qr",
  stagger: bool = False,
  dtype=None,
) -> optax.GradientTransformation:
  """Keeps an orthonormal eigenbasis ``Q_k`` of every Kronecker factor ``L_k``.

  On the first update the bases come from ``eigh`` (eigenvalues in descending order). After
  that, every ``precondition_frequency`` updates (at updates 10, 20, … by default), each factor
  is refreshed. With ``method="qr"`` (SOAP's choice) a refresh re-orders the old basis by its
  estimated eigenvalues ``diag(QᵀLQ)``, takes one power-iteration step ``L Q`` and
  re-orthonormalises it with QR; with ``max_qr_iterations > 1`` further warm-started steps follow
  until the basis passes the staleness test below. ``method="eigh"`` recomputes the exact
  eigendecomposition instead.

  With ``refresh_tolerance`` τ > 0 (the adaptive rule of *Purifying Shampoo*) a scheduled refresh
  first measures, per factor, ``B = QᵀLQ`` and skips the factor when
  ``‖B − diag(B)‖_F ≤ τ‖B‖_F``; ``diag(B)`` then serves as the eigenvalue estimate. τ = 0 refreshes
  every factor at every scheduled step; τ = 1 never refreshes after the first basis. Each factor's
  refresh is a runtime branch of its own (``lax.cond``): a skipped factor costs only its test, and
  a step that is not scheduled costs nothing.

  A refresh whose result is not finite keeps the previous basis. The basis used by this step's
  update (``basis`` of the :class:`~soap_optax.KroneckerUpdate`) is the one from *before* the
  refresh, so it never contains the current gradient; the refreshed one travels as
  ``next_basis`` together with the column ``order`` for the rotated optimizers' moments.

  Args:
    precondition_frequency: refresh every this many updates (>= 1).
    layout: the :class:`~soap_optax.LayoutRule` shared by all blocks of the composition.
    refresh_tolerance: τ in ``[0, 1]`` for the adaptive skip test; 0 keeps the fixed schedule.
    max_qr_iterations: the most warm-started power/QR steps per refresh (>= 1).
    method: ``"qr"`` (warm-started power iteration + QR) or ``"eigh"``.
    stagger: spread the factors' refreshes over the ``precondition_frequency`` steps of a window
      (each factor gets a fixed phase, balanced by its ``n³`` cost) instead of refreshing all of
      them at steps 10, 20, …: the same work per window without one slow step. It changes when
      each basis is refreshed, so it is off by default (SOAP's schedule).
    dtype: dtype of the bases; by default float32, or float64 for float64 parameters (the
      statistics' default). The aliases pass their ``stats_dtype`` when no ``basis_dtype`` is set.

  Returns:
    An ``optax.GradientTransformation`` to be placed after :func:`~soap_optax.kronecker_stats`.

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 4).
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  layout = layout or LayoutRule()
  if method not in ("qr", "eigh"):
    raise ValueError(f"method must be 'qr' or 'eigh', got {method!r}.")
  if stagger and not isinstance(precondition_frequency, int):
    raise ValueError("stagger=True needs a static (Python int) precondition_frequency.")
  static_tolerance = isinstance(refresh_tolerance, (int, float))
  check_staleness = not static_tolerance or refresh_tolerance > 0
  if not isinstance(max_qr_iterations, int) or max_qr_iterations < 1:
    raise ValueError(f"max_qr_iterations must be an int >= 1, got {max_qr_iterations!r}.")

  def init_fn(params):
    def per_factor(make):
      def init_leaf(p):
        dt = jnp.dtype(dtype) if dtype is not None else jnp.promote_types(p.dtype, jnp.float32)
        sizes = layout.layout(p.shape).factor_sizes
        return tuple(None if n is None else make(n, dt) for n in sizes)

      return per_leaf(init_leaf, params)

    return EigenbasisState(
      basis=per_factor(lambda n, dt: jnp.eye(n, dtype=dt)),
      eigenvalues=per_factor(lambda n, dt: jnp.zeros((n,), dt)),
      refreshes=per_factor(lambda n, dt: jnp.zeros([], jnp.int32)),
      qr_iterations=per_factor(lambda n, dt: jnp.zeros([], jnp.int32)),
    )

  def refresh_qr(matrix, lq, estimates):
    """Sorted power step + QR, then more warm-started steps while the basis is stale."""
    order = jnp.argsort(-estimates, stable=True).astype(jnp.int32)
    new_basis, _ = jnp.linalg.qr(lq[:, order])
    if max_qr_iterations == 1:
      return new_basis, order, estimates[order], jnp.ones([], jnp.int32)

    def measured(i, q):
      lq = matrix @ q
      stale, diag = _staleness(matrix, q, lq, refresh_tolerance)
      return i, q, lq, diag, stale

    def body(carry):
      i, _, lq, _, _ = carry
      q_next, _ = jnp.linalg.qr(lq)
      return measured(i + 1, q_next)

    def cond(carry):
      i, *_, stale = carry
      return (i < max_qr_iterations) & stale

    carry = measured(jnp.ones([], jnp.int32), new_basis)
    iterations, new_basis, _, eigenvalues, _ = lax.while_loop(cond, body, carry)
    return new_basis, order, eigenvalues, iterations

  def scheduled(matrix, basis, eigenvalues):
    n = basis.shape[0]
    identity = jnp.arange(n, dtype=jnp.int32)
    if method == "eigh":

      def do_refresh(diag):
        del diag
        w, v = _linalg.eigh_descending(matrix)
        return v, identity, w, jnp.zeros([], jnp.int32)

      if not check_staleness:
        return do_refresh(None), jnp.ones([], bool)
    lq = matrix @ basis
    if method == "qr":

      def do_refresh(diag):
        return refresh_qr(matrix, lq, diag)

      if not check_staleness:
        return do_refresh(jnp.einsum("ij,ij->j", basis, lq)), jnp.ones([], bool)
    stale, diag = _staleness(matrix, basis, lq, refresh_tolerance)
    keep = (basis, identity, diag, jnp.zeros([], jnp.int32))
    return lax.cond(stale, do_refresh, lambda _: keep, diag), stale

  def refresh_factor(branch, matrix, basis, eigenvalues):
    """Returns (new basis, order, eigenvalues, refreshed flag, QR iterations)."""
    n = basis.shape[0]
    identity = jnp.arange(n, dtype=jnp.int32)

    def keep():
      return basis, identity, eigenvalues, jnp.zeros([], bool), jnp.zeros([], jnp.int32)

    def first():
      w, v = _linalg.eigh_descending(matrix)
      return (
        v.astype(basis.dtype),
        identity,
        w.astype(basis.dtype),
        jnp.ones([], bool),
        jnp.zeros([], jnp.int32),
      )

    def on_schedule():
      (q, order, w, iters), refreshed = scheduled(matrix.astype(basis.dtype), basis, eigenvalues)
      ok = _linalg.all_finite([q, w])
      return (
        jnp.where(ok, q, basis).astype(basis.dtype),
        jnp.where(ok, order, identity),
        jnp.where(ok, w, eigenvalues).astype(basis.dtype),
        refreshed & ok,
        iters,
      )

    return lax.switch(branch, (keep, first, on_schedule))

  def _phases(updates):
    """Per parameter, a tuple with each factor's refresh phase (0 for all without stagger)."""
    treedef = jax.tree.structure(updates, is_leaf=is_carrier)
    sizes = [c.layout.factor_sizes for c in treedef.flatten_up_to(updates)]
    phases = [[0 if n is not None else None for n in leaf] for leaf in sizes]
    if stagger:
      # Greedy balancing: the most expensive factor goes to the phase with the least work.
      load = [0] * precondition_frequency
      factors = [(n, i, k) for i, leaf in enumerate(sizes) for k, n in enumerate(leaf) if n]
      for n, i, k in sorted(factors, key=lambda f: -f[0]):
        phase = min(range(precondition_frequency), key=load.__getitem__)
        phases[i][k] = phase
        load[phase] += n**3
    return treedef.unflatten([tuple(p) for p in phases])

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "eigenbasis_refresh", "stats", "kronecker_stats")

    def update_leaf(carrier, basis, eigenvalues, refreshes, qr_iterations, phases):
      check_layout(carrier, layout, "eigenbasis_refresh")
      count = carrier.count

      def branch(phase):
        scheduled = count % precondition_frequency == phase
        branch = jnp.where(count == 0, _FIRST, jnp.where(scheduled, _SCHEDULED, _KEEP))
        return jnp.where(carrier.finite, branch, _KEEP)

      branches = [None if phase is None else branch(phase) for phase in phases]
      results = [
        None if q is None else refresh_factor(b, s, q, w)
        for s, q, w, b in zip(carrier.stats, basis, eigenvalues, branches, strict=True)
      ]
      pick = lambda i: tuple(None if r is None else r[i] for r in results)  # noqa: E731
      new_basis, order, new_eigenvalues, refreshed, iters = (pick(i) for i in range(5))
      new_refreshes = tuple(
        None if c is None else c + r.astype(jnp.int32)
        for c, r in zip(refreshes, refreshed, strict=True)
      )
      new_iters = tuple(
        None if c is None else jnp.where(b == _KEEP, c, i)
        for c, i, b in zip(qr_iterations, iters, branches, strict=True)
      )
      carrier = carrier.replace(
        basis=basis,
        next_basis=new_basis,
        order=order,
        eigenvalues=eigenvalues,
        refreshed=refreshed,
      )
      return carrier, new_basis, new_eigenvalues, new_refreshes, new_iters

    # Full float32 products on accelerators too: the refresh's power steps and staleness test
    # decide the basis, and TF32/bf16 passes would blur small eigenvalues.
    phases = _phases(updates)
    with jax.default_matmul_precision("float32"):
      carriers, *new_state = per_parameter(update_leaf, 5, updates, *state, phases)
    return carriers, EigenbasisState(*new_state)

  return optax.GradientTransformation(init_fn, update_fn)
