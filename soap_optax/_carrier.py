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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from soap_optax._layout import FactorLayout

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
  meta_fields=["layout", "dtype"],
)
@dataclasses.dataclass(frozen=True)
class KroneckerUpdate:
  """One parameter's gradient plus what the Kronecker blocks know about it.

  Attributes:
    grad: the gradient, reshaped to ``layout.working_shape``, in the statistics' dtype.
    count: how many updates the chain made before this one (0 on the first call, which only
      initialises statistics and bases).
    finite: whether the *whole* gradient tree of this step is finite. When it is not, every block
      keeps its state and the update is zero (the step is skipped).
    stats: per working axis, the factor statistic ``L_k`` *including* this step's gradient.
    basis: per axis, the orthonormal basis ``Q_k`` this step's update is computed in (it never
      contains the current gradient).
    next_basis: per axis, the basis after this step's refresh (equal to ``basis`` when the factor
      was not refreshed); rotated optimizers move their moments into it.
    order: per axis, the permutation (int32) that the refresh applied to the columns of
      ``basis``; diagonal statistics held in the eigenbasis are permuted with it.
    eigenvalues: per axis, eigenvalue estimates matching the columns of ``basis``.
    refreshed: per axis, a bool scalar: whether ``next_basis`` differs from ``basis``.
    layout: the static :class:`~soap_optax.FactorLayout` of the parameter.
    dtype: the parameter's (gradient's) dtype, which the final update is cast back to.
  """

  grad: Array
  count: Array
  finite: Array
  stats: PerAxis | None = None
  basis: PerAxis | None = None
  next_basis: PerAxis | None = None
  order: PerAxis | None = None
  eigenvalues: PerAxis | None = None
  refreshed: PerAxis | None = None
  layout: FactorLayout | None = None
  dtype: Any = None

  def replace(self, **changes) -> KroneckerUpdate:
    return dataclasses.replace(self, **changes)

  def restore(self, working: Array) -> Array:
    """Reshapes a working-shape array back to the parameter's shape and dtype."""
    return working.reshape(self.layout.shape).astype(self.dtype)


def is_carrier(x) -> bool:
  return isinstance(x, KroneckerUpdate)


def per_leaf(fn, params):
  """``jax.tree.map(fn, params)`` for block state whose leaves are not parameter-shaped.

  Statistics, bases and Adafactor's row/column sums are trees of the parameters' structure whose
  leaves are tuples (one entry per working axis). With no parameters — in particular with the
  leafless placeholder that ``optax.tree.map_params`` initialises a transformation with — the
  state is an opaque empty array instead: a leaf is a prefix of any subtree, so map_params
  matches it against the real state and treats that as non-parameter state rather than trying
  to map the parameters' specs over the tuples.
  """
  if not jax.tree.leaves(params):
    return jax.numpy.zeros((0,), jax.numpy.float32)
  return jax.tree.map(fn, params)


def per_parameter(fn, num_outputs: int, updates, *trees):
  """Applies ``fn`` to each :class:`KroneckerUpdate` of ``updates`` with its state subtrees.

  ``trees`` (block states) have ``updates``' structure down to its records (their leaves may be
  tuples, one entry per axis). ``fn`` returns ``num_outputs`` values; each is reassembled into a
  tree of ``updates``' structure.
  """
  treedef = jax.tree.structure(updates, is_leaf=is_carrier)
  if treedef.num_leaves == 0:  # no parameters: the states are opaque empty leaves (per_leaf)
    return (updates, *trees[: num_outputs - 1])
  columns = [treedef.flatten_up_to(t) for t in (updates, *trees)]
  results = [fn(*args) for args in zip(*columns, strict=True)]
  return tuple(treedef.unflatten([r[i] for r in results]) for i in range(num_outputs))


def _check_field_dtypes(leaf: KroneckerUpdate) -> bool:
  """A standard optax transform mapped over a record turns its integer fields into floats."""
  ok = jax.numpy.issubdtype(leaf.count.dtype, jax.numpy.integer) and leaf.finite.dtype == bool
  for order in leaf.order or ():
    ok = ok and (order is None or jax.numpy.issubdtype(order.dtype, jax.numpy.integer))
  return ok


def expect_carriers(updates, block: str, needs: str, produced_by: str) -> None:
  """Raises a clear error when a block is placed where its inputs are not available."""
  leaves = jax.tree.leaves(updates, is_leaf=is_carrier)
  for leaf in leaves:
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
        "block that returns plain updates (rotated_adam, rotated_adafactor, eigenvalue_corrected, "
        "shampoo_precondition)."
      )
    if getattr(leaf, needs) is None:
      raise TypeError(
        f"{block} needs `{needs}`, which {produced_by} provides: place {produced_by} before "
        f"{block} in the optax.chain."
      )


def check_layout(carrier: KroneckerUpdate, rule, block: str) -> None:
  """Raises when ``block`` was built with another layout than the statistics it receives."""
  expected = rule.layout(carrier.layout.shape)
  if expected != carrier.layout:
    raise ValueError(
      f"{block} was built with {rule}, which lays out a parameter of shape "
      f"{carrier.layout.shape} as {expected.working_shape} (factored {expected.factored}), but "
      f"kronecker_stats laid it out as {carrier.layout.working_shape} (factored "
      f"{carrier.layout.factored}). Pass the same LayoutRule to every block of the chain."
    )
