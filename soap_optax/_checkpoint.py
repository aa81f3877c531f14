"""The optimizer state as a checkpoint's restore target, laid out on the current devices.

A checkpoint library restores a sharded array onto the shardings of the target it is given. The
target of an optimizer state must therefore say, for every leaf, where it lives on the devices of
the run that restores it, which need not be those of the run that saved it: orbax refuses a
target without shardings when the topology changed ("Topology mismatch detected"). The state's
structure, shapes and dtypes do not depend on the devices (the padding of factor stacks and their
assignment to devices happen inside ``update``), so any checkpoint of it restores onto any mesh,
once the target carries that mesh's shardings.
"""

from __future__ import annotations

from typing import Any

import jax
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def _concrete_mesh(params) -> jax.sharding.Mesh | None:
  """The mesh in context (``jax.set_mesh``), else the mesh of any parameter's sharding."""
  mesh = jax.sharding.get_mesh()
  if not mesh.empty:
    return mesh
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
      return sharding.mesh
  return None


def _single_device(params) -> jax.Device:
  for leaf in jax.tree.leaves(params):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and len(sharding.device_set) == 1:
      return next(iter(sharding.device_set))
  return jax.local_devices()[0]


def abstract_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """The shapes, dtypes and shardings of ``tx.init(params)``, computed without running it.

  The restore target of a checkpointed optimizer state: pass it to the checkpoint library (for
  orbax, ``ocp.args.StandardRestore``) and every leaf comes back where ``tx.init(params)`` would
  have put it on the current devices, whatever topology wrote the checkpoint — more or fewer
  processes, another mesh shape, or a single device. The parameters' target is built the same
  way from the model's own shardings.

  On a mesh (the one in context, ``jax.set_mesh``, or the one the parameters are sharded on),
  moments shaped like a parameter are sharded like it, factor statistics and bases are spread
  over the devices by the library's own rule, and scalars are replicated; in both of JAX's
  sharding modes these are the shardings of an eager ``tx.init(params)``. Without a mesh every
  leaf is placed on the parameters' device.

  Args:
    tx: the optimizer (any optax transformation; soap_optax's are laid out as described).
    params: the parameters, as arrays or ``jax.ShapeDtypeStruct`` (with their shardings on a
      mesh: nothing is computed or moved).

  Returns:
    A tree of ``jax.ShapeDtypeStruct`` with the structure of ``tx.init(params)``, each with its
    ``sharding``.

  Examples:
    >>> import jax, jax.numpy as jnp, soap_optax
    >>> tx = soap_optax.soap(learning_rate=1e-3)
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> target = soap_optax.abstract_state(tx, params)
    >>> jax.tree.structure(target) == jax.tree.structure(tx.init(params))
    True
    >>> all(isinstance(x.sharding, jax.sharding.Sharding) for x in jax.tree.leaves(target))
    True

    With orbax (``manager`` an ``ocp.CheckpointManager``), on whatever devices the restart has::

      target = {"params": params_target, "opt_state": soap_optax.abstract_state(tx, params_target)}
      restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  """
  mesh = _concrete_mesh(params)
  if mesh is None or mesh.size == 1:
    device = _single_device(params)
    abstract = jax.eval_shape(tx.init, params)
    place = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place), abstract)

  # Trace init on the same devices with every axis explicit: array types then carry their
  # shardings, and those of init's outputs are what an eager init places. (Under automatic
  # sharding an eager init pins its state with sharding constraints, which shapes alone do not
  # show.) A mesh with explicit axes already is one.
  explicit = mesh
  if AxisType.Explicit not in mesh.axis_types:
    explicit = jax.sharding.Mesh(
      mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
    )

  def spec_of(leaf) -> PartitionSpec:
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
      return sharding.spec
    return PartitionSpec()  # an unsharded parameter is replicated over the mesh

  typed = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(explicit, spec_of(x))),
    params,
  )
  with jax.set_mesh(explicit):
    abstract = jax.eval_shape(tx.init, typed)

  def target(x):
    # Scalars' types carry no sharding: an eager init replicates them.
    spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree.map(target, abstract)
