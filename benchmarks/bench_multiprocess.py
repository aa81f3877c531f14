r"""The optimizers in 2 processes on JAX's distributed runtime: state per process, collectives.

Starts 2 processes of 4 simulated CPU devices each (``jax.distributed.initialize`` on loopback,
gloo for the collectives between them) that form one ``(fsdp=4, tp=2)`` mesh, and measures in
them, for every soap_optax alias (with the authors' unblocked layout and with ``--block_size``)
and ``optax.adamw`` as the baseline:

* **state bytes per process** / (total state bytes / 2): 1.0 is a perfect split;
* **collectives** of the compiled update, per device program: how many and how many bytes they
  return, in the refresh branch (paid at refresh steps only) and in the rest of the step (paid
  at every step).

``--divergence`` instead runs 12 updates (a refresh every second) of the mesh tests' transformer
layer in the 2 processes, in one process on the same mesh and on one device, and reports how far
apart the three end, relative to how far the parameters moved; with a 1-ulp perturbation of the
gradients on one device and the bits of a psum through gloo and through one process, to tell
whether the distributed runtime or the conditioning of the problem makes the difference.

Step times of simulated devices sharing 2 cores mean nothing and are not measured.

Usage:

  python benchmarks/bench_multiprocess.py
  python benchmarks/bench_multiprocess.py --divergence
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
_ARRAY = re.compile(r"\b(f64|f32|bf16|f16|s32|u32|s8|u8|pred)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
  """``{"refresh" | "transfer" | "every step": (count, bytes)}`` of a compiled program's
  collectives.

  Bytes are those of each collective's result (its last array for an asynchronous ``-start``),
  per device. A collective inside the refresh's branch (op name containing
  ``eigenbasis_refresh``) counts there, one in the moment transfer that follows a refresh
  (``moment_transfer``) there too: both run at refresh steps only. Every other one runs at
  every step.
  """
  out = {"refresh": [0, 0], "transfer": [0, 0], "every step": [0, 0]}
  for line in hlo_text.splitlines():
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1]
    match = re.search(r"\s(" + "|".join(COLLECTIVES) + r")(-start)?\(", rhs)
    if not match:
      continue
    arrays = _ARRAY.findall(rhs[: match.start()])
    if not arrays:
      continue
    if match.group(2):
      arrays = arrays[-1:]
    size = 0
    for dtype, dims in arrays:
      count = 1
      for d in filter(None, dims.split(",")):
        count *= int(d)
      size += _BYTES[dtype] * count
    name = (_OP_NAME.search(line) or [None, ""])[1]
    where = "every step"
    if "eigenbasis_refresh" in name:
      where = "refresh"
    elif "moment_transfer" in name:
      where = "transfer"
    out[where][0] += 1
    out[where][1] += size
  return {k: tuple(v) for k, v in out.items()}


# -- inside a process -----------------------------------------------------------------------------


def start_runtime(args):
  import functools

  import jax
  from jax._src import xla_bridge

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  make = xla_bridge._jax.make_gloo_tcp_collectives  # keep gloo on loopback too
  xla_bridge._jax.make_gloo_tcp_collectives = functools.partial(make, hostname="127.0.0.1")
  jax.distributed.initialize(
    f"127.0.0.1:{args.port}",
    num_processes=2,
    process_id=args.process_id,
    coordinator_bind_address=f"127.0.0.1:{args.port}",
    heartbeat_timeout_seconds=30,
    shutdown_timeout_seconds=30,
  )


def build(name, block_size):
  import optax

  import soap_optax

  if name == "adamw":
    return optax.adamw(1e-3)
  return getattr(soap_optax, name)(1e-3, block_size=block_size)


def measure_state_and_collectives(args) -> list[dict]:
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding

  sys.path.insert(0, HERE)
  import _common
  from bench_sharding import gpt_sharding

  shapes = _common.gpt_param_shapes(d_model=args.d_model, num_layers=args.num_layers)
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)
  rows = []
  cases = [("adamw", None)]
  cases += [(n, b) for n in _common.SOAP_OPTIMIZERS for b in (None, args.block_size)]
  with jax.set_mesh(mesh):
    params = {
      name: jax.make_array_from_callback(
        shape,
        NamedSharding(mesh, gpt_sharding(name, shape)),
        lambda index, shape=shape: np.zeros(shape, np.float32)[index],
      )
      for name, shape in shapes.items()
    }
    for name, block in cases:
      tx = build(name, block)
      state = tx.init(params)
      total = sum(int(x.nbytes) for x in jax.tree.leaves(state))
      here = sum(int(s.data.nbytes) for x in jax.tree.leaves(state) for s in x.addressable_shards)
      compiled = jax.jit(tx.update).lower(params, state, params).compile()
      found = collectives(compiled.as_text())
      rows.append(
        {
          "optimizer": name,
          "block_size": block,
          "state_MiB": total / 2**20,
          "process_vs_half": here / (total / jax.process_count()),
          "every_step": found["every step"],
          "refresh": tuple(r + t for r, t in zip(found["refresh"], found["transfer"], strict=True)),
        }
      )
  return rows


def divergence(args) -> dict:
  """12 updates of the transformer layer; returns this process's shards of the end parameters."""
  import jax
  import numpy as np
  from jax.sharding import AxisType, NamedSharding

  sys.path[:0] = [os.path.join(REPO, "tests"), os.path.join(REPO, "tests", "mesh")]
  import aliases
  import transformer_layer
  from test_sharded_state import optimizer

  table = transformer_layer.PARAMS[2]
  rng = np.random.default_rng(0)
  values = [
    {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in table.items()} for _ in range(13)
  ]
  if args.role == "single":
    mesh = None
    place = lambda t: jax.device_put(t, jax.devices()[0])  # noqa: E731
  else:
    mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(AxisType.Explicit,) * 2)

    def place(t):
      return {
        k: jax.make_array_from_callback(
          v.shape, NamedSharding(mesh, table[k][1]), lambda i, v=v: v[i]
        )
        for k, v in t.items()
      }

  def held(tree):
    return {
      k: [
        (tuple((s.start, s.stop) for s in sh.index), np.asarray(sh.data))
        for sh in x.addressable_shards
      ]
      for k, x in tree.items()
    }

  def run(name, perturb=False):
    tx = optimizer(name)
    step = aliases.stepper(tx)
    params = place(values[0])
    state = tx.init(params)
    for g in values[1:]:
      if perturb:  # one ulp up on every gradient element
        g = {k: np.nextafter(v, np.float32(np.inf)) for k, v in g.items()}
      params, state, _ = step(params, state, place(g))
    return held(params)

  out = {"start": held(place(values[0])), "runs": {}, "perturbed": {}}
  context = jax.set_mesh(mesh) if mesh is not None else _nothing()
  with context:
    for name in aliases.ALIASES:
      out["runs"][name] = run(name)
      if args.role == "single":
        out["perturbed"][name] = run(name, perturb=True)
    # A psum over the 8 devices of 8 × 4096 random numbers: gloo's order of addition or XLA's.
    if mesh is not None:
      from jax.sharding import PartitionSpec as P

      x = rng.standard_normal((8, 4096)).astype(np.float32) * 1e3
      arr = jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, P(("fsdp", "tp"))), lambda i: x[i]
      )
      total = jax.jit(
        jax.shard_map(
          lambda b: jax.lax.psum(b, ("fsdp", "tp")), in_specs=P(("fsdp", "tp")), out_specs=P()
        )
      )(arr)
      out["psum"] = np.asarray(total.addressable_shards[0].data)
      out["psum_float64"] = x.astype(np.float64).sum(0)
  return out


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def worker(args) -> None:
  if args.role == "pair":
    start_runtime(args)
  result = divergence(args) if args.divergence else measure_state_and_collectives(args)
  with open(args.out, "wb") as f:
    pickle.dump(result, f)


# -- the launcher ---------------------------------------------------------------------------------


def launch(args) -> dict:
  directory = tempfile.mkdtemp(prefix="bench_multiprocess_")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  # One process with the 8 devices alongside: the same measurements, to compare with.
  roles = [("pair", 4, 0), ("pair", 4, 1), ("mesh8", 8, 0)]
  if args.divergence:
    roles += [("single", 1, 0)]
  processes = {}
  for role, devices, pid in roles:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    out = os.path.join(directory, f"{role}{pid}.pkl")
    command = [sys.executable, __file__, "--role", role, "--process_id", str(pid)]
    command += ["--port", str(port), "--out", out, "--block_size", str(args.block_size)]
    command += ["--d_model", str(args.d_model), "--num_layers", str(args.num_layers)]
    command += ["--divergence"] if args.divergence else []
    log = open(os.path.join(directory, f"{role}{pid}.log"), "w")
    processes[f"{role}{pid}"] = (subprocess.Popen(command, stdout=log, stderr=log, env=env), out)
  results = {}
  for name, (p, out) in processes.items():
    if p.wait(timeout=3600) != 0:
      raise SystemExit(f"{name} failed: see {directory}/{name}.log")
    with open(out, "rb") as f:
      results[name] = pickle.load(f)
  return results


def assemble(*holdings):
  import numpy as np

  out = {}
  for key in holdings[0]:
    pieces = [p for h in holdings for p in h[key]]
    shape = tuple(
      max((i[d][0] or 0) + v.shape[d] for i, v in pieces) for d in range(pieces[0][1].ndim)
    )
    full = np.zeros(shape, np.float64)
    for index, v in pieces:
      full[tuple(slice(a, b) for a, b in index)] = v
    out[key] = full
  return out


def relative(a, b, start) -> float:
  import numpy as np

  return max(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k] - start[k]) for k in a)


def report_divergence(results) -> None:
  import numpy as np

  start = assemble(results["single0"]["start"])
  print(
    "| alias | 2 processes vs 1 process (same mesh) | 2 processes vs 1 device "
    "| 1 process (8 devices) vs 1 device | 1 device vs 1 device, gradients +1 ulp |"
  )
  print("| --- | --- | --- | --- | --- |")
  for name in results["single0"]["runs"]:
    two = assemble(results["pair0"]["runs"][name], results["pair1"]["runs"][name])
    one = assemble(results["mesh80"]["runs"][name])
    single = assemble(results["single0"]["runs"][name])
    ulp = assemble(results["single0"]["perturbed"][name])
    print(
      f"| {name} | {relative(two, one, start):.1e} | {relative(two, single, start):.1e} "
      f"| {relative(one, single, start):.1e} | {relative(ulp, single, start):.1e} |"
    )
  gloo, xla = results["pair0"]["psum"], results["mesh80"]["psum"]
  exact = results["pair0"]["psum_float64"]
  print(
    f"\npsum of 8 × 4096 float32 over the 8 devices: gloo (2 processes) and XLA (1 process) "
    f"differ in {int(np.sum(gloo != xla))} of {gloo.size} elements; largest relative "
    f"difference {np.max(np.abs(gloo - xla) / np.abs(exact)):.1e}; each against float64: "
    f"{np.max(np.abs(gloo - exact) / np.abs(exact)):.1e} (gloo), "
    f"{np.max(np.abs(xla - exact) / np.abs(exact)):.1e} (XLA)"
  )


def report_state(results) -> None:
  rows0, rows1, single = results["pair0"], results["pair1"], results["mesh80"]
  print(
    "| optimizer | block_size | state (MiB) | process 0 / half | process 1 / half "
    "| every step: collectives (KiB) | refresh steps, in addition: collectives (KiB) |"
  )
  print("| --- | --- | --- | --- | --- | --- | --- |")
  same = True
  for a, b, c in zip(rows0, rows1, single, strict=True):
    assert (a["every_step"], a["refresh"]) == (b["every_step"], b["refresh"])
    same = same and (a["every_step"], a["refresh"]) == (c["every_step"], c["refresh"])
    print(
      f"| {a['optimizer']} | {a['block_size'] or '—'} | {a['state_MiB']:.2f} "
      f"| {a['process_vs_half']:.3f} | {b['process_vs_half']:.3f} "
      f"| {a['every_step'][0]} ({a['every_step'][1] / 1024:.0f}) "
      f"| {a['refresh'][0]} ({a['refresh'][1] / 1024:.0f}) |"
    )
  verdict = "the same" if same else "NOT the same"
  print(f"\nCollectives of the 2-process program and the 1-process one (8 devices): {verdict}.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--divergence", action="store_true")
  parser.add_argument("--block_size", type=int, default=128)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=1)
  parser.add_argument("--json", default=None, help="also write the results here")
  # Set by the launcher for the processes it starts.
  parser.add_argument("--role", default=None)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  if args.role:
    worker(args)
    return
  results = launch(args)
  if args.divergence:
    report_divergence(results)
  else:
    print(f"GPT shapes: d_model={args.d_model}, num_layers={args.num_layers}\n")
    report_state(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({k: v for k, v in results.items() if not args.divergence}, f, indent=2, default=str)


if __name__ == "__main__":
  main()
