"""Specification: blocked optimizers run on a mesh with many factors per device.

With ``block_size`` a large matrix becomes a stack of many small factors, and each device
decomposes its slice of the stack. jaxlib 0.10's batched CPU LAPACK kernels share XLA's thread
pool with the simulated devices; handed 16 factors per device at once they deadlocked (the first
step never returned). On a CPU mesh the decompositions now go to LAPACK one matrix at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import soap_optax


@pytest.mark.parametrize("first_basis", ["eigh", "qr"])
def test_a_blocked_step_with_16_factors_per_device_finishes(first_basis):
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)
  # 1024 × 1024 in blocks of 128: 64 blocks, two factors each, 16 factors per device.
  tx = soap_optax.soap(1e-3, block_size=128, precondition_frequency=2, first_basis=first_basis)
  rng = np.random.default_rng(0)
  with jax.set_mesh(mesh):
    sharding = NamedSharding(mesh, P("fsdp", "tp"))
    params = {"w": jax.device_put(jnp.zeros((1024, 1024)), sharding)}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for _ in range(3):  # the first basis, an update, a scheduled refresh
      grads = {
        "w": jax.device_put(jnp.asarray(rng.standard_normal((1024, 1024)), jnp.float32), sharding)
      }
      updates, state = step(grads, state, params)
  assert bool(jnp.all(jnp.isfinite(updates["w"])))
  assert float(jnp.linalg.norm(updates["w"])) > 0
  refreshes = optax.tree.get(state, "EigenbasisState").refreshes
  counts = np.concatenate([np.asarray(r) for r in refreshes.values()])
  assert counts.size == 128 and np.all(counts == 2), counts
