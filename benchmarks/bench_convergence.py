r"""Steps and wall-clock to reach AdamW's best validation loss on the byte-level LM.

Runs `examples/train_lm.py`'s `train` function in-process for AdamW and each
available soap_optax optimizer over a learning-rate sweep and several seeds, on
the same corpus, model and step budget. The target is AdamW's best final
validation loss (best learning rate, averaged over seeds); for every optimizer
at its own best learning rate the script reports the first evaluation step, and
the training wall-clock at that step, where its seed-averaged validation curve
reaches the target, plus final losses. Ratios are against AdamW in the same run.

Outputs in --out: `results.md` (markdown tables), `results.json`, `curves.png`
(validation loss against steps and wall-clock, and final loss against learning
rate) and one sub-directory per run with that run's metrics, summary and plot.

Usage:

  python benchmarks/bench_convergence.py --quick            # a few minutes on 2 CPU cores
  python benchmarks/bench_convergence.py                    # about an hour on 2 CPU cores
  python benchmarks/bench_convergence.py --optimizers adamw soap --learning_rates 3e-3 1e-2 \
      --seeds 0 1 2 --set steps=800 d_model=192
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

# Model and budget per mode; anything here can be overridden with --set key=value.
QUICK = dict(
  steps=120,
  batch_size=16,
  seq_len=64,
  d_model=64,
  num_layers=2,
  num_heads=4,
  warmup_steps=12,
  eval_every=20,
  eval_batches=4,
)
# The example's default run (examples/train_lm.py), evaluated a little more often
# so that steps-to-target is resolved to 5% of the budget.
FULL = dict(
  steps=800,
  batch_size=16,
  seq_len=128,
  d_model=128,
  num_layers=2,
  num_heads=4,
  warmup_steps=50,
  eval_every=40,
  eval_batches=8,
)
QUICK_LRS = (3e-3, 1e-2, 3e-2)
FULL_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def parse_overrides(items) -> dict:
  """Turns ['steps=800', 'd_model=192'] into {'steps': 800, 'd_model': 192}."""
  out = {}
  for item in items or ():
    key, sep, raw = item.partition("=")
    if not sep:
      raise SystemExit(f"--set expects key=value, got {item!r}")
    try:
      out[key] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      out[key] = raw
  return out


def mean_curve(histories, key="val_loss"):
  """Seed-averaged validation curve: (steps, mean loss, mean wall-clock) at evaluation steps.

  All runs of one configuration evaluate at the same steps; a diverged run ends
  early, which makes the averaged curve stop there too (and count as not reached).
  """
  curves = [[(r["step"], r[key], r["wall_time"]) for r in h if key in r] for h in histories]
  length = min(len(c) for c in curves)
  steps = [c[0] for c in curves[0][:length]]
  loss = np.mean([[c[1] for c in curve[:length]] for curve in curves], axis=0)
  wall = np.mean([[c[2] for c in curve[:length]] for curve in curves], axis=0)
  return np.asarray(steps), loss, wall


def first_reach(steps, loss, wall, target):
  """First (step, wall-clock) where `loss <= target`, or (None, None)."""
  hit = np.nonzero(loss <= target)[0]
  if hit.size == 0:
    return None, None
  return int(steps[hit[0]]), float(wall[hit[0]])


def _finite_or_inf(x):
  return x if x is not None and math.isfinite(x) else float("inf")


def run_sweep(train_lm, corpus, base, optimizers, lrs, seeds, out_dir):
  """Trains every (optimizer, learning rate, seed); returns {(opt, lr): [TrainResult, ...]}."""
  runs = {}
  total = len(optimizers) * len(lrs) * len(seeds)
  i = 0
  for opt in optimizers:
    for lr in lrs:
      for seed in seeds:
        i += 1
        name = f"{opt}_lr{lr:g}_seed{seed}"
        config = dataclasses.replace(
          base,
          optimizer=opt,
          learning_rate=lr,
          seed=seed,
          out=os.path.join(out_dir, "runs", name),
        )
        t = time.perf_counter()
        result = train_lm.train(config, corpus=corpus)
        s = result.summary
        print(
          f"[{i}/{total}] {name}: final val {s['final_val_loss']:.4f}, "
          f"train {s['final_train_loss']:.4f}, {s['wall_time_s']:.1f}s training "
          f"({time.perf_counter() - t:.1f}s with compile/eval)",
          flush=True,
        )
        runs.setdefault((opt, lr), []).append(result)
  return runs


def analyse(runs, optimizers, lrs):
  """Per (optimizer, lr) statistics, the AdamW target and each optimizer's best lr."""
  stats = {}
  for (opt, lr), results in runs.items():
    finals = [_finite_or_inf(r.summary["final_val_loss"]) for r in results]
    steps, loss, wall = mean_curve([r.history for r in results])
    stats[(opt, lr)] = {
      "final_val_mean": float(np.mean(finals)),
      "final_val_std": float(np.std(finals)),
      "final_train_mean": float(np.mean([r.summary["final_train_loss"] for r in results])),
      "wall_time_mean": float(np.mean([r.summary["wall_time_s"] for r in results])),
      "step_ms_median": float(np.median([r.summary["median_step_time_ms"] for r in results])),
      "diverged": sum(r.summary["diverged"] for r in results),
      "curve": (steps, loss, wall),
    }
  best_lr = {
    opt: min(lrs, key=lambda lr, o=opt: stats[(o, lr)]["final_val_mean"]) for opt in optimizers
  }
  target = stats[("adamw", best_lr["adamw"])]["final_val_mean"]
  for s in stats.values():
    s["steps_to_target"], s["wall_to_target"] = first_reach(*s["curve"], target)
  return stats, best_lr, target


def report(stats, best_lr, target, optimizers, lrs, seeds, header, base):
  """Builds the markdown report."""
  ref = stats[("adamw", best_lr["adamw"])]

  def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"

  best_rows = []
  for opt in optimizers:
    s = stats[(opt, best_lr[opt])]
    best_rows.append(
      [
        opt,
        f"{best_lr[opt]:g}",
        f"{s['final_val_mean']:.4f} ± {s['final_val_std']:.4f}",
        s["final_train_mean"],
        s["steps_to_target"] if s["steps_to_target"] is not None else "not reached",
        f"{s['wall_to_target']:.1f}" if s["wall_to_target"] is not None else "not reached",
        ratio(ref["steps_to_target"], s["steps_to_target"]),
        ratio(ref["wall_to_target"], s["wall_to_target"]),
        s["step_ms_median"],
      ]
    )
  sweep_rows = [
    [
      opt,
      f"{lr:g}",
      f"{stats[(opt, lr)]['final_val_mean']:.4f} ± {stats[(opt, lr)]['final_val_std']:.4f}",
      stats[(opt, lr)]["final_train_mean"],
      stats[(opt, lr)]["steps_to_target"] or "-",
      stats[(opt, lr)]["wall_time_mean"],
      stats[(opt, lr)]["diverged"],
    ]
    for opt in optimizers
    for lr in lrs
  ]
  config = ", ".join(f"{k}={v}" for k, v in base.items())
  return "\n".join(
    [
      "# Convergence benchmark",
      "",
      f"Command: `{header['command']}`",
      "",
      "Machine: "
      + ", ".join(f"{k} {header[k]}" for k in ("platform", "cpu_count", "backend", "jax", "optax")),
      "",
      f"Training config: {config}; seeds {list(seeds)}; learning rates {list(lrs)}.",
      "",
      f"Target: AdamW's best seed-averaged final validation loss, **{target:.4f}** nats/byte "
      f"(lr {best_lr['adamw']:g}). Wall-clock is training-step time only (compilation and "
      "evaluation excluded); speed-ups are AdamW's steps (seconds) to the target divided by "
      "the optimizer's.",
      "",
      "## Each optimizer at its best learning rate",
      "",
      _common.markdown_table(
        [
          "optimizer",
          "best lr",
          "final val (mean ± std)",
          "final train",
          "steps to target",
          "seconds to target",
          "step speed-up",
          "wall-clock speed-up",
          "median step ms",
        ],
        best_rows,
      ),
      "",
      "## Full sweep",
      "",
      _common.markdown_table(
        [
          "optimizer",
          "lr",
          "final val (mean ± std)",
          "final train",
          "steps to target",
          "training s",
          "diverged runs",
        ],
        sweep_rows,
      ),
      "",
    ]
  )


def plot(stats, best_lr, target, optimizers, lrs, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for opt in optimizers:
    steps, loss, wall = stats[(opt, best_lr[opt])]["curve"]
    label = f"{opt} (lr {best_lr[opt]:g})"
    axes[0].plot(steps, loss, "o-", markersize=2, label=label)
    axes[1].plot(wall, loss, "o-", markersize=2, label=label)
    finals = [stats[(opt, lr)]["final_val_mean"] for lr in lrs]
    axes[2].plot(lrs, [f if math.isfinite(f) else np.nan for f in finals], "o-", label=opt)
  for ax in axes[:2]:
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
    ax.set_ylabel("validation loss (nats/byte)")
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training wall-clock (s)")
  axes[2].set_xscale("log")
  axes[2].minorticks_off()  # Minor log ticks would overlap the few sweep labels.
  axes[2].set_xticks(lrs, [f"{lr:g}" for lr in lrs])
  axes[2].set_xlabel("peak learning rate")
  axes[2].set_ylabel("final validation loss")
  # Zoom on the end of training, where the optimizers differ; the first steps
  # (loss ~5.5) would otherwise squash everything else.
  lowest = min(np.nanmin(stats[(o, best_lr[o])]["curve"][1]) for o in optimizers)
  for ax in axes[:2]:
    ax.set_ylim(min(lowest, target) - 0.05, target + 1.0)
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model and budget (minutes)")
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=["adamw", *_common.SOAP_OPTIMIZERS],
    help="optimizers to compare; adamw is always included as the reference",
  )
  parser.add_argument("--learning_rates", nargs="+", type=float, help="peak learning rates")
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument("--max_files", type=int, help="cap the corpus (default: whole stdlib)")
  parser.add_argument(
    "--set", nargs="*", metavar="KEY=VALUE", help="override TrainConfig fields, e.g. steps=800"
  )
  parser.add_argument("--out", default="runs/bench_convergence")
  args = parser.parse_args()

  header = _common.print_header("bench_convergence: steps and wall-clock to AdamW's best loss")
  train_lm = _common.import_train_lm()
  base = dict(QUICK if args.quick else FULL)
  base.update(parse_overrides(args.set))
  lrs = tuple(args.learning_rates or (QUICK_LRS if args.quick else FULL_LRS))
  if any(":" in o for o in args.optimizers):
    parser.error("--optimizers takes plain names here; use --set for TrainConfig options")
  optimizers = ["adamw"] + [o for o in _common.available(args.optimizers) if o != "adamw"]
  base_config = train_lm.TrainConfig(
    **base, max_files=args.max_files, progress=False, log_every=10**9
  )
  corpus = train_lm.lm_data.load_corpus(max_files=args.max_files)
  n_runs = len(optimizers) * len(lrs) * len(args.seeds)
  print(f"{n_runs} runs: optimizers {optimizers}, lrs {list(lrs)}, seeds {args.seeds}")
  print(f"config: {base}\n", flush=True)

  t0 = time.perf_counter()
  runs = run_sweep(train_lm, corpus, base_config, optimizers, lrs, args.seeds, args.out)
  stats, best_lr, target = analyse(runs, optimizers, lrs)
  markdown = report(stats, best_lr, target, optimizers, lrs, args.seeds, header, base)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    serializable = {
      f"{opt}@{lr:g}": {k: v for k, v in s.items() if k != "curve"}
      for (opt, lr), s in stats.items()
    }
    json.dump(
      {
        "header": header,
        "config": base,
        "target": target,
        "best_lr": best_lr,
        "stats": serializable,
      },
      f,
      indent=2,
    )
  plot(stats, best_lr, target, optimizers, lrs, os.path.join(args.out, "curves.png"))
  print()
  print(markdown)
  print(
    f"total {time.perf_counter() - t0:.0f}s; "
    f"wrote results.md, results.json and curves.png to {args.out}"
  )


if __name__ == "__main__":
  main()
