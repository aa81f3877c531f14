r"""Optimizer-state bytes per parameter, against optax.adamw, on GPT-like shapes.

Uses `jax.eval_shape` on each optimizer's `init`, so nothing is allocated or
computed: the numbers are exact sizes of the state pytrees. Parameters are the
d_model=384, 6-layer GPT shapes of `_common.gpt_param_shapes` in float32.

Usage:

  python benchmarks/bench_memory.py
  python benchmarks/bench_memory.py --optimizers soap soap:max_precond_dim=1024 eshampoo
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def state_bytes(tx, param_structs) -> tuple[int, dict[str, int]]:
  """Total optimizer-state bytes, and bytes per dtype, without allocating anything."""
  state = jax.eval_shape(tx.init, param_structs)
  by_dtype: dict[str, int] = collections.Counter()
  for leaf in jax.tree.leaves(state):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      by_dtype[str(leaf.dtype)] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return sum(by_dtype.values()), dict(by_dtype)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=[*_common.SOAP_OPTIMIZERS, "adafactor"],
    help="optimizer specs, 'name' or 'name:key=value,...' (adamw is always the baseline)",
  )
  _common.add_model_args(parser)
  _common.add_json_arg(parser)
  args = parser.parse_args()

  header = _common.print_header("bench_memory: optimizer-state bytes per parameter")
  shapes = _common.gpt_param_shapes(args.d_model, args.num_layers)
  n = _common.num_params(shapes)
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  param_bytes = 4 * n
  print(
    f"{len(shapes)} parameters, {n / 1e6:.2f}M float32 scalars ({param_bytes / 2**20:.1f} MiB)\n"
  )

  specs = ["adamw"] + [s for s in _common.available(args.optimizers) if s != "adamw"]
  results = []
  for spec in specs:
    total, by_dtype = state_bytes(_common.build_optimizer(spec), params)
    results.append({"optimizer": spec, "bytes": total, "by_dtype": by_dtype})
  adamw = results[0]["bytes"]
  rows = [
    [
      r["optimizer"],
      f"{r['bytes'] / 2**20:.1f}",
      r["bytes"] / n,
      r["bytes"] / adamw,
      ", ".join(f"{k}: {v / 2**20:.1f}" for k, v in sorted(r["by_dtype"].items())),
    ]
    for r in results
  ]
  print(
    _common.markdown_table(
      ["optimizer", "state MiB", "bytes / param", "vs adamw", "MiB by dtype"], rows
    )
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "num_params": n, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
