r"""The optimizers on a mesh: state per device, refresh work per device, collectives, compile.

Runs on simulated CPU devices (the script sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` itself before JAX starts) with the GPT-like
parameter set of ``bench_step.py`` sharded FSDP- and tensor-parallel-style on a ``(fsdp, tp)``
mesh, in both of JAX's sharding modes, and reports, against ``optax.adamw`` measured in the
same run:

* **state bytes per device** / (total state bytes / devices): 1.0 is a perfect spread; after an
  eager ``init`` and after one jitted ``update`` (no ``out_shardings``: on an automatic mesh XLA
  then chooses where the returned state lives, for ``optax.adamw`` too);
* **refresh work per device** / (total / devices): Σ batch × n³ over the LAPACK decompositions of
  the refresh in the compiled per-device program (loops counted by their trip counts), against
  the work of decomposing every factor once (EShampoo: twice, the first QR and one warm
  iteration), with the authors' unblocked layout and with ``--block_size`` blocks;
* **collectives** in the compiled step: inside the refresh branch, in the moment transfer that
  follows a refresh, and in the rest of the step (what every step pays);
* **compile time** of the jitted update (lower + compile).

What 8 CPU devices cannot measure: wall-clock speed-ups, interconnect bandwidth, GPU/TPU
lowering of ``eigh``/QR, multi-host behaviour.

Usage:

  python benchmarks/bench_sharding.py
  python benchmarks/bench_sharding.py --optimizers soap --modes explicit --num_layers 2
  python benchmarks/bench_sharding.py --optimizers soap soap_grouped   # grouping on a mesh
  python benchmarks/bench_sharding.py --compile_scaling 1 2 4 8   # compile time vs. model depth
  python benchmarks/bench_sharding.py --compile_scaling 2 16 \
    --variants soap:block_size=128,group_equal_layouts=True   # and other settings
"""

from __future__ import annotations

import os
import sys

if "--compile_scaling" not in sys.argv:  # compile time is measured on one device, default flags
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _hlo  # noqa: E402

MODES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def gpt_sharding(name: str, shape) -> P:
  """FSDP × tensor parallelism, the way a GPT's parameters are usually laid out."""
  if len(shape) == 1:
    return P("tp") if name.endswith(("qkv/bias", "mlp_up/bias")) else P()
  if name == "embed":
    return P("fsdp", None)
  if name.endswith(("qkv/kernel", "mlp_up/kernel")):
    return P("fsdp", "tp")
  return P("tp", "fsdp")  # attention output, MLP down


def make_params(shapes, mesh):
  return {
    name: jax.device_put(
      jnp.zeros(shape, jnp.float32), NamedSharding(mesh, gpt_sharding(name, shape))
    )
    for name, shape in shapes.items()
  }


def bytes_per_device(state) -> tuple[int, int]:
  """(the most any device holds, the total)."""
  per_device: dict = {}
  total = 0
  for leaf in jax.tree.leaves(state):
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()), total


def planned_bytes_per_device(tree, shardings) -> int:
  """The most bytes any device holds if ``tree``'s leaves are placed by ``shardings``."""
  per_device: dict = {}
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    for device, index in sharding.devices_indices_map(leaf.shape).items():
      shape = [len(range(*i.indices(n))) for i, n in zip(index, leaf.shape, strict=True)]
      size = 1
      for n in shape:
        size *= n
      per_device[device] = per_device.get(device, 0) + size * leaf.dtype.itemsize
  return max(per_device.values())


def total_refresh_work(shapes, block_size) -> int:
  """Σ n³ over every factor (every block): one refresh of everything on one device."""
  import soap_optax

  rule = soap_optax.LayoutRule(block_size=block_size)
  work = 0
  for shape in shapes.values():
    layout = rule.layout(shape)
    work += sum(layout.num_blocks * n**3 for n in layout.factor_sizes if n is not None)
  return work


def build(name, block_size):
  import soap_optax

  if name == "adamw":
    return optax.adamw(1e-3)
  kwargs = {} if block_size is None else {"block_size": block_size}
  if name.endswith("_grouped"):  # e.g. soap_grouped: the alias with group_equal_layouts=True
    name, kwargs["group_equal_layouts"] = name.removesuffix("_grouped"), True
  return getattr(soap_optax, name)(**kwargs)


# Decompositions per factor in one scheduled refresh, as the HLO reader counts them: EShampoo's
# adaptive refresh is a sorted power step + QR, then warm QR iterations in a loop whose trip count
# is decided at run time, counted as one iteration.
PER_FACTOR = {"eshampoo": 2}


def measure(name, mode, block_size, shapes, devices):
  """One row: state bytes after (eager) init and after a jitted update, the compiled update's
  decompositions and collectives, and its compile time."""
  mesh = jax.make_mesh((4, 2), ("fsdp", "tp"), axis_types=(MODES[mode],) * 2)
  tx = build(name, block_size)
  with jax.set_mesh(mesh):
    params = make_params(shapes, mesh)
    state = tx.init(params)  # eager, as a training loop usually initialises
    jax.block_until_ready(state)
    worst, total = bytes_per_device(state)
    start = time.perf_counter()
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    seconds = time.perf_counter() - start
    # Where the state the update returns lives (no out_shardings given): on an explicit mesh
    # its types fix it; on an automatic one it is XLA's choice. Read from the compiled program,
    # without running it.
    stepped_worst = planned_bytes_per_device(state, compiled.output_shardings[1])
  program = _hlo.read(compiled.as_text())
  row = {
    "optimizer": name,
    "mode": mode,
    "block_size": block_size,
    "state_per_device_vs_share": worst / (total / devices),
    "stepped_state_per_device_vs_share": stepped_worst / (total / devices),
    "state_total_MiB": total / 2**20,
    "compile_s": seconds,
    "collectives_refresh": program.count_collectives("eigenbasis_refresh"),
    "collectives_transfer": program.count_collectives("moment_transfer"),
    "collectives_every_step": program.count_collectives(
      outside=("eigenbasis_refresh", "moment_transfer")
    ),
  }
  if name != "adamw":
    once = total_refresh_work(shapes, block_size) / devices  # every factor decomposed once
    base = name.removesuffix("_grouped")
    share = PER_FACTOR.get(base, 1) * once
    kind = "eigh" if base == "shampoo" else "qr"
    row["refresh_kind"] = kind
    retry = ("eigh_retry",)  # earlier versions retried a failed eigh: not counted as work
    row["refresh_work_vs_share"] = (
      program.work(kind, "eigenbasis_refresh/scheduled", outside=retry) / share
    )
    row["first_eigh_work_vs_share"] = (
      program.work("eigh", "eigenbasis_refresh/first", outside=retry) / once
    )
  return row


def scanned_params(shapes, layers):
  """The same model as a scanned one stores it: each layer's parameters stacked on a layer axis."""
  stacked = {}
  for name, shape in shapes.items():
    if name.startswith("layer0/"):
      stacked[name.removeprefix("layer0/")] = jnp.zeros((layers, *shape))
  rest = {k: jnp.zeros(s) for k, s in shapes.items() if not k.startswith("layer")}
  return {"layers": stacked, **rest}


def scanned_soap():
  """SOAP for a scanned model: the stacked layers with ``stacked_axes=1``, the rest as usual."""
  import soap_optax

  def label(path, _):
    return "layers" if path[0].key == "layers" else "rest"

  return soap_optax.skip_nonfinite_steps(
    optax.partition(
      {"layers": soap_optax.soap(stacked_axes=1), "rest": soap_optax.soap()},
      lambda params: jax.tree.map_with_path(label, params),
    )
  )


# Blocks of the update, each the first whose named scopes all occur in an operation's name (the
# scopes are in the library's code; see ``_hlo.count_compiled``). Rotations inside the moment
# transfer count as the transfer.
BLOCKS = (
  ("skip_nonfinite_steps", "skip_nonfinite_steps"),
  ("stats: all_finite", "all_finite"),
  ("stats: finite guards", "kronecker_stats/finite_guard"),
  ("stats", "kronecker_stats"),
  ("refresh: eigh retry", "eigh_retry"),  # versions before the retry went (measured before/after)
  ("refresh: first basis", "eigenbasis_refresh/first"),
  ("refresh: scheduled", "eigenbasis_refresh/scheduled"),
  ("refresh: keep", "eigenbasis_refresh/keep"),
  ("refresh: guard", "eigenbasis_refresh/guard"),
  ("refresh: stack + branches", "eigenbasis_refresh"),
  ("refresh: state", "refresh_state"),
  ("moment transfer", "moment_transfer"),
  ("rotations", "rotate"),
  ("live guards", "live_guard"),
  *(
    (f"direction ({name})", name)
    for name in (
      "rotated_adam",
      "rotated_adafactor",
      "eigenvalue_corrected",
      "shampoo_precondition",
    )
  ),
)


def _wrappers():
  """The alias's transforms after the direction block: learning rate, decay, dtype cast."""
  from soap_optax._weight_decay import add_decayed_weights_after_step

  def cast(updates, state, params):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.chain(
    optax.scale_by_learning_rate(3e-3),
    add_decayed_weights_after_step(3e-3, 0.01, None),
    optax.GradientTransformation(lambda params: optax.EmptyState(), cast),
  )


def program_size(make, tree, with_blocks: bool = True, reps: int = 1) -> dict:
  """Op counts of the lowered and compiled update of ``make()``, by block; the kernels XLA
  generates, by block; and the compile's wall-clock and CPU (process) seconds, the fastest of
  ``reps`` compiles. On a loaded machine the CPU seconds are the steadier figure: waiting for a
  core does not count. A short compile (AdamW's) moves by ±20% between single measurements, the
  ratios' main noise. Each compile is of a new transformation: jax would return a compiled
  program it already holds for the same one (in no time)."""
  lower_s, compile_s, cpu_s = [], [], []
  for _ in range(reps):
    tx = make()
    state = tx.init(tree)
    start = time.perf_counter()
    lowered = jax.jit(tx.update).lower(tree, state, tree)
    middle, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    end, cpu = time.perf_counter(), time.process_time() - cpu
    lower_s.append(middle - start)
    compile_s.append(end - middle)
    cpu_s.append(cpu)
  scopes = BLOCKS if with_blocks else ()
  low = _hlo.count_lowered(lowered.as_text(debug_info=True), scopes)
  comp = _hlo.count_compiled(compiled.as_text(), scopes)
  kernels, ir_lines = _hlo.count_kernels(lowered, scopes)
  return {
    "lower_s": min(lower_s),
    "compile_s": min(compile_s),
    "compile_cpu_s": min(cpu_s),
    "compile_reps": reps,
    "kernels": sum(kernels.values()),
    "llvm_ir_lines": sum(ir_lines.values()),
    "kernels_by_block": kernels,
    "lowered_ops": low.total,
    "compiled_ops": comp.total,
    "lowered_arith": low.arithmetic,
    "compiled_arith": comp.arithmetic,
    "lowered_by_block": low.by_block,
    "compiled_by_block": comp.by_block,
    "compiled_arith_by_block": comp.arithmetic_by_block,
  }


def compile_scaling(depths, d_model, optimizers=("soap",), variants=(), reps=3):
  """Compile time of the jitted update (one device) against the number of layers, and where the
  program's size comes from.

  Each depth is measured as a model with one parameter per layer and kernel (AdamW, Muon and the
  optimizers on the same tree) and as a scanned model (its layers stacked on a leading axis:
  AdamW, and SOAP with ``stacked_axes=1`` on the stack); each optimizer also with
  ``group_equal_layouts=True`` (``<name>_grouped``), and each of ``variants`` (optimizer specs
  such as ``soap:block_size=128,group_equal_layouts=True``). For each program: the lowering and
  compile times, the operations of the lowered StableHLO and of the compiled HLO (fusions'
  insides included), its arithmetic (dots, custom calls such as QR/eigh, reductions, control
  flow), and the operations per block of the update (``BLOCKS``, by named scope). Times are the
  fastest of ``reps`` compiles.
  """
  import soap_optax

  rows = []
  for layers in depths:
    shapes = _common.gpt_param_shapes(d_model=d_model, num_layers=layers)
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    scanned = scanned_params(shapes, layers)
    # (name, a function making the transformation, parameters)
    runs: list[tuple] = [("adamw", lambda: optax.adamw(1e-3), params)]
    if hasattr(optax.contrib, "muon"):
      runs.append(("muon", lambda: optax.contrib.muon(1e-3), params))
    runs.append(("alias_wrappers", _wrappers, params))
    runs += [(name, getattr(soap_optax, name), params) for name in optimizers]
    if "group_equal_layouts" in inspect.signature(soap_optax.soap).parameters:  # 0.3 on
      runs += [
        (
          f"{name}_grouped",
          functools.partial(getattr(soap_optax, name), group_equal_layouts=True),
          params,
        )
        for name in optimizers
      ]
    runs += [
      (spec, functools.partial(_common.build_optimizer, spec, 1e-3), params) for spec in variants
    ]
    if "stacked_axes" in inspect.signature(soap_optax.soap).parameters:  # not in old versions
      runs += [
        ("adamw_scanned", lambda: optax.adamw(1e-3), scanned),
        ("soap_scanned", scanned_soap, scanned),
      ]
    for name, make, tree in runs:
      row = {"layers": layers, "parameters": len(jax.tree.leaves(tree)), "optimizer": name}
      row.update(program_size(make, tree, reps=reps))
      rows.append(row)
      print(json.dumps(row), flush=True)
  return rows


def _scaling_tables(rows) -> str:
  """Compile time and program size by depth; the blocks of each Kronecker optimizer."""
  adamw = {r["layers"]: r for r in rows if r["optimizer"] == "adamw"}
  headers = ["layers", "optimizer", "arrays", "compile s", "vs adamw", "compile CPU s"]
  headers += ["vs adamw", "kernels", "lowered ops", "compiled ops"]
  headers += ["dots", "custom calls", "reduces", "control"]
  summary = []
  for r in rows:
    base, arith = adamw[r["layers"]], r["compiled_arith"]
    summary.append([r["layers"], r["optimizer"], r["parameters"], f"{r['compile_s']:.2f}"])
    summary[-1] += [f"{r['compile_s'] / base['compile_s']:.1f}", f"{r['compile_cpu_s']:.2f}"]
    summary[-1] += [f"{r['compile_cpu_s'] / base['compile_cpu_s']:.1f}", r["kernels"]]
    summary[-1] += [r["lowered_ops"], r["compiled_ops"]]
    summary[-1] += [arith[k] for k in ("dot", "custom_call", "reduce", "control")]
  out = [_common.markdown_table(headers, summary)]
  for r in rows:
    if r["optimizer"] in ("adamw", "muon", "alias_wrappers", "adamw_scanned"):
      continue
    blocks = sorted(set(r["lowered_by_block"]) | set(r["compiled_by_block"]))
    table = []
    for b in blocks:
      arith = r["compiled_arith_by_block"].get(b, {})
      table.append([b, r["kernels_by_block"].get(b, 0), r["lowered_by_block"].get(b, 0)])
      table[-1] += [r["compiled_by_block"].get(b, 0)]
      table[-1] += [arith.get(k, 0) for k in ("dot", "custom_call", "reduce", "control")]
    out.append(f"\n{r['optimizer']}, {r['layers']} layers ({r['parameters']} arrays):")
    columns = ["block", "kernels", "lowered ops", "compiled ops", "dots", "custom calls"]
    out.append(_common.markdown_table([*columns, "reduces", "control"], table))
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--optimizers", nargs="+", default=["soap", "shampoo", "eigen_adafactor", "eshampoo"]
  )
  parser.add_argument("--modes", nargs="+", default=["explicit", "auto"], choices=list(MODES))
  parser.add_argument("--block_size", type=int, default=128)
  _common.add_model_args(parser)
  parser.add_argument("--compile_scaling", type=int, nargs="*", default=None)
  parser.add_argument(
    "--variants",
    nargs="*",
    default=[],
    help="with --compile_scaling: more optimizer specs, e.g. soap:block_size=128",
  )
  parser.add_argument(
    "--compile_reps",
    type=int,
    default=3,
    help="with --compile_scaling: compiles per program, the fastest kept",
  )
  _common.add_json_arg(parser)
  args = parser.parse_args()
  args.optimizers_given = "--optimizers" in sys.argv
  info = _common.print_header("soap_optax on a (fsdp=4, tp=2) mesh of simulated devices")
  devices = jax.device_count()
  if args.compile_scaling:
    names = [n for n in args.optimizers if n != "adamw"] if args.optimizers_given else ["soap"]
    rows = compile_scaling(
      args.compile_scaling, args.d_model, names, args.variants, args.compile_reps
    )
    print()
    print(_scaling_tables(rows))
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=2)
    return
  if devices != 8:
    raise SystemExit(f"needs 8 devices, found {devices}: JAX started before XLA_FLAGS was set")
  shapes = _common.gpt_param_shapes(d_model=args.d_model, num_layers=args.num_layers)
  print(f"parameters: {_common.num_params(shapes):,} in {len(shapes)} arrays\n", flush=True)
  rows = []
  for mode in args.modes:
    rows.append(measure("adamw", mode, None, shapes, devices))
    print(json.dumps(rows[-1]), flush=True)
    for name in args.optimizers:
      for block_size in (None, args.block_size):
        rows.append(measure(name, mode, block_size, shapes, devices))
        print(json.dumps(rows[-1]), flush=True)
  headers = sorted({k for r in rows for k in r}, key=list(rows[-1]).index)
  print()
  print(_common.markdown_table(headers, [[_fmt(r.get(h)) for h in headers] for r in rows]))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "rows": rows}, f, indent=2)


def _fmt(value):
  return f"{value:.3g}" if isinstance(value, float) else value


if __name__ == "__main__":
  main()
