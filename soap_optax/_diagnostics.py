"""What an optimizer state says about its preconditioner: staleness, refreshes, spectra, skips."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from soap_optax import _linalg, _sharding
from soap_optax._carrier import factor_key, parameter_groups
from soap_optax._eigenbasis import EigenbasisState
from soap_optax._layout import LayoutRule
from soap_optax._stats import KroneckerStatsState, factor_shapes


class FactorDiagnostics(NamedTuple):
  """Diagnostics of one factor, one entry per block of its parameter.

  Attributes:
    staleness: ``‖B − diag(B)‖_F / ‖B‖_F`` with ``B = QᵀLQ``, for the current statistics ``L``
      and basis ``Q``: 0 when ``Q`` diagonalises ``L``; the quantity *Purifying Shampoo*'s
      adaptive refresh compares with its tolerance τ (0 for a factor without statistics yet).
    refreshes: how many times the basis was recomputed (the first decomposition included).
    qr_iterations: QR iterations spent at the last refresh (0 when it was skipped or used
      ``eigh``).
    eigenvalue_max: the largest eigenvalue estimate.
    eigenvalue_min: the smallest positive eigenvalue estimate (0 when none is positive).
    eigenvalue_spread: ``eigenvalue_max / eigenvalue_min`` (1 when no estimate is positive).
  """

  staleness: jax.Array
  refreshes: jax.Array
  qr_iterations: jax.Array
  eigenvalue_max: jax.Array
  eigenvalue_min: jax.Array
  eigenvalue_spread: jax.Array


class Diagnostics(NamedTuple):
  """What :func:`diagnostics` returns.

  Attributes:
    factors: per factor (keyed like the state: ``"<parameter path>:<working axis>"``), its
      :class:`FactorDiagnostics`.
    skipped_steps: how many steps were skipped because a gradient held a NaN or an Inf.
  """

  factors: dict[str, FactorDiagnostics]
  skipped_steps: jax.Array


def _find(state, kind) -> list:
  found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
  return [x for x in found if isinstance(x, kind)]


def _factor(stats: jax.Array, basis, eigenvalues, refreshes, iterations) -> FactorDiagnostics:
  dtype = jnp.promote_types(basis.dtype, jnp.float32)
  stats, basis, eigenvalues = (x.astype(dtype) for x in (stats, basis, eigenvalues))
  # Zero padding (ragged blocks) has zero statistics and its own columns of Q, so it adds
  # nothing to either norm; its eigenvalue estimates (−1) are excluded from the spectrum.
  staleness = _linalg.off_diagonal_ratio(stats, basis)
  top = jnp.max(eigenvalues, axis=-1)
  positive = eigenvalues > 0
  bottom = jnp.min(jnp.where(positive, eigenvalues, jnp.inf), axis=-1)
  bottom = jnp.where(jnp.any(positive, axis=-1), bottom, 0)
  spread = jnp.where(bottom > 0, top / jnp.where(bottom > 0, bottom, 1), 1)
  return FactorDiagnostics(staleness, refreshes, iterations, top, bottom, spread)


def diagnostics(
  state: optax.OptState, params: optax.Params | None = None, layout: LayoutRule | None = None
) -> Diagnostics:
  """Reads a soap_optax optimizer state and describes each factor's preconditioner.

  Works on the state of any alias or hand-built chain of the blocks (it looks for the
  ``kronecker_stats`` and ``eigenbasis_refresh`` states inside, wherever ``optax.chain``,
  ``optax.inject_hyperparams``, ``optax.MultiSteps`` or ``optax.multi_transform`` put them). It
  is jit-able and cheap — two matmuls per factor, about the cost of one statistics update — so it
  can be logged every few hundred steps.

  Args:
    state: an optimizer state.
    params: with ``layout``, the parameters of a grouped state
      (``LayoutRule(group_equal_layouts=True)``): each group's factors are then reported per
      member parameter (``"<parameter path>:<axis>"``, its own blocks), as without grouping.
      Without them a grouped state is reported per group (``"<group>:<axis>"``).
    layout: the chain's :class:`~soap_optax.LayoutRule` (with ``params``).

  Returns:
    A :class:`Diagnostics`: per factor, staleness, refresh count, QR iterations at the last
    refresh and eigenvalue spread; and the number of skipped non-finite steps.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.soap(precondition_frequency=5)
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])}, state, params)
    >>> report = soap_optax.diagnostics(state)
    >>> sorted(report.factors)
    ['w:0', 'w:1']
    >>> report.factors["w:1"].staleness  # the first basis diagonalises the statistics exactly
    Array([0.], dtype=float32)
    >>> report.factors["w:1"].eigenvalue_spread  # (1 − β)·diag(4, 1)
    Array([4.], dtype=float32)
  """
  skipped = sum((s.total_notfinite for s in _find(state, optax.ApplyIfFiniteState)), 0)
  factors = {}
  for stats_state in _find(state, KroneckerStatsState):
    skipped = skipped + stats_state.skipped
  for bases in _find(state, EigenbasisState):
    if not hasattr(bases.basis, "keys"):
      continue  # a state initialised without parameters
    statistics = {}
    for stats_state in _find(state, KroneckerStatsState):
      statistics.update(dict(stats_state.stats) if hasattr(stats_state.stats, "keys") else {})
    mesh = _sharding.find_mesh(bases.basis)
    with _sharding.using(mesh):
      for key in bases.basis:
        arrays = (
          statistics[key],
          bases.basis[key],
          bases.eigenvalues[key],
          bases.refreshes[key],
          bases.qr_iterations[key],
        )
        # A FactorDiagnostics of specs: every result replicated.
        specs = FactorDiagnostics._make([PartitionSpec()] * 6) if mesh is not None else None
        factors[key] = _sharding.relayout(_factor, specs, mesh)(*arrays)
  if params is not None and layout is not None and layout.group_equal_layouts:
    factors = _per_parameter(factors, params, layout)
  return Diagnostics(factors, jnp.asarray(skipped, jnp.int32))


def _per_parameter(factors: dict, params, layout: LayoutRule) -> dict:
  """Each group's diagnostics (one entry per block) split into its members' blocks; entries that
  name no group (an ungrouped state) are kept as they are."""
  out, split = {}, set()
  for group in parameter_groups(params, layout):
    start = 0
    for member in group.members:
      size = member.layout.num_blocks
      for axis in factor_shapes(group.layout):
        key = factor_key(group.name, axis)
        if key in factors:
          part = jax.tree.map(lambda x, s=start, n=size: x[s : s + n], factors[key])
          out[factor_key(member.name, axis)] = part
          split.add(key)
      start += size
  out.update({k: v for k, v in factors.items() if k not in split and k not in out})
  return out
