r"""How the preconditioner refresh schedule trades loss against wall-clock.

Trains the byte-level LM of `examples/train_lm.py` in-process with:

* SOAP and Shampoo at precondition_frequency 1, 10 and 100;
* EShampoo with refresh_tolerance 0 (refresh on every scheduled step) and with
  an adaptive tolerance (skip a factor whose basis is still nearly diagonal);
* AdamW as a reference point.

All runs share the corpus, model, learning rate, seed(s) and step budget. The
table reports steps, final validation/train loss, training wall-clock and step
time, with ratios against SOAP at precondition_frequency 10 (the library
default) from the same run.

Usage:

  python benchmarks/bench_refresh.py --quick                 # a few minutes on 2 CPU cores
  python benchmarks/bench_refresh.py                         # about 20 minutes on 2 CPU cores
  python benchmarks/bench_refresh.py --frequencies 1 5 25 --adaptive_tolerance 0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from bench_convergence import FULL, QUICK, parse_overrides  # noqa: E402


def default_tolerance() -> float | None:
  """EShampoo's own default refresh_tolerance, used as the 'adaptive' setting."""
  fn = _common.soap_optax_fn("eshampoo")
  if fn is None:
    return None
  param = inspect.signature(fn).parameters.get("refresh_tolerance")
  return None if param is None or param.default is inspect.Parameter.empty else param.default


def variants(frequencies, eshampoo_frequency, adaptive_tolerance):
  """The (label, TrainConfig overrides) pairs to run, skipping unavailable optimizers."""
  out = [("adamw", dict(optimizer="adamw"))]
  for opt in ("soap", "shampoo"):
    if _common.soap_optax_fn(opt) is not None:
      out += [(f"{opt} pf={f}", dict(optimizer=opt, precondition_frequency=f)) for f in frequencies]
  if _common.soap_optax_fn("eshampoo") is not None:
    for tol in (0.0, adaptive_tolerance):
      out.append(
        (
          f"eshampoo pf={eshampoo_frequency} tol={tol:g}",
          dict(
            optimizer="eshampoo", precondition_frequency=eshampoo_frequency, refresh_tolerance=tol
          ),
        )
      )
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model and budget (minutes)")
  parser.add_argument("--frequencies", nargs="+", type=int, default=[1, 10, 100])
  parser.add_argument(
    "--eshampoo_frequency",
    type=int,
    default=10,
    help="how often EShampoo checks (tolerance > 0) or performs (tolerance 0) a refresh",
  )
  parser.add_argument(
    "--adaptive_tolerance",
    type=float,
    help="EShampoo's adaptive refresh_tolerance (default: the library's default)",
  )
  parser.add_argument(
    "--learning_rate", type=float, help="peak learning rate (default: the example's default)"
  )
  parser.add_argument("--seeds", nargs="+", type=int, default=[0])
  parser.add_argument("--max_files", type=int, help="cap the corpus (default: whole stdlib)")
  parser.add_argument(
    "--set", nargs="*", metavar="KEY=VALUE", help="override TrainConfig fields, e.g. steps=800"
  )
  parser.add_argument("--out", default="runs/bench_refresh")
  args = parser.parse_args()

  header = _common.print_header("bench_refresh: refresh frequency and adaptive refresh")
  train_lm = _common.import_train_lm()
  base = dict(QUICK if args.quick else FULL)
  base.update(parse_overrides(args.set))
  tolerance = args.adaptive_tolerance
  if tolerance is None:
    tolerance = default_tolerance()
  if tolerance is None or tolerance == 0:
    tolerance = 0.01
  if args.learning_rate is None:
    args.learning_rate = train_lm.TrainConfig().learning_rate
  base_config = train_lm.TrainConfig(
    **base,
    learning_rate=args.learning_rate,
    max_files=args.max_files,
    progress=False,
    log_every=10**9,
  )
  corpus = train_lm.lm_data.load_corpus(max_files=args.max_files)
  runs = variants(args.frequencies, args.eshampoo_frequency, tolerance)
  print(f"{len(runs) * len(args.seeds)} runs; lr {args.learning_rate:g}; config: {base}\n")

  t0 = time.perf_counter()
  results = []
  for label, overrides in runs:
    summaries = []
    for seed in args.seeds:
      slug = label.replace(" ", "_").replace("=", "")
      config = dataclasses.replace(
        base_config, seed=seed, out=os.path.join(args.out, f"{slug}_seed{seed}"), **overrides
      )
      summaries.append(train_lm.train(config, corpus=corpus).summary)
    row = {
      "label": label,
      "steps": int(np.mean([s["steps"] for s in summaries])),
      "final_val": float(np.mean([s["final_val_loss"] for s in summaries])),
      "final_train": float(np.mean([s["final_train_loss"] for s in summaries])),
      "wall_s": float(np.mean([s["wall_time_s"] for s in summaries])),
      "median_step_ms": float(np.mean([s["median_step_time_ms"] for s in summaries])),
      "diverged": sum(s["diverged"] for s in summaries),
    }
    row["mean_step_ms"] = 1e3 * row["wall_s"] / max(row["steps"], 1)
    results.append(row)
    print(
      f"{label:>28}: val {row['final_val']:.4f}  train {row['final_train']:.4f}  "
      f"{row['wall_s']:.1f}s  ({row['mean_step_ms']:.1f} ms/step mean)",
      flush=True,
    )

  ref = next((r for r in results if r["label"] == "soap pf=10"), results[0])
  table = _common.markdown_table(
    [
      "run",
      "steps",
      "final val",
      "final train",
      "training s",
      "mean step ms",
      "median step ms",
      f"time / {ref['label']}",
      f"val - {ref['label']}",
    ],
    [
      [
        r["label"],
        r["steps"],
        r["final_val"],
        r["final_train"],
        r["wall_s"],
        r["mean_step_ms"],
        r["median_step_ms"],
        r["wall_s"] / ref["wall_s"],
        f"{r['final_val'] - ref['final_val']:+.4f}",
      ]
      for r in results
    ],
  )
  markdown = "\n".join(
    [
      "# Refresh benchmark",
      "",
      f"Command: `{header['command']}`",
      "",
      f"Config: {base}, lr {args.learning_rate:g}, seeds {args.seeds}; "
      f"EShampoo adaptive tolerance {tolerance:g}.",
      "",
      table,
      "",
    ]
  )
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"header": header, "config": base, "results": results}, f, indent=2)
  print()
  print(markdown)
  print(f"total {time.perf_counter() - t0:.0f}s; wrote results.md and results.json to {args.out}")


if __name__ == "__main__":
  main()
