"""Diagonal optimizers run in the eigenbasis of the Kronecker factors.

SOAP (:func:`rotated_adam`), Adafactor in Shampoo's eigenbasis (:func:`rotated_adafactor`),
eigenvalue-corrected Shampoo (:func:`eigenvalue_corrected`) and Shampoo itself
(:func:`~soap_optax.shampoo_precondition`) share one skeleton, :func:`eigenbasis_optimizer`:
move the moments into the working layout, compute a direction, carry the moments into the
refreshed basis, skip the initialising and non-finite steps, and hand back an update in the
parameter's shape. Each optimizer is only what differs: its moments (and in which basis
each lives) and its direction rule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import DTypeLike

from soap_optax import _checks, _sharding
from soap_optax._carrier import (
  GroupedRecords,
  KroneckerUpdate,
  check_grouping,
  check_layout,
  expect_carriers,
  is_carrier,
  keyed,
  keyed_groups,
  storage_dtype,
)
from soap_optax._layout import FactorLayout, LayoutRule, from_blocks, to_blocks
from soap_optax._linalg import (
  FULL,
  Matmul,
  MatmulPrecision,
  debias,
  divide,
  matmul_settings,
  mode_product,
  permute,
  run_time_offsets,
  slice_at,
)
from soap_optax._stats import group_spec

Array = jax.Array


# -- the skeleton --------------------------------------------------------------------------------


# Where a rotated optimizer keeps a moment (see :class:`Moment`).
MomentBasis = Literal["eigen", "diagonal", "parameter"]


class Moment(NamedTuple):
  """A per-parameter moment of a rotated optimizer.

  Attributes:
    name: the field of the optimizer's state that holds it.
    basis: ``"eigen"``, a vector held in the eigenbasis (rotated exactly into a refreshed basis);
      ``"diagonal"``, a diagonal statistic held in the eigenbasis (permuted with the refresh's
      column order, as SOAP does with its second moment); ``"parameter"``, held in the
      parameter basis (untouched by a refresh).
    shape: ``None`` for a moment shaped like its parameter (stored like it, so it is sharded
      like it); otherwise a function from the parameter's layout to the moment's shape in the
      working layout, or to None when the parameter has no such moment (such moments are kept in
      a flat dict keyed by parameter path). With ``LayoutRule(group_equal_layouts=True)`` every
      moment is kept in a flat dict keyed by group, in the group's working layout.
  """

  name: str
  basis: MomentBasis
  shape: Callable[[FactorLayout], tuple[int, ...] | None] | None = None


class Rotation(NamedTuple):
  """Rotations into and out of one parameter's eigenbasis (the basis of this step).

  Attributes:
    bases: per working axis, the bases ``(num_blocks, n, n)``, or None for an axis without one.
    matmul: the products' precision (the block's ``precision`` argument; full by default).
  """

  bases: tuple
  matmul: Matmul = FULL

  def into(self, x: Array) -> Array:
    """``x ×_k Q_kᵀ``."""
    with jax.named_scope("rotate"):
      return mode_product(x, self.bases, transpose=True, matmul=self.matmul)

  def out(self, x: Array) -> Array:
    """``x ×_k Q_k``."""
    with jax.named_scope("rotate"):
      return mode_product(x, self.bases, transpose=False, matmul=self.matmul)


# direction(carrier, moments, rotation) -> (direction, new moments), all in the working layout.
DirectionRule = Callable[[KroneckerUpdate, dict[str, Array], Rotation], tuple[Array, dict]]


def _bases(bases: tuple | None) -> tuple:
  """A record's per-axis bases, which the refresh has filled in by the time they are read."""
  assert bases is not None, "eigenbasis_refresh fills in the bases"
  return bases


def carry_to_next_basis(carrier: KroneckerUpdate, moments: dict, kinds: dict) -> dict:
  """Moves moments held in ``carrier.basis`` into ``carrier.next_basis``.

  Vectors in the eigenbasis are rotated exactly, ``m ← (m ×_k Q_old) ×_k Q_newᵀ`` (two mode
  products: forming ``Q_newᵀ Q_old`` would cost an extra ``n³`` per factor); diagonal statistics
  cannot be rotated, so they are permuted with the refresh's column ``order``, as the SOAP
  reference does. Runs under a ``lax.cond``: a step in which no factor was refreshed pays
  nothing.
  """
  assert carrier.refreshed is not None and carrier.order is not None, "filled by the refresh"
  refreshed = [r for r in carrier.refreshed if r is not None]
  moving = {k: v for k, v in moments.items() if kinds[k] != "parameter"}
  if not refreshed or not moving:
    return moments

  def transfer(moving):
    # At full precision whatever the step's `precision`: it runs once per refresh, and a first
    # moment blurred in transit would stay blurred.
    old, new = Rotation(_bases(carrier.basis)), Rotation(_bases(carrier.next_basis))
    out = {}
    for name, x in moving.items():
      if kinds[name] == "eigen":
        out[name] = new.into(old.out(x))
        continue
      for axis, order in enumerate(carrier.order or ()):
        # An axis reduced to length 1 (Adafactor's row or column sums) needs no permutation.
        if order is not None and x.shape[axis + 1] == order.shape[-1]:
          x = permute(x, order, axis)
      out[name] = x
    return out

  any_refreshed = jnp.any(jnp.concatenate([jnp.ravel(r) for r in refreshed]))
  with jax.named_scope("moment_transfer"):
    moved = lax.cond(any_refreshed, transfer, lambda m: m, moving)
  return {**moments, **moved}


def eigenbasis_optimizer(
  block: str,
  moments: Sequence[Moment],
  direction: DirectionRule,
  state_type: Callable[..., NamedTuple],
  *,
  moment_dtype: DTypeLike | None = None,
  moment_dtypes: Mapping[str, DTypeLike | None] | None = None,
  layout: LayoutRule | None = None,
  needs: str = "basis",
  precision: MatmulPrecision = "highest",
) -> optax.GradientTransformation:
  """The skeleton every rotated optimizer shares; returns plain updates.

  Args:
    block: the block's name, for error messages.
    moments: the moments it keeps (their order is the order of ``state_type``'s fields).
    direction: its rule, from this step's record, moments (working layout, compute dtype) and
      rotation to a direction and the new moments.
    state_type: a NamedTuple with one field per moment.
    moment_dtype: storage dtype of the moments (default: float32, float64 for float64 params).
    moment_dtypes: per moment name, a storage dtype that overrides ``moment_dtype`` (``None``
      values are ignored); e.g. ``{"mu": jnp.bfloat16}`` for optax's ``mu_dtype``.
    layout: the composition's rule; needed for moments with a ``shape`` and with grouping (and
      then checked). With ``LayoutRule(group_equal_layouts=True)`` every moment is kept in a
      flat dict keyed by group, in the group's working layout.
    needs: the record field that must be filled in before this block.
    precision: of the rotations' matmuls (see :func:`~soap_optax.kronecker_stats`).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  Examples:
    Signum (the sign of the momentum) in the eigenbasis, as a new member of the family:

    >>> from typing import NamedTuple
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> class SignumState(NamedTuple):
    ...   mu: optax.Updates
    >>> def signum(carrier, moments, rotation):
    ...   mu = 0.9 * moments["mu"] + 0.1 * rotation.into(carrier.grad)
    ...   return rotation.out(jnp.sign(mu)), {"mu": mu}
    >>> rotated_signum = soap_optax.eigenbasis_optimizer(
    ...   "rotated_signum", [soap_optax.Moment("mu", "eigen")], signum, SignumState
    ... )
    >>> rule = soap_optax.LayoutRule()
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.95, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule),
    ...   rotated_signum,
    ... )
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
    >>> for _ in range(2):
    ...   updates, state = tx.update({"w": jnp.ones((3, 2))}, state)
    >>> updates["w"].shape
    (3, 2)
  """
  kinds = {m.name: m.basis for m in moments}
  overrides = {k: v for k, v in (moment_dtypes or {}).items() if v is not None}
  matmul = matmul_settings(precision)
  grouped = layout is not None and layout.group_equal_layouts

  def init_fn(params):
    def field(moment):
      # The stored dtype is the one kept: each step computes in float32 and casts back to it.
      dtype = overrides.get(moment.name, moment_dtype)

      def zeros(p):
        return jnp.zeros_like(p, dtype=storage_dtype(p.dtype, dtype))

      mesh = _sharding.find_mesh(params)
      if grouped:
        assert layout is not None
        with _sharding.using(mesh):
          return keyed_groups(params, layout, functools.partial(_group_moment, moment, dtype, mesh))
      if moment.shape is None:
        return jax.tree.map(zeros, params)

      def build(name, p):
        assert layout is not None, "a moment with a shape of its own needs the layout"
        shape = moment.shape(layout.layout(p.shape, name))
        if shape is None:
          return {}
        x = jnp.zeros(shape, storage_dtype(p.dtype, dtype))
        return {name: _sharding.constrain(x, _sharding.spread(shape, mesh), mesh)}

      with _sharding.using(mesh):
        return keyed(params, build)

    return state_type(*(field(m) for m in moments))

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, block, needs, "eigenbasis_refresh")
    check_grouping(updates, layout, block)
    mesh = _sharding.find_mesh(updates)
    treedef: Any = jax.tree.structure(updates, is_leaf=is_carrier)  # PyTreeDef: no stubs
    carriers = treedef.flatten_up_to(updates)
    shaped = [] if grouped else [m.name for m in moments if m.shape is None]
    columns = {name: treedef.flatten_up_to(getattr(state, name)) for name in shaped}
    by_key = {m.name: getattr(state, m.name) for m in moments if m.name not in shaped}

    def update_leaf(i, carrier: KroneckerUpdate):
      if layout is not None:
        check_layout(carrier, layout, block)
      stored = {name: column[i] for name, column in columns.items()}
      stored.update({k: v[carrier.name] for k, v in by_key.items() if carrier.name in v})
      spec = [carrier.spec] * len(carrier.members) if carrier.members else carrier.spec
      out_specs = (spec, {k: _sharding.spec_of(v) for k, v in stored.items()})
      step = functools.partial(
        _step,
        direction=direction,
        kinds=kinds,
        param_shaped=frozenset(shaped),
        matmul=matmul,
        split_at_run_time=mesh is None,
      )
      # Every array goes in as an argument: under explicit sharding `step` runs in an automatic
      # region, which must not close over explicitly sharded values.
      return _sharding.relayout(step, out_specs, mesh)(carrier, stored)

    with _sharding.using(mesh), jax.named_scope(block):
      results = [update_leaf(i, c) for i, c in enumerate(carriers)]
    fields = {name: treedef.unflatten([new[name] for _, new in results]) for name in shaped}
    for name, old in by_key.items():
      if isinstance(old, dict) or hasattr(old, "keys"):  # not the placeholder of no parameters
        old = dict(old)
        old.update(
          {c.name: new[name] for c, (_, new) in zip(carriers, results, strict=True) if name in new}
        )
      fields[name] = old
    if isinstance(updates, GroupedRecords):
      new_updates = _ungrouped(updates, [update for update, _ in results])
    else:
      new_updates = treedef.unflatten([update for update, _ in results])
    return new_updates, state_type(*(fields[m.name] for m in moments))

  return optax.GradientTransformation(init_fn, update_fn)


def _group_moment(moment: Moment, dtype, mesh, group) -> dict[str, Array]:
  """A group's moment, keyed by the group: the parameters' moments in its working layout."""
  if moment.shape is None:
    shape, spec = group.layout.blocked_shape, group_spec(group, mesh)
  else:
    shape = moment.shape(group.layout)
    if shape is None:
      return {}
    spec = None
  spec = spec if spec is not None else _sharding.spread(shape, mesh)
  x = jnp.zeros(shape, storage_dtype(group.dtype, dtype))
  return {group.name: _sharding.constrain(x, spec, mesh)}


def _ungrouped(updates: GroupedRecords, per_record: list) -> Any:
  """The members' updates (a list per record) put back in the gradient tree's structure."""
  leaves: list = [None] * updates.structure.num_leaves
  for record, parts in zip(updates.records, per_record, strict=True):
    for member, part in zip(record.members, parts, strict=True):
      leaves[member.index] = part
  return updates.structure.unflatten(leaves)


def _step(
  carrier: KroneckerUpdate,
  stored: dict,
  *,
  direction,
  kinds,
  param_shaped,
  matmul,
  split_at_run_time=False,
):
  """One parameter's step: to the working layout, the rule, the moment transfer, and back."""
  layout, cdt = carrier.layout, carrier.grad.dtype
  shaped = {k: k in param_shaped for k in stored}
  moments = {
    k: to_blocks(v.astype(cdt), layout) if shaped[k] else v.astype(cdt) for k, v in stored.items()
  }
  step, new = direction(carrier, moments, Rotation(_bases(carrier.basis), matmul))
  live = carrier.live
  with jax.named_scope("live_guard"):
    # Chosen before the transfer rather than after it: the same state (a step that is not live
    # refreshes only the first bases, and then moves zeros), and XLA fuses more of the choices
    # into the moments' updates (5 kernels fewer on a 2-layer GPT).
    new = {k: jnp.where(live, v, moments[k]) for k, v in new.items()}
  new = carry_to_next_basis(carrier, new, kinds)
  back = {}
  for k, v in new.items():
    back[k] = (from_blocks(v, layout) if shaped[k] else v).astype(stored[k].dtype)
  # The update stays in the compute dtype: a large direction (before the learning rate scales
  # it) would overflow float16; optax.apply_updates casts to the parameter's dtype.
  if split_at_run_time and len(carrier.members) > 1:
    return _split_members(carrier, step, live), back
  with jax.named_scope("live_guard"):
    step = jnp.where(live, step, 0)
  return carrier.restore(step), back


def _split_members(carrier: KroneckerUpdate, step: Array, live: Array) -> list[Array]:
  """A group's update split into its members' (zero when the step is not live), at offsets
  that XLA cannot see.

  Sliced at constant offsets, each member's slice fuses into the transforms behind the block
  (learning rate, decay, skip) as a kernel of its own: one per parameter, the compiled program
  growing with the model again (16 GPT layers: 197 kernels where 13 do without grouping). Inside
  a runtime branch the offsets are the branch's operands, so the members of one shape share one
  kernel, and the transforms behind read whole arrays, as without grouping. Not on a mesh,
  where a slice at a run-time offset of a divided axis would gather the whole array.
  """
  sizes = [m.layout.num_blocks for m in carrier.members]
  starts = run_time_offsets(sizes)

  def split(step, starts):
    parts = [slice_at(step, i, n) for i, n in zip(starts, sizes, strict=True)]
    return [from_blocks(x, m.layout) for x, m in zip(parts, carrier.members, strict=True)]

  def zeros(step, starts):
    del starts
    return [jnp.zeros(m.layout.shape, step.dtype) for m in carrier.members]

  with jax.named_scope("live_guard"):
    return lax.cond(live, split, zeros, step, starts)


def _check_moments(*, b1, b2, eps, moment_dtype, mu_dtype, frozen_b2=False) -> None:
  """The checks every rotated optimizer's moment arguments share.

  ``frozen_b2`` admits ``b2 = 1``, a second moment kept as it is (as the SOAP paper's idealized
  Adafactor keeps the dataset's averages), where the rule stays finite with it.
  """
  _checks.check_unit_interval("b1", b1)
  _checks.check_unit_interval("b2", b2, closed=frozen_b2)
  _checks.check_nonnegative("eps", eps)
  _checks.check_float_dtype("moment_dtype", moment_dtype)
  _checks.check_float_dtype("mu_dtype", mu_dtype)


# -- SOAP -----------------------------------------------------------------------------------------


class RotatedAdamState(NamedTuple):
  """State of :func:`rotated_adam`.

  Attributes:
    mu: first moment, held in the current eigenbasis, in the parameters' shapes.
    nu: second moment, held in the current eigenbasis, in the parameters' shapes.

  With ``LayoutRule(group_equal_layouts=True)`` every field is instead a flat dict keyed by group
  (as the statistics are), each entry in the group's working layout ``(num_blocks, *block)``.
  """

  mu: optax.Updates
  nu: optax.Updates


def block_rms(x: Array, layout: FactorLayout) -> Array:
  """Each block's root mean square over its real (unpadded) entries, broadcastable to ``x``."""
  counts = jnp.asarray(layout.real_counts(), x.dtype)
  total = jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))
  return jnp.sqrt(total / jnp.maximum(counts, 1)).reshape((-1,) + (1,) * (x.ndim - 1))


def rotated_adam(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  correct_bias: bool = True,
  normalize_grads: bool = False,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  precision: MatmulPrecision = "highest",
  layout: LayoutRule | None = None,
) -> optax.GradientTransformation:
  """Adam in the eigenbasis of the Kronecker factors: SOAP's update direction.

  Each step rotates the gradient into the bases ``Q_k`` (``G' = G ×_k Q_kᵀ``), updates Adam's
  moments there, and rotates the normalised step back out:

    m ← b1 m + (1 − b1) G',   v ← b2 v + (1 − b2) G'²,
    u = c_t · (m / (√v + eps)) ×_k Q_k,   c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)

  following the SOAP reference (``eps`` is added to ``√v`` before the bias correction, which is
  folded into the step size). On the first call (count 0) the update is zero and the moments
  stay zero: that call only sets up statistics and bases. When a factor's basis is refreshed, the
  first moment is rotated exactly into the new basis and the second moment is permuted with the
  new column order. The update is returned in each parameter's shape (in float32, or float64 for
  float64 parameters: ``optax.apply_updates`` casts it to the parameter's dtype), ready for
  standard optax transformations (weight decay, learning rate) behind it.

  Args:
    b1: decay of the first moment, in ``[0, 1)``.
    b2: decay of the second moment, in ``[0, 1]`` (1 keeps it as it is).
    eps: added to ``√v``.
    correct_bias: apply Adam's bias correction ``c_t``.
    normalize_grads: divide each block's direction by its root mean square (SOAP's
      ``normalize_grads``; a block is the whole parameter unless a ``block_size`` is set),
      before the bias correction.
    moment_dtype: storage dtype of the moments; float32 by default (float64 for float64
      parameters).
    mu_dtype: storage dtype of the first moment alone, overriding ``moment_dtype`` for it
      (optax's ``mu_dtype``: ``jnp.bfloat16`` saves 2 bytes per parameter; the second moment,
      whose square root divides, keeps ``moment_dtype``).
    precision: of the rotations' matmuls: ``"highest"`` (the default), ``"high"``,
      ``"default"``, ``"bfloat16"`` or a ``jax.lax.Precision`` (see
      :func:`~soap_optax.kronecker_stats`).
    layout: the :class:`~soap_optax.LayoutRule` of the composition; needed only when it groups
      parameters (``group_equal_layouts``), whose moments are then kept per group.

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  Examples:
    >>> rule = soap_optax.LayoutRule()
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.95, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule),
    ...   soap_optax.rotated_adam(0.95, 0.95, 1e-8),
    ... )
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((3, 2))}, state)
    >>> updates["w"]  # the first call only initialises the statistics and bases
    Array([[0., 0.],
           [0., 0.],
           [0., 0.]], dtype=float32)

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
    Kingma and Ba, `Adam: A Method for Stochastic Optimization
    <https://arxiv.org/abs/1412.6980>`_, 2014.
  """

  _check_moments(
    b1=b1, b2=b2, eps=eps, moment_dtype=moment_dtype, mu_dtype=mu_dtype, frozen_b2=True
  )

  def direction(carrier, moments, rotation):
    g = rotation.into(carrier.grad)
    mu = optax.tree.update_moment(g, moments["mu"], b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(g, moments["nu"], b2, 2)
    step = rotation.out(divide(mu, jnp.sqrt(nu) + eps))
    if normalize_grads:
      rms = block_rms(step, carrier.layout)
      # The reference divides by 1e-30 + rms; an explicit zero branch, because XLA may fold the
      # two divisions into one whose product of denominators underflows to 0.
      step = jnp.where(rms > 0, step / (1e-30 + jnp.where(rms > 0, rms, 1)), 0)
    if correct_bias:
      count = carrier.count
      step = step * (jnp.sqrt(debias(b2, count, mu.dtype)) / debias(b1, count, mu.dtype))
    return step, {"mu": mu, "nu": nu}

  moments = (Moment("mu", "eigen"), Moment("nu", "diagonal"))
  return eigenbasis_optimizer(
    "rotated_adam",
    moments,
    direction,
    RotatedAdamState,
    moment_dtype=moment_dtype,
    moment_dtypes={"mu": mu_dtype},
    layout=layout,
    precision=precision,
  )


# -- Adafactor in the eigenbasis ----------------------------------------------------------------


class RotatedAdafactorState(NamedTuple):
  """State of :func:`rotated_adafactor`.

  Attributes:
    mu: first moment in the eigenbasis, in the parameters' shapes.
    nu_row: per parameter path, the moving average of the rotated squared gradient summed over
      the column axis (``keepdims``, working layout), or the full unfactored second moment for
      blocks with fewer than two axes.
    nu_col: per parameter path, the same summed over the row axis (absent for unfactored ones).

  With ``LayoutRule(group_equal_layouts=True)`` every field is instead a flat dict keyed by group
  (as the statistics are), each entry in the group's working layout ``(num_blocks, *block)``.
  """

  mu: optax.Updates
  nu_row: dict[str, Array]
  nu_col: dict[str, Array]


def factored_axes(shape: Sequence[int]) -> tuple[int, int] | None:
  """The two largest axes (row, column), as Adafactor factors them; None below two axes."""
  if len(shape) < 2:
    return None
  ranked = sorted(range(len(shape)), key=lambda i: shape[i])  # stable: ties keep axis order
  return ranked[-2], ranked[-1]


def _reduced_shape(layout: FactorLayout, keep: int) -> tuple[int, ...] | None:
  """Adafactor's row (``keep=0``) or column (``keep=1``) sums' shape, or the full shape."""
  axes = factored_axes(layout.block_shape)
  if axes is None:
    return layout.blocked_shape if keep == 0 else None
  shape = list(layout.blocked_shape)
  shape[1 + axes[1 - keep]] = 1
  return tuple(shape)


def rotated_adafactor(
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  layout: LayoutRule | None = None,
  eps2: float = 1e-30,
  correct_bias: bool = True,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  precision: MatmulPrecision = "highest",
) -> optax.GradientTransformation:
  r"""Adafactor in the eigenbasis of the Kronecker factors.

  The SOAP paper shows that Shampoo with power 1/2 is Adafactor run in the eigenbasis of
  Shampoo's preconditioner. This block is that optimizer, with SOAP's conventions: the rotated
  gradient ``G'`` feeds a first moment ``m`` (in the eigenbasis) and Adafactor's factored second
  moment — moving averages ``r`` and ``c`` of the row and column sums of ``G'² + eps2`` over the
  two largest axes of each block, recombined as ``V = r cᵀ / Σr``. Blocks with fewer than two
  axes keep an unfactored ``V``, as Adafactor does. The step is ``c_t · (m / (√V + eps))``
  rotated back, ``c_t = √(1 − b2ᵗ) / (1 − b1ᵗ)``; there is no update clipping and no parameter
  scaling. At a refresh ``m`` is rotated exactly and ``r``, ``c`` permuted with the new column
  order.

  Args:
    b1: decay of the first moment.
    b2: decay of the factored second moment.
    eps: added to ``√V``.
    layout: the :class:`~soap_optax.LayoutRule` of the composition (the factored axes are those
      of the working layout, so the state's shapes depend on it).
    eps2: added to ``G'²`` before the sums (Adafactor's ε₁), so that ``Σr`` is never zero.
    correct_bias: apply the bias correction ``c_t``.
    moment_dtype: storage dtype of the moments (default float32, float64 for float64 params).
    mu_dtype: storage dtype of the first moment alone, overriding ``moment_dtype`` for it.
    precision: of the rotations' matmuls: ``"highest"`` (the default), ``"high"``,
      ``"default"``, ``"bfloat16"`` or a ``jax.lax.Precision`` (see
      :func:`~soap_optax.kronecker_stats`).

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  Examples:
    >>> rule = soap_optax.LayoutRule(max_precond_dim=1024)
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.95, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule),
    ...   soap_optax.rotated_adafactor(0.95, 0.95, 1e-8, layout=rule),
    ... )
    >>> state = tx.init({"w": jnp.zeros((4, 3))})
    >>> state[2].nu_row["w"].size + state[2].nu_col["w"].size  # 4 + 3 numbers, not 4·3
    7

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Section 3).
    Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory Cost
    <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _check_moments(
    b1=b1, b2=b2, eps=eps, moment_dtype=moment_dtype, mu_dtype=mu_dtype, frozen_b2=True
  )
  _checks.check_nonnegative("eps2", eps2)
  rule = layout or LayoutRule()

  def direction(carrier, moments, rotation):
    g = rotation.into(carrier.grad)
    mu = optax.tree.update_moment(g, moments["mu"], b1, 1)
    g2 = jnp.square(g) + eps2
    axes = factored_axes(carrier.layout.block_shape)
    if axes is None:
      row = optax.tree.update_moment(g2, moments["nu_row"], b2, 1)
      new, v = {"nu_row": row}, row
    else:
      row_axis, col_axis = axes[0] + 1, axes[1] + 1
      row_sums = jnp.sum(g2, axis=col_axis, keepdims=True)
      col_sums = jnp.sum(g2, axis=row_axis, keepdims=True)
      row = optax.tree.update_moment(row_sums, moments["nu_row"], b2, 1)
      col = optax.tree.update_moment(col_sums, moments["nu_col"], b2, 1)
      new, v = {"nu_row": row, "nu_col": col}, row * col / jnp.sum(row, row_axis, keepdims=True)
    step = rotation.out(divide(mu, jnp.sqrt(v) + eps))
    if correct_bias:
      count = carrier.count
      step = step * (jnp.sqrt(debias(b2, count, mu.dtype)) / debias(b1, count, mu.dtype))
    return step, {"mu": mu, **new}

  moments = (
    Moment("mu", "eigen"),
    Moment("nu_row", "diagonal", lambda lay: _reduced_shape(lay, 0)),
    Moment("nu_col", "diagonal", lambda lay: _reduced_shape(lay, 1)),
  )
  return eigenbasis_optimizer(
    "rotated_adafactor",
    moments,
    direction,
    RotatedAdafactorState,
    moment_dtype=moment_dtype,
    moment_dtypes={"mu": mu_dtype},
    layout=rule,
    precision=precision,
  )


# -- eigenvalue-corrected Shampoo ---------------------------------------------------------------


class EigenvalueCorrectedState(NamedTuple):
  """State of :func:`eigenvalue_corrected`.

  Attributes:
    mu: first moment, in the *parameter* basis.
    nu: corrected eigenvalues ``D``: the moving average of the squared gradient in the eigenbasis.

  With ``LayoutRule(group_equal_layouts=True)`` every field is instead a flat dict keyed by group
  (as the statistics are), each entry in the group's working layout ``(num_blocks, *block)``.
  """

  mu: optax.Updates
  nu: optax.Updates


def eigenvalue_corrected(
  b1: float = 0.9,
  b2: float = 0.95,
  eps: float = 1e-8,
  *,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  precision: MatmulPrecision = "highest",
  layout: LayoutRule | None = None,
) -> optax.GradientTransformation:
  r"""Eigenvalue-corrected Shampoo (EShampoo): Shampoo's eigenbasis with Adam-like eigenvalues.

  Following *Purifying Shampoo* and Distributed Shampoo's eigenvalue-corrected preconditioner,
  the first moment stays in the parameter basis while the preconditioner's eigenvalues are
  replaced by a running second moment measured in the eigenbasis:

    M ← b1 M + (1 − b1) G,    D ← b2 D + (1 − b2) (G ×_k Q_kᵀ)^⊙2,
    u = [ (M̂ ×_k Q_kᵀ) / (√D̂ + eps) ] ×_k Q_k,   M̂ = M / (1 − b1ᵗ),  D̂ = D / (1 − b2ᵗ).

  ``eps`` is added after the bias correction (as Distributed Shampoo does; SOAP adds it before).
  The step uses the basis from before this step's refresh, like every block of the family, and
  ``D`` is permuted with the refresh's column order. With the identity basis this is Adam.

  Args:
    b1: decay of the first moment (in the parameter basis).
    b2: decay of the corrected eigenvalues.
    eps: added to ``√D̂``.
    moment_dtype: storage dtype of ``M`` and ``D`` (default float32, float64 for float64
      params).
    mu_dtype: storage dtype of ``M`` alone, overriding ``moment_dtype`` for it.
    precision: of the rotations' matmuls: ``"highest"`` (the default), ``"high"``,
      ``"default"``, ``"bfloat16"`` or a ``jax.lax.Precision`` (see
      :func:`~soap_optax.kronecker_stats`).
    layout: the :class:`~soap_optax.LayoutRule` of the composition; needed only when it groups
      parameters (``group_equal_layouts``), whose moments are then kept per group.

  Returns:
    An ``optax.GradientTransformation`` placed after :func:`~soap_optax.eigenbasis_refresh`.

  Examples:
    >>> rule = soap_optax.LayoutRule()
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.95, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule, refresh_tolerance=0.01),
    ...   soap_optax.eigenvalue_corrected(0.9, 0.95, 1e-8),
    ... )
    >>> state = tx.init({"w": jnp.zeros((3, 2))})
    >>> state[2].mu["w"].shape  # the first moment stays in the parameter's basis and shape
    (3, 2)

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
    George et al., `Fast Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis
    <https://arxiv.org/abs/1806.03884>`_, 2018.
  """

  _check_moments(b1=b1, b2=b2, eps=eps, moment_dtype=moment_dtype, mu_dtype=mu_dtype)

  def direction(carrier, moments, rotation):
    mu = optax.tree.update_moment(carrier.grad, moments["mu"], b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(rotation.into(carrier.grad), moments["nu"], b2, 2)
    mu_hat = mu / debias(b1, carrier.count, mu.dtype)
    nu_hat = nu / debias(b2, carrier.count, mu.dtype)
    step = rotation.out(divide(rotation.into(mu_hat), jnp.sqrt(nu_hat) + eps))
    return step, {"mu": mu, "nu": nu}

  moments = (Moment("mu", "parameter"), Moment("nu", "diagonal"))
  return eigenbasis_optimizer(
    "eigenvalue_corrected",
    moments,
    direction,
    EigenvalueCorrectedState,
    moment_dtype=moment_dtype,
    moment_dtypes={"mu": mu_dtype},
    layout=layout,
    precision=precision,
  )
