"""Specification: the refresh's decompositions are divided over the devices, and the refresh adds
no communication to the steps that do not refresh.

Both are read off the compiled per-device program (`benchmarks/_hlo.py`): after SPMD
partitioning, each LAPACK call's operand is that device's share of the stack it decomposes.
"""

from __future__ import annotations

import _hlo
import jax
import jax.numpy as jnp
import pytest
import transformer_layer
from jax.sharding import AxisType, NamedSharding

import soap_optax

PARAMS = transformer_layer.PARAMS[2]
# (alias, the decomposition of its scheduled refresh, decompositions per factor as counted).
# EShampoo's adaptive refresh maps over its slice of the stack (`lax.map`, counted per factor):
# a sorted power step + QR, then warm QR iterations in a loop whose trip count is decided at run
# time, which the reader counts as one iteration: two QRs per factor.
ALIASES = [("soap", "qr", 1), ("shampoo", "eigh", 1), ("eshampoo", "qr", 2)]


def _compiled(name, axis_type, **kwargs):
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
  tx = getattr(soap_optax, name)(max_precond_dim=256, **kwargs)
  with jax.set_mesh(mesh):
    params = {
      k: jax.device_put(jnp.ones(s), NamedSharding(mesh, p)) for k, (s, p) in PARAMS.items()
    }
    state = tx.init(params)
    text = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  return _hlo.read(text), tx


def _total_work(name, kind, block_size):
  """The decomposition work of one refresh of every factor: Σ n³ over all blocks."""
  rule = soap_optax.LayoutRule(256, block_size=block_size)
  total = 0
  for shape, _ in PARAMS.values():
    layout = rule.layout(shape)
    total += sum(layout.num_blocks * n**3 for n in layout.factor_sizes if n is not None)
  return total


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("name, kind, per_factor", ALIASES)
def test_with_equal_blocks_each_device_decomposes_at_most_1_5_times_its_share(
  name, kind, per_factor, axis_type
):
  program, _ = _compiled(name, axis_type, block_size=32)
  per_device = program.work(kind, scope="eigenbasis_refresh/scheduled")
  share = per_factor * _total_work(name, kind, 32) / 8
  # Every device runs the same program, so it does at least the average (less would mean
  # decompositions the count missed) and, spread well, not much more.
  assert share <= per_device <= 1.5 * share, per_device / share


def test_the_first_eigh_is_divided_over_the_devices_too():
  program, _ = _compiled("soap", AxisType.Explicit, block_size=32)
  per_device = program.work("eigh", scope="eigenbasis_refresh/first")
  assert 0 < per_device <= 1.5 * _total_work("soap", "eigh", 32) / 8


def test_the_eigh_free_path_compiles_no_eigh():
  program, _ = _compiled("shampoo", AxisType.Explicit, block_size=32, method="qr", first_basis="qr")
  assert program.work("eigh") == 0
  assert program.work("qr", scope="eigenbasis_refresh/scheduled") > 0


@pytest.mark.parametrize("block_size", [None, 32], ids=["unblocked", "blocked"])
def test_the_refresh_adds_no_communication_outside_its_branch(block_size):
  """Collectives that touch the bases, their eigenvalues or counters run only inside the refresh
  (or the moment transfer it triggers); the others are the per-step arithmetic's."""
  program, _ = _compiled("eshampoo", AxisType.Explicit, block_size=block_size)
  state_names = ("basis", "eigenvalues", "refreshes", "qr_iterations", "concatenate")
  outside = [
    (opcode, name)
    for opcode, name in program.collectives
    if "eigenbasis_refresh" not in name and "moment_transfer" not in name
  ]
  assert program.count_collectives("eigenbasis_refresh") > 0
  assert not [c for c in outside if any(s in c[1] for s in state_names)], outside
