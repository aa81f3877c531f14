"""An ungrouped state read into the grouped layout of ``LayoutRule(group_equal_layouts=True)``.

Without grouping the state is keyed by parameter path (``"layers/0/kernel:1"``) and the moments
are shaped like the parameters; with it, keyed by group and in the group's working layout (the
members' blocks one after another). The two hold the same numbers, so a run (or a checkpoint)
can switch to grouping without losing its statistics, bases or moments.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from soap_optax._carrier import Group, factor_key, parameter_groups
from soap_optax._eigenbasis import EigenbasisState
from soap_optax._layout import LayoutRule, to_blocks
from soap_optax._rotated import EigenvalueCorrectedState, RotatedAdafactorState, RotatedAdamState
from soap_optax._shampoo import ShampooPreconditionState
from soap_optax._stats import KroneckerStatsState, factor_shapes

_MOMENT_STATES = (
  RotatedAdamState,
  RotatedAdafactorState,
  EigenvalueCorrectedState,
  ShampooPreconditionState,
)
# Moments that are kept in flat dicts keyed by parameter path even without grouping.
_KEYED_MOMENTS: dict[type, tuple[str, ...]] = {RotatedAdafactorState: ("nu_row", "nu_col")}


def group_state(state: optax.OptState, params: optax.Params, layout: LayoutRule) -> optax.OptState:
  """``state`` of a chain built without grouping, as the same chain built with ``layout`` has it.

  Statistics, bases, eigenvalue estimates and refresh counters of a group's members are
  concatenated along the block axis in the group's order; moments shaped like the parameters are
  moved to the working layout and concatenated the same way; everything else (counts, the
  learning rate's and the decay's state) is kept. The next update from the result equals the
  next update of the ungrouped chain from ``state`` (within float32 rounding of the batched
  products). Works on the state of any alias or ``scale_by_*`` (nested in ``optax.chain``,
  ``inject_hyperparams`` and the like), not on the state type of a rule of your own built with
  ``eigenbasis_optimizer``. The arrays are not placed on a mesh: put them where
  ``tx.init(params)`` puts its own (for example ``jax.device_put`` with that state's
  shardings).

  Args:
    state: the ungrouped state (e.g. restored from a checkpoint written without grouping).
    params: the parameters it belongs to.
    layout: the rule of the grouped chain: the ungrouped chain's rule with
      ``group_equal_layouts=True`` (for an alias, ``LayoutRule(max_precond_dim, merge_dims,
      precondition_1d, block_size, stacked_axes, factor_axes, group_equal_layouts=True)`` with
      its arguments; ``max_precond_dim=None`` is 10000).

  Returns:
    The state with the structure of ``tx.init(params)`` for the grouped chain ``tx``.

  Raises:
    ValueError: if ``layout`` does not group.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((3, 2))}
    >>> state = soap_optax.soap().init(params)
    >>> rule = soap_optax.LayoutRule(group_equal_layouts=True)
    >>> grouped = soap_optax.group_state(state, params, rule)
    >>> sorted(optax.tree.get(grouped, "KroneckerStatsState").stats)
    ['a+1:0', 'a+1:1']
    >>> optax.tree.get(grouped, "mu")["a+1"].shape  # both parameters' blocks, one after another
    (2, 3, 2)
  """
  if not layout.group_equal_layouts:
    raise ValueError(
      "group_state needs the grouped chain's rule: LayoutRule(..., group_equal_layouts=True)."
    )
  groups = parameter_groups(params, layout)
  return _convert(state, groups)


def _convert(node, groups: list[Group]):
  if isinstance(node, KroneckerStatsState):
    return node._replace(stats=_factors(node.stats, groups))
  if isinstance(node, EigenbasisState):
    return EigenbasisState(*(_factors(field, groups) for field in node))
  if isinstance(node, _MOMENT_STATES):
    keyed = _KEYED_MOMENTS.get(type(node), ())
    return type(node)(*(_moment(getattr(node, f), groups, f in keyed) for f in node._fields))
  if isinstance(node, tuple) and hasattr(node, "_fields"):  # a NamedTuple: optax's states
    return type(node)(*(_convert(x, groups) for x in node))
  if isinstance(node, (tuple, list)):
    return type(node)(_convert(x, groups) for x in node)
  if isinstance(node, dict):
    return {k: _convert(v, groups) for k, v in node.items()}
  return node


def _joined(parts: list) -> jax.Array:
  return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _factors(field, groups: list[Group]):
  """A dict keyed ``"<path>:<axis>"`` re-keyed ``"<group>:<axis>"``, members concatenated."""
  if not hasattr(field, "keys"):  # the placeholder of a state without parameters
    return field
  out = {}
  for group in groups:
    for axis in factor_shapes(group.layout):
      parts = [field[factor_key(m.name, axis)] for m in group.members]
      out[factor_key(group.name, axis)] = _joined(parts)
  return out


def _moment(field, groups: list[Group], keyed: bool) -> Any:
  """A moment shaped like the parameters (or keyed by path) as a dict keyed by group."""
  if isinstance(field, optax.EmptyState) or not jax.tree.leaves(field):
    return field
  if keyed:
    return {
      g.name: _joined([field[m.name] for m in g.members])
      for g in groups
      if all(m.name in field for m in g.members)
    }
  leaves = jax.tree.leaves(field)
  return {
    g.name: _joined([to_blocks(leaves[m.index], m.layout) for m in g.members]) for g in groups
  }
