r"""A short convergence probe of SOAP's memory levers on the example LM (one seed, not a sweep).

Trains `examples/train_lm.py`'s model with AdamW, default SOAP and SOAP memory settings of
`bench_memory.LEVERS` (one-sided factors, per-parameter rules, a bf16 first moment), on the
same data, model and schedule, and prints for each: optimizer-state bytes per parameter (and
the ratio to AdamW's), the final validation loss and its gap to default SOAP's, and the first
evaluation step at which the validation loss reaches default SOAP's final loss. One seed and a
fixed learning rate per optimizer: a probe that tells whether a setting is in the running, not
the trade-off table of `bench_convergence.py` (seeds, learning-rate grids).

Usage:

  python benchmarks/probe_memory_levers.py --steps 200 --eval_every 20 --max_files 200
  python benchmarks/probe_memory_levers.py --settings adamw "soap (default)" "soap smaller"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import bench_memory  # noqa: E402

DEFAULT_SETTINGS = (
  "adamw",
  "soap (default)",
  "soap smaller",
  "soap attention both, rest smaller, embeddings none + mu bf16",
  "soap smaller + stats+basis bf16 + mu bf16",
)


def make_optimizer_for(train_lm, setting: str):
  """A `make_optimizer(config)` that builds ``setting`` (AdamW, or a LEVERS entry)."""
  import soap_optax

  def make(config):
    schedule = train_lm.learning_rate_schedule(config)
    if setting == "adamw":
      opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
    else:
      alias, options = bench_memory.LEVERS[setting]
      opt = getattr(soap_optax, alias)(
        schedule,
        b1=config.b1,
        b2=config.b2,
        weight_decay=config.weight_decay,
        precondition_frequency=config.precondition_frequency,
        **options,
      )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)

  return make


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--eval_every", type=int, default=20)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup_steps", type=int, default=20)
  parser.add_argument("--adamw_lr", type=float, default=3e-3)
  parser.add_argument("--soap_lr", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max_files", type=int, default=None)
  parser.add_argument("--json", default=None)
  args = parser.parse_args()

  header = _common.print_header("probe_memory_levers: one seed, memory settings of SOAP")
  train_lm = _common.import_train_lm()
  import lm_data

  corpus = lm_data.load_corpus(None, max_files=args.max_files, val_fraction=0.1)
  params = bench_memory.lm_params(args.d_model, args.num_layers, args.seq_len)
  n = sum(x.size for x in jax.tree.leaves(params))
  original = train_lm.make_optimizer
  results = []
  try:
    for setting in args.settings:
      train_lm.make_optimizer = make_optimizer_for(train_lm, setting)
      config = train_lm.TrainConfig(
        optimizer="adamw" if setting == "adamw" else "soap",
        learning_rate=args.adamw_lr if setting == "adamw" else args.soap_lr,
        steps=args.steps,
        eval_every=args.eval_every,
        log_every=args.steps,
        d_model=args.d_model,
        num_layers=args.num_layers,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        out=None,
        progress=False,
      )
      bytes_, _ = bench_memory.state_bytes(train_lm.make_optimizer(config), params)
      t0 = time.perf_counter()
      result = train_lm.train(config, corpus)
      curve = [(r["step"], r["val_loss"]) for r in result.history if "val_loss" in r]
      results.append(
        {
          "setting": setting,
          "bytes_per_param": bytes_ / n,
          "curve": curve,
          "final": curve[-1][1],
          "seconds": time.perf_counter() - t0,
        }
      )
  finally:
    train_lm.make_optimizer = original

  adamw = next((r for r in results if r["setting"] == "adamw"), None)
  soap = next((r for r in results if r["setting"] == "soap (default)"), None)
  rows = []
  for r in results:
    reach = None
    if soap is not None:
      reach = next((s for s, loss in r["curve"] if loss <= soap["final"]), None)
    rows.append(
      [
        r["setting"],
        r["bytes_per_param"],
        r["bytes_per_param"] / adamw["bytes_per_param"] if adamw else "",
        f"{r['final']:.4f}",
        f"{r['final'] - soap['final']:+.4f}" if soap else "",
        reach if reach is not None else "not reached",
        f"{r['seconds']:.0f}",
        f"{r['seconds'] / adamw['seconds']:.2f}" if adamw else "",
      ]
    )
  headers = [
    "setting",
    "state bytes / param",
    "vs adamw",
    "final val loss",
    "gap to soap",
    "step reaching soap's final",
    "run s (incl. compile, under load)",
    "vs adamw",
  ]
  print()
  print(_common.markdown_table(headers, rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
