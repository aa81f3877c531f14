"""Time to first step with jax's persistent compilation cache: a cold compile, then a warm one.

A notebook restarted, or a training script started again, compiles its update afresh; with
jax's persistent compilation cache (``jax_compilation_cache_dir``) the second process loads the
executable the first one stored. For each depth of the benchmark GPT (one parameter per layer and
kernel), this runs two fresh processes on one cache directory, each lowering and compiling the
jitted step (update + apply) of ``optax.adamw``, ``optax.contrib.muon`` and the Kronecker
optimizers, and prints their compile times and the ratios against AdamW in the same process.

  python benchmarks/bench_compile_cache.py --layers 2 16
  python benchmarks/bench_compile_cache.py --layers 2 --optimizers soap shampoo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _common


def measure(layers: int, d_model: int, names: list[str]) -> dict[str, float]:
  """Compile seconds of each optimizer's step, in this process (the cache as configured)."""
  import jax
  import jax.numpy as jnp
  import optax

  shapes = _common.gpt_param_shapes(d_model=d_model, num_layers=layers)
  params = {k: jnp.zeros(s) for k, s in shapes.items()}
  seconds = {}
  for name in ["adamw", "muon", *names]:
    tx = _common.build_optimizer(name, 1e-3)  # muon: the example's split, as in every benchmark

    def step(p, s, g, tx=tx):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    lowered = jax.jit(step).lower(params, tx.init(params), params)
    start = time.perf_counter()
    lowered.compile()
    seconds[name] = time.perf_counter() - start
  return seconds


def _child(args) -> None:
  import jax

  jax.config.update("jax_compilation_cache_dir", args.cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  print(json.dumps(measure(args.child_layers, args.d_model, args.optimizers)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 16])
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--optimizers", nargs="+", default=["soap"])
  parser.add_argument("--cache_dir", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--child_layers", type=int, default=None, help=argparse.SUPPRESS)
  _common.add_json_arg(parser)
  args = parser.parse_args()
  if args.child_layers is not None:
    return _child(args)
  info = _common.print_header("compile time, cold and from jax's persistent compilation cache")
  rows = []
  for layers in args.layers:
    with tempfile.TemporaryDirectory() as cache:
      runs = {}
      for run in ("cold", "warm"):
        command = [sys.executable, __file__, "--child_layers", str(layers), "--cache_dir", cache]
        command += ["--d_model", str(args.d_model), "--optimizers", *args.optimizers]
        out = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
        if out.returncode:
          raise RuntimeError(out.stderr[-3000:])
        runs[run] = json.loads(out.stdout.strip().splitlines()[-1])
    for name in runs["cold"]:
      cold, warm = runs["cold"][name], runs["warm"][name]
      rows.append(
        {
          "layers": layers,
          "optimizer": name,
          "cold_s": cold,
          "warm_s": warm,
          "cold_vs_adamw": cold / runs["cold"]["adamw"],
          "warm_vs_adamw_cold": warm / runs["cold"]["adamw"],
        }
      )
  headers = ["layers", "optimizer", "cold s", "warm s", "cold vs adamw cold"]
  headers += ["warm vs adamw cold"]
  table = [
    [r["layers"], r["optimizer"], f"{r['cold_s']:.2f}", f"{r['warm_s']:.2f}"]
    + [f"{r['cold_vs_adamw']:.1f}", f"{r['warm_vs_adamw_cold']:.2f}"]
    for r in rows
  ]
  print(_common.markdown_table(headers, table))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": info, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
