"""The Kronecker factor statistics ``L_k ← β L_k + (1 − β) G_(k) G_(k)ᵀ``."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import DTypeLike

from soap_optax import _checks, _linalg, _sharding
from soap_optax._carrier import (
  Group,
  GroupedRecords,
  KroneckerUpdate,
  compute_dtype,
  factor_key,
  keyed_groups,
  named_leaves,
  parameter_groups,
  storage_dtype,
)
from soap_optax._layout import FactorLayout, LayoutRule, to_blocks


class KroneckerStatsState(NamedTuple):
  """State of :func:`kronecker_stats`.

  Attributes:
    count: number of updates made so far (skipped, non-finite steps not counted).
    stats: the factor statistics, keyed ``"<parameter path>:<working axis>"``, each of shape
      ``(num_blocks, n, n)`` (one ``n × n`` statistic per block of the parameter). With
      ``LayoutRule(group_equal_layouts=True)`` keyed by group instead (``"<first member's
      path>+<more members>:<working axis>"``), the members' blocks one after another.
    skipped: number of steps skipped because a gradient held a NaN or an Inf.
  """

  count: jax.Array  # type: ignore[assignment]  # optax's name for it; shadows tuple.count
  stats: dict[str, jax.Array]
  skipped: jax.Array


def factor_shapes(layout: FactorLayout) -> dict[int, tuple[int, int, int]]:
  """``{working axis: (num_blocks, n, n)}`` for the factored axes of a parameter."""
  return {
    axis: (layout.num_blocks, n, n) for axis, n in enumerate(layout.factor_sizes) if n is not None
  }


def working_spec(layout: FactorLayout, spec, mesh):
  """The sharding of a parameter's working-layout arrays, given its ``spec`` (see
  :class:`~soap_optax._carrier.Group`): always under explicit sharding, under automatic sharding
  only where the parameter's placement is known.

  An unblocked, unmerged parameter keeps its own sharding behind the leading block axis (a
  parameter with one stack axis: on it), so that the rotations need no more communication than
  the matmuls themselves; any other layout is spread over the mesh like the state.
  """
  if mesh is None or (spec is None and not _sharding.is_explicit(mesh)):
    return None
  if spec is not None:
    spec = tuple(spec) + (None,) * (len(layout.shape) - len(spec))
    if layout.blocked_shape == (1, *layout.shape):
      return jax.sharding.PartitionSpec(None, *spec)
    if layout.blocked_shape == layout.shape and len(layout.stack_shape) == 1:
      return jax.sharding.PartitionSpec(*spec)
  return _sharding.spread(layout.blocked_shape, mesh)


def group_spec(group: Group, mesh):
  """The sharding of a group's working-layout arrays under explicit sharding.

  A group of unblocked, unmerged parameters keeps their sharding behind the block axis, along
  which they are concatenated: no data moves to form the group, and none in the rotations.
  """
  if len(group.members) <= 1:
    layout = group.members[0].layout if group.members else group.layout
    return working_spec(layout, group.spec, mesh)
  if mesh is None or not _sharding.is_explicit(mesh):
    return None
  first = group.members[0].layout
  if group.spec is not None and first.blocked_shape == (1, *first.shape):
    spec = tuple(group.spec) + (None,) * (len(first.shape) - len(group.spec))
    return jax.sharding.PartitionSpec(None, *spec)
  return _sharding.spread(group.layout.blocked_shape, mesh)


def kronecker_stats(
  beta: float = 0.95,
  *,
  layout: LayoutRule | None = None,
  dtype: DTypeLike | None = None,
  precision: _linalg.MatmulPrecision = "highest",
) -> optax.GradientTransformation:
  """Accumulates Shampoo's Kronecker factor statistics; the first block of every composition.

  For each parameter (each block of it, with a ``block_size``) and each axis ``k`` that the
  layout gives a factor, keeps an exponential moving average (not bias-corrected, as in the SOAP
  reference) of ``G_(k) G_(k)ᵀ``, the gradient contracted with itself over all other axes. For a
  matrix these are Shampoo's ``L`` and ``R``.

  Each gradient leaf is passed on as a :class:`~soap_optax.KroneckerUpdate` that carries the
  gradient in the working layout, the updated statistics and the step count to the blocks after
  it. If any gradient of the tree holds a NaN or an Inf, the step is marked non-finite: the
  statistics and the count are kept (``skipped`` counts it), and the later blocks skip the step
  too. On a device mesh each statistic is spread over the devices (see ``BUILD_NOTES.md``).

  Args:
    beta: decay of the moving average (SOAP's ``shampoo_beta``), in ``[0, 1)``.
    layout: the :class:`~soap_optax.LayoutRule` shared by all blocks of the composition.
    dtype: storage dtype of the statistics (e.g. ``jnp.bfloat16`` to halve their memory); the
      arithmetic runs in float32 whatever it is (float64 for float64 parameters, the default
      storage dtype too).
    precision: of the ``G Gᵀ`` products: ``"highest"`` (full float32, the default),
      ``"high"`` or ``"default"`` (XLA's faster passes on accelerators: TF32/bf16), or
      ``"bfloat16"`` (operands rounded to bfloat16, float32 accumulation, on every platform),
      or a ``jax.lax.Precision``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> rule = soap_optax.LayoutRule()
    >>> tx = soap_optax.kronecker_stats(0.9, layout=rule)
    >>> grads = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(grads)
    >>> sorted(state.stats)
    ['w:0', 'w:1']
    >>> records, state = tx.update(grads, state)
    >>> state.stats["w:0"][0]  # one block: 0.1 · G Gᵀ
    Array([[0.2, 0.2, 0.2],
           [0.2, 0.2, 0.2],
           [0.2, 0.2, 0.2]], dtype=float32)

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _checks.check_unit_interval("beta", beta)
  _checks.check_float_dtype("dtype", dtype)
  matmul = _linalg.matmul_settings(precision)
  rule = layout or LayoutRule()

  def init_fn(params):
    mesh = _sharding.find_mesh(params)

    def build(group):
      shapes = factor_shapes(group.layout)
      dt = storage_dtype(group.dtype, dtype)
      return {
        factor_key(group.name, axis): _sharding.constrain(
          jnp.zeros(shape, dt), _sharding.spread(shape, mesh), mesh
        )
        for axis, shape in shapes.items()
      }

    rule.check_names([name for name, _ in named_leaves(params)])
    with _sharding.using(mesh):
      zero = jnp.zeros([], jnp.int32)
      return KroneckerStatsState(zero, keyed_groups(params, rule, build), zero)

  def update_fn(updates, state, params=None):
    del params
    mesh = _sharding.find_mesh(updates)
    leaves = jax.tree.leaves(updates)
    groups = parameter_groups(updates, rule)
    inputs = [_members(i, group, leaves) for i, group in enumerate(groups)]
    grouped = rule.group_equal_layouts
    with _sharding.using(mesh), jax.named_scope("kronecker_stats"):
      if grouped:
        # Gathered first and tested as groups: one finiteness test per group, not per parameter.
        inputs = [
          [_gathered(group, grads, mesh)] for group, grads in zip(groups, inputs, strict=True)
        ]
        # Behind a barrier: XLA rewrites the sum over a concatenation as one sum per member.
        finite = _linalg.all_finite([lax.optimization_barrier(w) for (w,) in inputs])
      else:
        finite = _linalg.all_finite(leaves)
      results = [
        _accumulate(group, grads, state, finite, beta, mesh, matmul, gathered=grouped)
        for group, grads in zip(groups, inputs, strict=True)
      ]
    structure: Any = jax.tree.structure(updates)  # jaxlib's PyTreeDef has no type stubs
    if rule.group_equal_layouts:
      carriers: Any = GroupedRecords(tuple(c for c, _ in results), structure)
    else:
      carriers = structure.unflatten([c for c, _ in results])
    stats = dict(state.stats) if hasattr(state.stats, "keys") else state.stats
    for _, new in results:
      stats.update(new)
    count = state.count + finite.astype(jnp.int32)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    return carriers, KroneckerStatsState(count, stats, skipped)

  return optax.GradientTransformation(init_fn, update_fn)


def _members(i: int, group: Group, leaves: list) -> list:
  """The gradients the ``i``-th unit of :func:`parameter_groups` holds, in its block order."""
  if not group.members:  # without grouping, the i-th unit is the i-th parameter
    return [leaves[i]]
  return [leaves[m.index] for m in group.members]


def _working(group: Group, grads) -> jax.Array:
  """A unit's gradients in its working layout (a group's concatenated), in the compute dtype."""
  cdt = compute_dtype(grads[0].dtype)
  layouts = [m.layout for m in group.members] or [group.layout]
  working = [to_blocks(g.astype(cdt), lay) for g, lay in zip(grads, layouts, strict=True)]
  # Concatenated once, here: every later block computes on the group as on one parameter.
  return working[0] if len(working) == 1 else jnp.concatenate(working)


def _gathered(group: Group, grads, mesh) -> jax.Array:
  """:func:`_working`, laid out where the group's working arrays live."""
  return _sharding.relayout(functools.partial(_working, group), group_spec(group, mesh), mesh)(
    grads
  )


def _accumulate(group: Group, grads, state, finite, beta, mesh, matmul, *, gathered=False):
  """One unit's statistics update and the record it starts: ``(record, new statistics)``.

  ``grads`` are the unit's gradients, or with ``gathered`` its working array already.
  """
  layout = group.layout
  shapes = factor_shapes(layout)
  keys = {axis: factor_key(group.name, axis) for axis in shapes}
  cdt = compute_dtype(grads[0].dtype)

  def accumulate(grads, finite, *old):
    working = grads[0] if gathered else _working(group, grads)
    new = []
    for axis, s in zip(keys, old, strict=True):
      ema = beta * s.astype(cdt) + (1 - beta) * _linalg.factor_statistic(working, axis, matmul)
      with jax.named_scope("finite_guard"):
        new.append(jnp.where(finite, ema, s.astype(cdt)))
    return working, new, [n.astype(s.dtype) for n, s in zip(new, old, strict=True)]

  specs = [_sharding.spread(shapes[axis], mesh) for axis in keys]
  out_specs = (group_spec(group, mesh), specs, specs)
  old = [state.stats[key] for key in keys.values()]
  working, computed, stored = _sharding.relayout(accumulate, out_specs, mesh)(grads, finite, *old)
  per_axis = dict(zip(keys, computed, strict=True))
  record = KroneckerUpdate(
    grad=working,
    count=state.count,
    finite=finite,
    stats=tuple(per_axis.get(axis) for axis in range(len(layout.working_shape))),
    layout=layout,
    dtype=group.dtype,
    name=group.name,
    spec=group.spec,
    members=group.members,
  )
  return record, dict(zip(keys.values(), stored, strict=True))
