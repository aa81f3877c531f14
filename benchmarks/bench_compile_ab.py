"""Compile time of the update, before and after a change: library trees compared in turns.

Single compile timings on a shared 2-core machine move by ±30% from one process to the next, so
a before/after comparison is made of rounds: in each round every tree (a directory holding a
``soap_optax`` package, put first on ``PYTHONPATH``) is measured in a fresh process, one after
the other, for every depth and optimizer spec. Each process compiles the jitted update
(``tx.update``) of ``optax.adamw``, ``optax.contrib.muon`` and the spec on the benchmark GPT
(one parameter per layer and kernel) ``--reps`` times and keeps the fastest; the ratios are
against AdamW's compile in the same process. The table gives the median over rounds.

  python benchmarks/bench_compile_ab.py --trees /path/to/old/checkout . --layers 2 16
  python benchmarks/bench_compile_ab.py --trees . --specs soap soap:group_equal_layouts=True
  python benchmarks/bench_compile_ab.py --layers 2 --resize 256:512 384:512  # fewer factor sizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _common


def measure(
  layers: int, d_model: int, spec: str, reps: int, resize: dict[int, int]
) -> dict[str, dict[str, float]]:
  """Fastest wall-clock and CPU seconds of compiling each optimizer's update, in this process.

  ``resize`` replaces axis lengths of the model's parameters (``{256: 512}``): the same model
  with fewer distinct factor sizes, as merging the refresh's stacks by padding would give.
  """
  import jax
  import jax.numpy as jnp

  shapes = _common.gpt_param_shapes(d_model=d_model, num_layers=layers)
  shapes = {k: tuple(resize.get(n, n) for n in s) for k, s in shapes.items()}
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  out = {}
  for name in ("adamw", "muon", spec):
    wall, cpu = [], []
    for _ in range(reps):  # a new transformation each time: jax caches nothing across them
      tx = _common.build_optimizer(name, 1e-3)
      lowered = jax.jit(tx.update).lower(params, tx.init(params), params)
      start, start_cpu = time.perf_counter(), time.process_time()
      lowered.compile()
      wall.append(time.perf_counter() - start)
      cpu.append(time.process_time() - start_cpu)
    out[name] = {"wall": min(wall), "cpu": min(cpu)}
  return out


def _run_child(tree: str, layers: int, args, spec: str) -> dict:
  command = [sys.executable, __file__, "--child", spec, "--layers", str(layers)]
  command += ["--d_model", str(args.d_model), "--reps", str(args.reps), "--resize", *args.resize]
  path = os.path.abspath(tree)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
  # Started outside the repository, so that the tree on PYTHONPATH is the one imported.
  out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=os.sep)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.strip().splitlines()[-1])


def table(runs: dict[tuple, list[dict]]) -> str:
  """Per tree, depth and spec: medians over rounds of the compile seconds and of the ratios to
  AdamW's compile in the same process (wall-clock, CPU in brackets)."""
  rows = []
  for (tree, layers, spec), results in runs.items():

    def median(name, clock, results=results):
      return statistics.median(r[name][clock] / r["adamw"][clock] for r in results)

    def seconds(name, results=results):
      return statistics.median(r[name]["wall"] for r in results)

    rows.append(
      [tree, layers, spec, f"{seconds('adamw'):.2f}", f"{seconds(spec):.2f}"]
      + [f"{median(spec, 'wall'):.1f} ({median(spec, 'cpu'):.1f})"]
      + [f"{median('muon', 'wall'):.1f} ({median('muon', 'cpu'):.1f})"]
    )
  headers = ["tree", "layers", "spec", "adamw s", "spec s", "spec vs adamw (CPU)"]
  return _common.markdown_table(headers + ["muon vs adamw (CPU)"], rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--trees", nargs="+", default=["."], help="directories with soap_optax")
  parser.add_argument("--specs", nargs="+", default=["soap"])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--reps", type=int, default=5, help="compiles per process (fastest kept)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument(
    "--resize", nargs="*", default=[], help="OLD:NEW axis lengths replaced, e.g. 256:512 384:512"
  )
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  _common.add_json_arg(parser)
  args = parser.parse_args()
  if args.child is not None:
    (layers,) = args.layers
    resize = dict(tuple(int(n) for n in pair.split(":")) for pair in args.resize)
    print(json.dumps(measure(layers, args.d_model, args.child, args.reps, resize)))
    return
  info = _common.print_header("compile time of the update, library trees compared in turns")
  runs: dict[tuple, list[dict]] = {}
  for _ in range(args.rounds):
    for tree in args.trees:
      for layers in args.layers:
        for spec in args.specs:
          result = _run_child(tree, layers, args, spec)
          runs.setdefault((tree, layers, spec), []).append(result)
          print(json.dumps({"tree": tree, "layers": layers, "spec": spec, **result}), flush=True)
  print(f"\nmedian of {args.rounds} rounds, fastest of {args.reps} compiles per process:")
  print(table(runs))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "runs": [[*k, v] for k, v in runs.items()]}, f, indent=2)


if __name__ == "__main__":
  main()
