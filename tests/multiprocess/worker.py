"""One process of the multi-process tests, started by ``tests/test_multiprocess.py``.

Not a test module (the main collection ignores this directory): the parent starts it with the
device count in ``XLA_FLAGS``, and it writes what it computed to ``--out`` for the parent to
compare. Roles:

* ``pair``: one of 2 processes (4 CPU devices each) on JAX's distributed runtime, one
  ``(fsdp=4, tp=2)`` mesh over all 8 devices. Runs every case (alias × block_size), saves an
  orbax checkpoint after the first update, then restores it into the same processes and
  finishes the run again (restore (a)).
* ``mesh8``: one process with 8 devices, the same mesh; then the pair's checkpoints restored
  onto an ``(fsdp=2, tp=4)`` mesh (restore (b)), and ``abstract_state`` against eager ``init``
  on both of JAX's sharding modes.
* ``single``: one process, one device; then the pair's checkpoints restored onto it
  (restore (c)).
* ``train`` / ``resume``: the killed-process test. ``train`` runs SOAP with a checkpoint every 2
  steps and kills one of the pair (``--kill``) at a chosen point; ``resume`` restores the latest
  checkpoint and finishes, and runs the uninterrupted reference in the same processes.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path[:0] = [TESTS, os.path.join(TESTS, "mesh")]

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import aliases  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from test_sharded_state import WELL_CONDITIONED, optimizer  # noqa: E402

import soap_optax  # noqa: E402

# The mesh tests' well-conditioned case, with its seed and its three updates: only the short side
# (16) of each kernel is factored, and its statistic is a well-conditioned Wishart matrix. In
# blocks of 32 the same side is factored, from 16 × 32 blocks.
TABLE = WELL_CONDITIONED
BLOCK = 32
# Every alias with the authors' unblocked layout and with blocks.
CASES = [(name, block) for name in aliases.ALIASES for block in (None, BLOCK)]
UPDATES = 3  # the first basis at count 0, a refresh at count 2
SAVE_AFTER = 1  # the checkpoint's step: the continuation crosses the refresh at count 2
SEED = 3


def case_id(name: str, block: int | None) -> str:
  return f"{name}-block{block}"


def values(count: int) -> list[dict[str, np.ndarray]]:
  """The start parameters, then a gradient per update: the same numbers in every process."""
  rng = np.random.default_rng(SEED)
  return [
    {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in TABLE.items()}
    for _ in range(count)
  ]


def on_mesh(mesh):
  """Places a tree of full NumPy values on ``mesh``: each process builds only its own shards."""

  def place(tree):
    return {
      k: jax.make_array_from_callback(
        v.shape, NamedSharding(mesh, TABLE[k][1]), lambda index, v=v: v[index]
      )
      for k, v in tree.items()
    }

  return place


def on_device(tree):
  return jax.device_put(tree, jax.devices()[0])


def shards(tree) -> dict:
  """What this process holds of each leaf: ``{key: [(index, values), ...]}``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = jax.tree_util.keystr(path)
    out[key] = [
      (tuple((s.start, s.stop) for s in shard.index), np.asarray(shard.data))
      for shard in leaf.addressable_shards
    ]
  return out


def structure(state) -> list:
  """The state's leaves as (path, shape, dtype): what must not depend on the devices."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.eval_shape(lambda s: s, state))[0]
  return [(jax.tree_util.keystr(p), x.shape, str(x.dtype)) for p, x in leaves]


@functools.cache
def stepper(name: str, block: int | None):
  tx = optimizer(name, max_precond_dim=16, block_size=block)
  return tx, aliases.stepper(tx)


def manager(directory: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, **options)
  )


def target(tx, place, start):
  """The restore target on the current devices: the parameters' shardings, and the optimizer's
  own (``soap_optax.abstract_state``)."""
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), place(start)
  )
  return {"params": params, "opt_state": soap_optax.abstract_state(tx, params)}


def train(name, block, place, grads, params=None, state=None, save_to=None, save_at=None):
  """Runs the updates of ``grads`` from ``params`` (and ``state``, or a fresh init)."""
  tx, step = stepper(name, block)
  if state is None:
    state = tx.init(params)
  for i, g in enumerate(grads, 1):
    params, state, _ = step(params, state, place(g))
    if save_to is not None and i == save_at:
      with manager(save_to) as m:
        m.save(i, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
  return params, state


def restore(directory: str, tx, place, start, step: int | None = None):
  with manager(directory) as m:
    step = m.latest_step() if step is None else step
    restored = m.restore(step, args=ocp.args.StandardRestore(target(tx, place, start)))
  return step, restored["params"], restored["opt_state"]


def compare_layouts(label: str, predicted, state) -> list:
  """``(label, same shape and dtype, same sharding)`` for each leaf of ``state``."""
  pairs = zip(jax.tree.leaves(predicted), jax.tree.leaves(state), strict=True)
  return [
    (
      label,
      (a.shape, str(a.dtype)) == (b.shape, str(b.dtype)),
      a.sharding.is_equivalent_to(b.sharding, b.ndim),
    )
    for a, b in pairs
  ]


def state_bytes(state) -> dict:
  total = sum(int(x.nbytes) for x in jax.tree.leaves(state))
  here = sum(int(s.data.nbytes) for x in jax.tree.leaves(state) for s in x.addressable_shards)
  return {"total": total, "process": here}


def wait_for(path: str, timeout_s: float) -> None:
  """Waits for the pair's file ``path`` (written last, after all its checkpoints)."""
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path} did not appear within {timeout_s} s")
    time.sleep(0.5)


# -- roles ----------------------------------------------------------------------------------------


def mesh_of(shape) -> jax.sharding.Mesh:
  return jax.make_mesh(shape, ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)


def role_pair(args) -> dict:
  data = values(UPDATES + 1)
  mesh = mesh_of((4, 2))
  place = on_mesh(mesh)
  out = {"process_count": jax.process_count(), "cases": {}, "abstract_state": []}
  with jax.set_mesh(mesh):
    for name, block in CASES:
      directory = os.path.join(args.checkpoints, case_id(name, block))
      params, state = train(
        name, block, place, data[1:], params=place(data[0]), save_to=directory, save_at=SAVE_AFTER
      )
      tx, _ = stepper(name, block)
      _, p, s = restore(directory, tx, place, data[0])
      resumed, _ = train(name, block, place, data[SAVE_AFTER + 1 :], params=p, state=s)
      out["abstract_state"] += compare_layouts(
        f"2-processes-{case_id(name, block)}", soap_optax.abstract_state(tx, params), state
      )
      out["cases"][case_id(name, block)] = {
        "params": shards(params),
        "resumed": shards(resumed),
        "bytes": state_bytes(state),
        "structure": structure(state),
      }
  return out


def role_mesh8(args) -> dict:
  data = values(UPDATES + 1)
  out = {"cases": {}, "abstract_state": []}
  mesh = mesh_of((4, 2))
  with jax.set_mesh(mesh):
    for name, block in CASES:
      params, state = train(name, block, on_mesh(mesh), data[1:], params=on_mesh(mesh)(data[0]))
      out["cases"][case_id(name, block)] = {
        "params": shards(params),
        "structure": structure(state),
      }
  # abstract_state against an eager init, on an explicit and an automatic mesh.
  for axis_type in (AxisType.Explicit, AxisType.Auto):
    m = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(m):
      for name, block in CASES:
        tx, _ = stepper(name, block)
        params = on_mesh(m)(data[0])
        predicted, init = soap_optax.abstract_state(tx, params), tx.init(params)
        out["abstract_state"] += compare_layouts(
          f"{axis_type}-{case_id(name, block)}", predicted, init
        )
  # Restore (b): the pair's checkpoints onto another mesh shape.
  wait_for(args.pair_done, args.wait_s)
  other = mesh_of((2, 4))
  place = on_mesh(other)
  out["restored"] = {}
  with jax.set_mesh(other):
    for name, block in CASES:
      tx, _ = stepper(name, block)
      directory = os.path.join(args.checkpoints, case_id(name, block))
      _, p, s = restore(directory, tx, place, data[0], SAVE_AFTER)
      params, state = train(name, block, place, data[SAVE_AFTER + 1 :], params=p, state=s)
      out["restored"][case_id(name, block)] = {
        "params": shards(params),
        "structure": structure(state),
      }
  return out


def role_single(args) -> dict:
  data = values(UPDATES + 1)
  out = {"cases": {}, "restored": {}}
  for name, block in CASES:
    params, state = train(name, block, on_device, data[1:], params=on_device(data[0]))
    out["cases"][case_id(name, block)] = {"params": shards(params), "structure": structure(state)}
  # Restore (c): the pair's checkpoints onto one device.
  wait_for(args.pair_done, args.wait_s)
  for name, block in CASES:
    tx, _ = stepper(name, block)
    directory = os.path.join(args.checkpoints, case_id(name, block))
    _, p, s = restore(directory, tx, on_device, data[0], SAVE_AFTER)
    params, _ = train(name, block, on_device, data[SAVE_AFTER + 1 :], params=p, state=s)
    out["restored"][case_id(name, block)] = {"params": shards(params)}
  return out


# The killed-process test: SOAP, a checkpoint every 2 updates, 6 updates.
KILL_UPDATES = 6
KILL_EVERY = 2


def kill_self(reason: str) -> None:
  print(f"KILLED process {jax.process_index()}: {reason}", flush=True)
  os.kill(os.getpid(), signal.SIGKILL)


def kill_between_writing_and_finalising(at_step: int) -> None:
  """Makes this process die when orbax finalises checkpoint ``at_step``: after every process has
  written its files (orbax's write barrier), before the primary process renames the temporary
  directory to the final one (``atomicity.on_commit_callback``)."""
  from orbax.checkpoint._src.path import atomicity

  finalise = atomicity.on_commit_callback

  async def hooked(tmp_dir, **kwargs):
    if tmp_dir.get_final().name == str(at_step):
      kill_self(f"checkpoint {at_step} written to {tmp_dir.get()}, not finalised")
    return await finalise(tmp_dir, **kwargs)

  atomicity.on_commit_callback = hooked


def role_train(args) -> dict:
  """Runs until killed: ``--kill=after:N`` kills this process after update N; ``--kill=commit:N``
  kills it between writing and finalising checkpoint N."""
  data = values(KILL_UPDATES + 1)
  mesh = mesh_of((4, 2))
  place = on_mesh(mesh)
  kind, _, when = (args.kill or "").partition(":")
  if kind == "commit":
    kill_between_writing_and_finalising(int(when))
  tx, step = stepper("soap", None)
  with jax.set_mesh(mesh), manager(args.checkpoints, max_to_keep=None) as m:
    params = place(data[0])
    state = tx.init(params)
    for i, g in enumerate(data[1:], 1):
      params, state, _ = step(params, state, place(g))
      if i % KILL_EVERY == 0:
        m.save(i, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
      print(f"process {jax.process_index()} finished update {i}", flush=True)
      if kind == "after" and i == int(when):
        kill_self(f"after update {i}")
  return {}


def role_resume(args) -> dict:
  data = values(KILL_UPDATES + 1)
  mesh = mesh_of((4, 2))
  place = on_mesh(mesh)
  with jax.set_mesh(mesh):
    tx, _ = stepper("soap", None)
    step, p, s = restore(args.checkpoints, tx, place, data[0])
    resumed, _ = train("soap", None, place, data[step + 1 :], params=p, state=s)
    uninterrupted, _ = train("soap", None, place, data[1:], params=place(data[0]))
  return {"step": step, "resumed": shards(resumed), "uninterrupted": shards(uninterrupted)}


ROLES = {
  "pair": role_pair,
  "mesh8": role_mesh8,
  "single": role_single,
  "train": role_train,
  "resume": role_resume,
}


def start_runtime(args) -> None:
  """JAX's distributed runtime on the loopback interface, with gloo for the CPU collectives."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # gloo would bind its pairs to the address of the machine's host name: keep it on loopback.
  from jax._src import xla_bridge

  make = xla_bridge._jax.make_gloo_tcp_collectives
  xla_bridge._jax.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")
  jax.distributed.initialize(
    f"127.0.0.1:{args.port}",
    num_processes=args.num_processes,
    process_id=args.process_id,
    coordinator_bind_address=f"127.0.0.1:{args.port}",
    initialization_timeout=args.start_timeout_s,
    heartbeat_timeout_seconds=args.runtime_timeout_s,
    shutdown_timeout_seconds=args.runtime_timeout_s,
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("role", choices=sorted(ROLES))
  parser.add_argument("--out", required=True)
  parser.add_argument("--checkpoints", required=True)
  parser.add_argument("--pair_done", default="")
  parser.add_argument("--wait_s", type=float, default=300)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--start_timeout_s", type=int, default=120)
  parser.add_argument("--runtime_timeout_s", type=int, default=10)
  parser.add_argument("--kill", default="")
  args = parser.parse_args()
  if args.num_processes > 1:
    start_runtime(args)
  result = ROLES[args.role](args)
  result["process_index"] = jax.process_index()
  with open(args.out + ".tmp", "wb") as f:
    pickle.dump(result, f)
  os.replace(args.out + ".tmp", args.out)  # the parent never reads a half-written result
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
