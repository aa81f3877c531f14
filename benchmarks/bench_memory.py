r"""Optimizer-state bytes per parameter, against optax.adamw and optax.contrib.muon.

Uses `jax.eval_shape` on each optimizer's `init`, so nothing is allocated or
computed: the numbers are exact sizes of the state pytrees. Two models, each in
float32: the d_model=384, 6-layer GPT shapes of `_common.gpt_param_shapes`, and
the example language model of `examples/lm_model.py` (the model that
`examples/train_lm.py` and `bench_convergence.py` train) at `--lm_d_model`
(256 by default: 1024-long MLP axes and square attention kernels).

Besides the optimizers named by `--optimizers`, every run measures the memory
levers of SOAP (`LEVERS`): one-sided factors (`factor_axes="smaller"` /
`"larger"`), a per-parameter rule that leaves the embeddings unfactored, a bf16
first moment (`mu_dtype`), bf16 statistics and bases, blocks, and combinations;
and the same for eigen_adafactor, whose factored second moment is the other
large saving. Ratios are against AdamW's and Muon's states measured in the
same run.

Usage:

  python benchmarks/bench_memory.py
  python benchmarks/bench_memory.py --optimizers soap soap:max_precond_dim=1024 eshampoo
  python benchmarks/bench_memory.py --models lm --lm_d_model 512 --no_levers
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
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# Per-parameter rule: no factor for the (tied) token and the position embeddings, whose rows are
# looked up rather than multiplied; every other parameter as the rest of the setting says.
EMBEDDINGS_UNFACTORED = {"embed": "none"}
# Attention kernels keep both sides, the embeddings none, everything else its smaller side.
ATTENTION_BOTH = {"embed": "none", "attn|qkv": "all", "": "smaller"}
# The example LM ties its output head to the token embedding: that matrix is also the head.
EMBEDDINGS_BOTH = {"embed": "all", "": "smaller"}
ATTENTION_AND_EMBEDDINGS_BOTH = {"embed|attn|qkv": "all", "": "smaller"}
BF16 = jnp.bfloat16
# Blocks of 256 keep both sides of every block; the MLP kernels' blocks keep one side.
MLP_ONE_SIDED = {"mlp": "smaller"}

# name -> (alias, options): SOAP's memory levers, alone and combined.
LEVERS = {
  "soap (default)": ("soap", {}),
  "soap smaller": ("soap", dict(factor_axes="smaller")),
  "soap larger": ("soap", dict(factor_axes="larger")),
  "soap embeddings unfactored": ("soap", dict(factor_axes=EMBEDDINGS_UNFACTORED)),
  "soap attention both, rest smaller, embeddings none": ("soap", dict(factor_axes=ATTENTION_BOTH)),
  "soap attention both, rest smaller, embeddings none + mu bf16": (
    "soap",
    dict(factor_axes=ATTENTION_BOTH, mu_dtype=BF16),
  ),
  "soap smaller, embeddings both": ("soap", dict(factor_axes=EMBEDDINGS_BOTH)),
  "soap smaller, attention and embeddings both + mu bf16": (
    "soap",
    dict(factor_axes=ATTENTION_AND_EMBEDDINGS_BOTH, mu_dtype=BF16),
  ),
  "soap smaller, attention and embeddings both + stats+basis bf16 + mu bf16": (
    "soap",
    dict(factor_axes=ATTENTION_AND_EMBEDDINGS_BOTH, stats_dtype=BF16, mu_dtype=BF16),
  ),
  "soap smaller, embeddings both + mu bf16": (
    "soap",
    dict(factor_axes=EMBEDDINGS_BOTH, mu_dtype=BF16),
  ),
  "soap mu bf16": ("soap", dict(mu_dtype=BF16)),
  "soap stats+basis bf16": ("soap", dict(stats_dtype=BF16)),
  "soap block 128": ("soap", dict(block_size=128)),
  "soap block 256 + stats+basis bf16 + mu bf16": (
    "soap",
    dict(block_size=256, stats_dtype=BF16, mu_dtype=BF16),
  ),
  "soap block 128 + stats+basis bf16 + moments bf16": (
    "soap",
    dict(block_size=128, stats_dtype=BF16, moment_dtype=BF16),
  ),
  "soap block 256, embeddings one-sided + stats+basis bf16 + moments bf16": (
    "soap",
    dict(block_size=256, factor_axes={"embed": "smaller"}, stats_dtype=BF16, moment_dtype=BF16),
  ),
  "soap block 256, MLP one-sided + stats+basis bf16 + mu bf16": (
    "soap",
    dict(block_size=256, factor_axes=MLP_ONE_SIDED, stats_dtype=BF16, mu_dtype=BF16),
  ),
  "soap smaller + mu bf16": ("soap", dict(factor_axes="smaller", mu_dtype=BF16)),
  "soap smaller + embeddings none": (
    "soap",
    dict(factor_axes={**EMBEDDINGS_UNFACTORED, "": "smaller"}),
  ),
  "soap smaller + embeddings none + mu bf16": (
    "soap",
    dict(factor_axes={**EMBEDDINGS_UNFACTORED, "": "smaller"}, mu_dtype=BF16),
  ),
  "soap smaller + stats+basis bf16": ("soap", dict(factor_axes="smaller", stats_dtype=BF16)),
  "soap smaller + stats+basis bf16 + mu bf16": (
    "soap",
    dict(factor_axes="smaller", stats_dtype=BF16, mu_dtype=BF16),
  ),
  "soap smaller + embeddings none + stats+basis bf16 + mu bf16": (
    "soap",
    dict(factor_axes={**EMBEDDINGS_UNFACTORED, "": "smaller"}, stats_dtype=BF16, mu_dtype=BF16),
  ),
  "soap stats+basis bf16 + mu bf16": ("soap", dict(stats_dtype=BF16, mu_dtype=BF16)),
  "soap all bf16 (stats, basis, moments)": ("soap", dict(stats_dtype=BF16, moment_dtype=BF16)),
  "soap block 128 + smaller + mu bf16": (
    "soap",
    dict(block_size=128, factor_axes="smaller", mu_dtype=BF16),
  ),
  "eigen_adafactor (default)": ("eigen_adafactor", {}),
  "eigen_adafactor smaller": ("eigen_adafactor", dict(factor_axes="smaller")),
  "eigen_adafactor smaller + mu bf16": (
    "eigen_adafactor",
    dict(factor_axes="smaller", mu_dtype=BF16),
  ),
  "eigen_adafactor smaller + stats+basis bf16 + mu bf16": (
    "eigen_adafactor",
    dict(factor_axes="smaller", stats_dtype=BF16, mu_dtype=BF16),
  ),
}


def state_bytes(tx, param_structs) -> tuple[int, dict[str, int]]:
  """Total optimizer-state bytes, and bytes per dtype, without allocating anything."""
  state = jax.eval_shape(tx.init, param_structs)
  by_dtype: dict[str, int] = collections.Counter()
  for leaf in jax.tree.leaves(state):
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
      by_dtype[str(leaf.dtype)] += int(np.prod(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return sum(by_dtype.values()), dict(by_dtype)


def gpt_params(d_model: int, num_layers: int) -> dict:
  shapes = _common.gpt_param_shapes(d_model, num_layers)
  return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


def lm_params(d_model: int, num_layers: int, seq_len: int) -> dict:
  """The example LM's parameters (as `train_lm.init_training` hands them to `init`), as shapes."""
  from flax import nnx

  train_lm = _common.import_train_lm()
  config = train_lm.TrainConfig(d_model=d_model, num_layers=num_layers, seq_len=seq_len)
  abstract = nnx.eval_shape(lambda: train_lm.make_model(config))
  params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def measure(title: str, params, specs, levers: bool) -> list[dict]:
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"\n## {title}: {n / 1e6:.3f}M float32 parameters\n")
  builds = [("adamw", lambda: optax.adamw(1e-3)), ("muon", lambda: optax.contrib.muon(1e-3))]
  builds += [(s, lambda s=s: _common.build_optimizer(s)) for s in specs if s != "adamw"]
  if levers:
    builds += [
      (label, lambda a=alias, o=options: getattr(__import__("soap_optax"), a)(1e-3, **o))
      for label, (alias, options) in LEVERS.items()
    ]
  results = []
  for label, build in builds:
    total, by_dtype = state_bytes(build(), params)
    results.append({"optimizer": label, "bytes": total, "by_dtype": by_dtype})
  adamw, muon = results[0]["bytes"], results[1]["bytes"]
  rows = [
    [
      r["optimizer"],
      f"{r['bytes'] / 2**20:.2f}",
      r["bytes"] / n,
      r["bytes"] / adamw,
      r["bytes"] / muon,
      ", ".join(f"{k}: {v / 2**20:.2f}" for k, v in sorted(r["by_dtype"].items())),
    ]
    for r in results
  ]
  headers = ["optimizer", "state MiB", "bytes / param", "vs adamw", "vs muon", "MiB by dtype"]
  print(_common.markdown_table(headers, rows))
  for budget in (2.0, 1.5):
    fits = [r["optimizer"] for r in results[2:] if r["bytes"] <= budget * adamw]
    print(f"\nwithin {budget}x adamw: {', '.join(fits) if fits else 'none'}")
  return [{**r, "num_params": n} for r in results]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=[*_common.SOAP_OPTIMIZERS, "adafactor"],
    help="optimizer specs, 'name' or 'name:key=value,...' (adamw and muon are the baselines)",
  )
  parser.add_argument("--models", nargs="+", choices=("gpt", "lm"), default=["gpt", "lm"])
  parser.add_argument("--lm_d_model", type=int, default=256, help="the example LM's width")
  parser.add_argument("--lm_num_layers", type=int, default=2)
  parser.add_argument("--lm_seq_len", type=int, default=128, help="its position embeddings")
  parser.add_argument("--no_levers", action="store_true", help="skip the LEVERS settings")
  _common.add_model_args(parser)
  _common.add_json_arg(parser)
  args = parser.parse_args()

  header = _common.print_header("bench_memory: optimizer-state bytes per parameter")
  specs = _common.available(args.optimizers)
  out = {"header": header}
  if "gpt" in args.models:
    title = f"GPT shapes, d_model {args.d_model}, {args.num_layers} layers"
    out["gpt"] = measure(
      title, gpt_params(args.d_model, args.num_layers), specs, not args.no_levers
    )
  if "lm" in args.models:
    title = (
      f"example LM (examples/lm_model.py), d_model {args.lm_d_model}, "
      f"{args.lm_num_layers} layers, max_len {args.lm_seq_len}"
    )
    params = lm_params(args.lm_d_model, args.lm_num_layers, args.lm_seq_len)
    out["lm"] = measure(title, params, specs, not args.no_levers)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
