"""The record that carries one parameter's gradient through a chain of Kronecker blocks.

optax hands each block of a chain only its own state and the ``updates`` of the block before.
The Kronecker blocks need more than a gradient (the factor statistics, the bases, which factors
were refreshed), so the first block, :func:`~soap_optax.kronecker_stats`, replaces every gradient
leaf by a :class:`KroneckerUpdate`; each later block reads the fields it needs and fills in its
own; the last block (a rotated optimizer) turns it back into a plain update array. Standard optax
transformations therefore go in front of the first block or behind the last, never in between.

    gradient ─► kronecker_stats ─► eigenbasis_refresh ─► rotated_adam ─► update
                 fills stats        fills basis, next_basis,   reads all,
                                    order, eigenvalues         returns arrays

State that is not shaped like the parameters (statistics, bases, Adafactor's row and column
sums) is kept in flat dicts keyed by the parameter's path and the factor's axis
(``"layers/0/kernel:1"``): the same keys whatever the container of the parameters (dicts, Flax
NNX states), readable in a checkpoint, and free of the per-parameter tuples that NNX's
conversion of the optimizer state would turn into mappings.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from soap_optax import _sharding
from soap_optax._layout import FactorLayout, LayoutRule, from_blocks, group_key, stacked_layout

Array = jax.Array
PerAxis = tuple  # one entry per working axis: an array, or None for an axis without a factor


@functools.partial(
  jax.tree_util.register_dataclass,
  data_fields=[
    "grad",
    "count",
    "finite",
    "stats",
    "basis",
    "next_basis",
    "order",
    "eigenvalues",
    "refreshed",
  ],
  meta_fields=["layout", "dtype", "name", "spec", "members"],
)
@dataclasses.dataclass(frozen=True)
class KroneckerUpdate:
  """One parameter's gradient (or a group's) plus what the Kronecker blocks know about it.

  Every array is in the working layout of :mod:`soap_optax._layout`: the gradient as
  ``(num_blocks, *block_shape)``, each factor as ``(num_blocks, n, n)`` (one per block).

  Attributes:
    grad: the gradient in the working layout, in the compute dtype (float32 for bf16, f16 and
      f32 parameters, float64 for float64 ones).
    count: how many updates the chain made before this one (0 on the first call, which only
      initialises statistics and bases).
    finite: whether the *whole* gradient tree of this step is finite. When it is not, every block
      keeps its state and the update is zero (the step is skipped).
    stats: per working axis, the factor statistics ``L_k`` *including* this step's gradient.
    basis: per axis, the orthonormal bases ``Q_k`` this step's update is computed in (they never
      contain the current gradient).
    next_basis: per axis, the bases after this step's refresh (equal to ``basis`` where the
      factor was not refreshed); rotated optimizers move their moments into them.
    order: per axis, the permutation (int32, ``(num_blocks, n)``) that the refresh applied to the
      columns of ``basis``; diagonal statistics held in the eigenbasis are permuted with it.
    eigenvalues: per axis, eigenvalue estimates matching the columns of ``basis``.
    refreshed: per axis, ``(num_blocks,)`` bools: whether ``next_basis`` differs from ``basis``.
    layout: the static :class:`~soap_optax.FactorLayout` of the parameter.
    dtype: the parameter's (gradient's) dtype; for a group, its members' compute dtype.
    name: the parameter's path in the tree (``"layers/0/kernel"``), which keys its factors; for
      a group, the group's name (see :func:`parameter_groups`).
    spec: the gradient's sharding under explicit sharding, else None.
    members: with ``LayoutRule(group_equal_layouts=True)``, the parameters this record stacks,
      in block order (a group of one parameter has one member); empty without grouping. The
      record's ``layout`` is then the stack's (:func:`~soap_optax._layout.stacked_layout`).
  """

  grad: Array
  count: Array
  finite: Array
  layout: FactorLayout
  stats: PerAxis | None = None
  basis: PerAxis | None = None
  next_basis: PerAxis | None = None
  order: PerAxis | None = None
  eigenvalues: PerAxis | None = None
  refreshed: PerAxis | None = None
  dtype: Any = None
  name: str = ""
  spec: Any = None
  members: tuple[Member, ...] = ()

  def replace(self, **changes) -> KroneckerUpdate:
    return dataclasses.replace(self, **changes)

  def restore(self, working: Array) -> Array | list[Array]:
    """A working-layout array back in the parameter's shape; for a group, one per member.

    The dtype is kept (the blocks return updates in the compute dtype).
    """
    if not self.members:
      return from_blocks(working, self.layout)
    sizes = [m.layout.num_blocks for m in self.members]
    parts = jnp.split(working, np.cumsum(sizes)[:-1].tolist()) if len(sizes) > 1 else [working]
    return [from_blocks(x, m.layout) for x, m in zip(parts, self.members, strict=True)]

  @property
  def live(self) -> Array:
    """Whether this step updates moments and returns a step.

    The first call only initialises statistics and bases; a non-finite step is skipped.
    """
    return self.finite & (self.count > 0)


class Member(NamedTuple):
  """One parameter of a group: where it is in the gradient tree, its path and its own layout."""

  index: int  # type: ignore[assignment]  # position among the leaves of the gradient tree
  name: str
  layout: FactorLayout


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["records"], meta_fields=["structure"]
)
@dataclasses.dataclass(frozen=True)
class GroupedRecords:
  """The records of a grouped chain (one per group) and the gradient tree they came from.

  With grouping, records no longer sit one per parameter, so :func:`~soap_optax.kronecker_stats`
  passes them on in this container; the last block puts every member's update back in
  ``structure``, the gradient tree's structure.
  """

  records: tuple[KroneckerUpdate, ...]
  structure: Any  # a PyTreeDef (hashable, so it can be static)


def is_carrier(x) -> bool:
  return isinstance(x, KroneckerUpdate)


# -- dtypes --------------------------------------------------------------------------------------


def compute_dtype(param_dtype) -> jnp.dtype:
  """The dtype the blocks compute in: at least float32, float64 for float64 parameters."""
  return jnp.promote_types(param_dtype, jnp.float32)


def storage_dtype(param_dtype, override=None) -> jnp.dtype:
  """The dtype a block stores its state in: ``override`` if given, else the compute dtype.

  Storage may be narrower than the compute dtype (bf16 statistics, say): the blocks cast up
  before computing, so decompositions always run in at least float32.
  """
  return jnp.dtype(override) if override is not None else compute_dtype(param_dtype)


# -- parameters and their factors ----------------------------------------------------------------


def parameter_name(path) -> str:
  """A parameter's path as ``"a/b/0"``: the key prefix of its factors in the state.

  A trailing ``.value`` is dropped: it is the attribute of a wrapper around the array (Flax's
  ``nnx.Variable``), which ``nnx.Optimizer`` passes to ``init`` but not to ``update`` (there the
  arrays are bare), so the parameter is named the same in both.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator="/")


def factor_key(name: str, axis: int) -> str:
  """The key of a parameter's factor along working axis ``axis`` in the keyed state."""
  return f"{name}:{axis}"


def named_leaves(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """``(name, leaf)`` for every leaf of ``tree``, with unique names."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  named = [(parameter_name(path), leaf) for path, leaf in flat]
  names = [name for name, _ in named]
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(
      f"Parameters {duplicates} have the same path name; soap_optax keys its state by "
      "parameter path, so rename them (e.g. avoid '/' inside dict keys)."
    )
  return named


def keyed(params, build: Callable[[str, Any], dict[str, Any]]):
  """A flat dict of per-factor (or per-parameter) state: ``build(name, param)`` merged.

  With no parameters — in particular with the leafless placeholder that
  ``optax.tree.map_params`` initialises a transformation with — the result is an opaque empty
  array instead: a leaf is a prefix of any subtree, so map_params matches it against the real
  dict and treats that as non-parameter state.
  """
  leaves = named_leaves(params)
  if not leaves:
    return jnp.zeros((0,), jnp.float32)
  out = {}
  for name, p in leaves:
    out.update(build(name, p))
  return out


class Group(NamedTuple):
  """A unit of the state: one parameter, or (grouping) the parameters computed as one stack.

  Attributes:
    name: the key prefix of its state: the parameter's path, or for a group of several the first
      member's path and how many follow (``"layers/0/kernel+15"``).
    layout: its working layout (a group's: the stack of its members').
    dtype: the dtype its state is derived from: the parameter's, or (grouping) the members'
      compute dtype.
    spec: its members' sharding under explicit sharding; under automatic sharding (a group of one
      there), how the parameter is placed when the groups are read from arrays (``init`` places
      the group's arrays alike), not from traced values; else None.
    members: the grouped parameters (empty without grouping).
  """

  name: str
  layout: FactorLayout
  dtype: Any
  spec: Any
  members: tuple[Member, ...]


def group_name(names: Sequence[str]) -> str:
  """A group's name: its first member's path, with ``+k`` for the ``k`` members that follow.

  Readable in a checkpoint (it says which parameters the arrays hold) and stable: it changes only
  when the group's members change, which changes its arrays' shapes anyway. A group of one keeps
  the parameter's own path, so a parameter whose layout is unique is keyed as without grouping.
  """
  return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1}"


def parameter_groups(tree, rule: LayoutRule) -> list[Group]:
  """The units the state of ``tree``'s parameters (or gradients) is kept and computed in.

  Without ``rule.group_equal_layouts``, one per parameter, in tree order. With it, parameters of
  equal :func:`~soap_optax._layout.group_key`, compute dtype and explicit sharding form one group
  (members in tree order; groups in the order of their first member). Parameters and their
  gradients give the same groups, so ``init`` and ``update`` agree. Under automatic sharding on
  several devices a traced parameter's type does not say how it is divided, so nothing can tell
  equally divided parameters apart: there each parameter is a group of its own, and ``init``
  places its arrays as the parameter is placed (grouped arrays spread over the mesh let XLA hand
  the update back in their layout, not the parameter's).
  """
  named = named_leaves(tree)
  if not rule.group_equal_layouts:
    return [
      Group(name, rule.layout(x.shape, name), x.dtype, _sharding.spec_of(x), ())
      for name, x in named
    ]
  found: dict[tuple, list[tuple[Member, Any]]] = {}
  for index, (name, x) in enumerate(named):
    layout = rule.layout(x.shape, name)
    spec = _sharding.spec_of(x)
    alone = _sharding.sharding_unknown(x)
    key = (group_key(layout), compute_dtype(x.dtype).name, spec, index if alone else None)
    placed = _sharding.placed_spec(x) if alone else spec
    found.setdefault(key, []).append((Member(index, name, layout), placed))
  groups = []
  for (_, dtype, _, _), entries in found.items():
    members = tuple(member for member, _ in entries)
    name = group_name([m.name for m in members])
    layout = stacked_layout([m.layout for m in members])
    groups.append(Group(name, layout, jnp.dtype(dtype), entries[0][1], members))
  names = [g.name for g in groups]
  if len(set(names)) != len(names):
    raise ValueError(
      f"Parameter groups {sorted(n for n in names if names.count(n) > 1)} have the same name; "
      "rename the parameters whose paths end in '+<number>'."
    )
  return groups


def keyed_groups(params, rule: LayoutRule, build: Callable[[Group], dict[str, Any]]):
  """:func:`keyed` over the units of :func:`parameter_groups` rather than the parameters."""
  groups = parameter_groups(params, rule)
  if not groups:
    return jnp.zeros((0,), jnp.float32)
  out = {}
  for group in groups:
    out.update(build(group))
  return out


# -- checks --------------------------------------------------------------------------------------


def _check_field_dtypes(leaf: KroneckerUpdate) -> bool:
  """A standard optax transform mapped over a record turns its integer fields into floats."""
  ok = jnp.issubdtype(leaf.count.dtype, jnp.integer) and leaf.finite.dtype == bool
  for order in leaf.order or ():
    ok = ok and (order is None or jnp.issubdtype(order.dtype, jnp.integer))
  return ok


_LAST_BLOCKS = "rotated_adam, rotated_adafactor, eigenvalue_corrected, shampoo_precondition"


def expect_carriers(updates, block: str, needs: str, produced_by: str) -> None:
  """Raises a clear error when a block is placed where its inputs are not available."""
  for leaf in jax.tree.leaves(updates, is_leaf=is_carrier):
    if not is_carrier(leaf):
      raise TypeError(
        f"{block} expects the updates produced by {produced_by} (a KroneckerUpdate per "
        f"parameter) but received a {type(leaf).__name__}. Place it after {produced_by} in "
        "the optax.chain, with no standard optax transformation in between."
      )
    if not _check_field_dtypes(leaf):
      raise TypeError(
        f"{block} received a KroneckerUpdate that a standard optax transformation has mapped "
        f"over (its integer fields are no longer integers). Place {block} directly after "
        f"{produced_by}; standard transformations belong before kronecker_stats or after the "
        f"block that returns plain updates ({_LAST_BLOCKS})."
      )
    if getattr(leaf, needs) is None:
      raise TypeError(
        f"{block} needs `{needs}`, which {produced_by} provides: place {produced_by} before "
        f"{block} in the optax.chain."
      )


def check_layout(carrier: KroneckerUpdate, rule: LayoutRule, block: str) -> None:
  """Raises when ``block`` was built with another layout than the statistics it receives."""
  if bool(carrier.members) != rule.group_equal_layouts:
    done = "grouped" if carrier.members else "did not group"
    raise ValueError(
      f"{block} was built with {rule}, but kronecker_stats {done} the parameters "
      f"(group_equal_layouts={bool(carrier.members)}). Pass the same LayoutRule to every block "
      "of the chain."
    )
  for name, layout in [(m.name, m.layout) for m in carrier.members] or [
    (carrier.name, carrier.layout)
  ]:
    expected = rule.layout(layout.shape, name)
    if expected != layout:
      raise ValueError(
        f"{block} was built with {rule}, which lays out parameter {name!r} of shape "
        f"{layout.shape} as blocks {expected.blocked_shape} (factored "
        f"{expected.factored}), but kronecker_stats laid it out as {layout.blocked_shape} "
        f"(factored {layout.factored}). Pass the same LayoutRule to every block of the chain."
      )


def check_grouping(updates, rule: LayoutRule | None, block: str) -> None:
  """Raises when grouped records reach a block that keeps per-parameter state."""
  if isinstance(updates, GroupedRecords) and (rule is None or not rule.group_equal_layouts):
    raise ValueError(
      f"kronecker_stats grouped the parameters (LayoutRule(group_equal_layouts=True)), so "
      f"{block} must be built with the same rule: pass it as {block}(..., layout=rule)."
    )
