"""Where the optimizer's arrays live on a device mesh.

The state of a Kronecker-factored optimizer is mostly statistics and bases, ``n × n`` per factor,
which no parameter sharding describes. This module decides, statically and deterministically,
how they are spread over a mesh (:func:`spread`: as evenly as the shapes allow, so that each
device holds about its share), and hides the difference between JAX's two sharding modes from
the blocks:

* under **explicit** sharding (``jax.make_mesh``'s default), array types carry their sharding
  and an ambiguous contraction is an error, so each block runs its per-parameter arithmetic in
  an automatic region (:func:`jax.sharding.auto_axes`) and states the shardings of what comes
  out (:func:`relayout`);
* under **automatic** sharding, the blocks pin their state with sharding constraints and let the
  partitioner choose everything else;
* without a mesh, nothing is constrained and nothing here runs.

The mesh is the one in context (``jax.set_mesh``), or, under explicit sharding, the mesh the
parameters' types carry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

Mesh = jax.sharding.AbstractMesh


def find_mesh(tree) -> Mesh | None:
  """The mesh to lay the optimizer's state out on, or None (one device, or no mesh known).

  The context mesh comes first; otherwise the mesh in the sharding type of any leaf of ``tree``
  (explicit sharding carries it in the type). A mesh of a single device counts as none.
  """
  mesh: Mesh | None = jax.sharding.get_abstract_mesh()
  if mesh is not None and mesh.empty:
    mesh = None
    for leaf in jax.tree.leaves(tree):
      try:
        candidate = jax.typeof(leaf).sharding.mesh
      except (AttributeError, TypeError):
        continue
      if not candidate.empty:
        mesh = candidate
        break
  if mesh is None or mesh.size == 1:
    return None
  return mesh


def is_explicit(mesh: Mesh | None) -> bool:
  return mesh is not None and AxisType.Explicit in mesh.axis_types


def _spreading_axes(mesh: Mesh) -> list[str]:
  """Mesh axes the state is spread over: those of more than one device, in the mesh's mode."""
  wanted = AxisType.Explicit if is_explicit(mesh) else AxisType.Auto
  return [
    name
    for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types, strict=True)
    if size > 1 and kind == wanted
  ]


def device_count(mesh: Mesh | None) -> int:
  """How many devices :func:`spread` can divide an axis over (1 without a mesh)."""
  if mesh is None:
    return 1
  count = 1
  for name in _spreading_axes(mesh):
    count *= mesh.shape[name]
  return count


def stack_spec(mesh: Mesh | None, rank: int) -> PartitionSpec | None:
  """The sharding of a stack of matrices whose leading axis is divided over every device."""
  if mesh is None:
    return None
  axes = tuple(_spreading_axes(mesh))
  return PartitionSpec(axes if axes else None, *([None] * (rank - 1)))


def spread(shape: Sequence[int], mesh: Mesh | None) -> PartitionSpec | None:
  """A sharding that divides an array of ``shape`` over as many devices as its sizes allow.

  Each mesh axis (in mesh order) goes to the first array axis (in order) whose remaining length
  it divides. For a stack of factors ``(num_blocks, n, n)`` this divides the blocks when their
  count allows and the rows of each factor otherwise, so each device holds about its share.
  Deterministic and a function of the shape and the mesh only, so a restored checkpoint lands on
  the same layout.
  """
  if mesh is None:
    return None
  remaining = list(shape)
  assigned: list[list[str]] = [[] for _ in shape]
  for name in _spreading_axes(mesh):
    size = mesh.shape[name]
    for axis, length in enumerate(remaining):
      if length >= size and length % size == 0:
        assigned[axis].append(name)
        remaining[axis] //= size
        break
  return PartitionSpec(*[None if not a else a[0] if len(a) == 1 else tuple(a) for a in assigned])


def spec_of(x) -> PartitionSpec | None:
  """The sharding in ``x``'s type under explicit sharding; None otherwise."""
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  if sharding.mesh.empty or AxisType.Explicit not in sharding.mesh.axis_types:
    return None
  return sharding.spec


def sharding_unknown(x) -> bool:
  """Whether ``x`` lies on a mesh of several devices under automatic sharding, where a traced
  value's type does not say how it is divided (XLA decides). True for arrays and traced values
  alike, so that ``init`` and ``update`` agree."""
  try:
    mesh = jax.typeof(x).sharding.mesh
  except (AttributeError, TypeError):
    return False
  return not mesh.empty and mesh.size > 1 and AxisType.Explicit not in mesh.axis_types


def placed_spec(x) -> PartitionSpec | None:
  """How an array (not a traced value) is divided under automatic sharding, else None."""
  sharding = getattr(x, "sharding", None)
  if isinstance(x, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
    return None
  return sharding.spec


def constrain(x, spec: PartitionSpec | None, mesh: Mesh | None):
  """Pins ``x`` to ``spec`` (reshard under explicit sharding, a constraint under automatic)."""
  if mesh is None or spec is None:
    return x
  # Inside an automatic region of an explicit mesh, the context mesh says which mode applies.
  context = jax.sharding.get_abstract_mesh()
  if is_explicit(mesh if context.empty else context):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


def relayout(
  fn: Callable[..., Any], out_specs: Any, mesh: Mesh | None, in_specs: Any = None
) -> Callable[..., Any]:
  """``fn`` run so that its outputs have ``out_specs`` (a pytree of specs matching them).

  Under explicit sharding ``fn`` runs in an automatic region: its contractions and reshapes need
  no sharding annotations, and the partitioner inserts the communication. Under automatic
  sharding the outputs are constrained. Without a mesh, ``fn`` itself. ``in_specs`` (specs for
  the positional arguments) pins the inputs where they are on entry, so that the partitioner
  moves data inside ``fn`` rather than before it — what keeps a runtime branch's communication
  inside the branch.
  """
  if mesh is None:
    return fn

  def pinned(*args):
    if in_specs is not None:
      args = _pin(args, in_specs, mesh)
    out = fn(*args)
    return out if is_explicit(mesh) else _pin(out, out_specs, mesh)

  if is_explicit(mesh):
    return jax.sharding.auto_axes(pinned, out_sharding=out_specs)
  return pinned


def _pin(tree, specs, mesh):
  pin = lambda spec, x: constrain(x, spec, mesh)  # noqa: E731
  return jax.tree.map(pin, specs, tree, is_leaf=lambda spec: spec is None)


@contextlib.contextmanager
def using(mesh: Mesh | None):
  """Makes ``mesh`` the context mesh when it came from the arrays' types rather than context."""
  if mesh is None or not jax.sharding.get_abstract_mesh().empty:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh):
    yield
