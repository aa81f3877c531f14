r"""Steps and wall-clock to reach AdamW's best validation loss on the byte-level LM.

Runs `examples/train_lm.py`'s `train` function in-process for AdamW, optax's Muon
(`optax.contrib.muon` on the hidden kernels, Adam on the embeddings, the tied head
and the vectors, as the example builds it) and each available soap_optax
optimizer over a learning-rate sweep (a grid per optimizer)
and several seeds, on the same corpus, model and step budget. The target is
AdamW's best final validation loss (best learning rate, averaged over seeds);
for every optimizer at its own best learning rate the script reports the first
evaluation step, and the training wall-clock at that step, where its
seed-averaged validation curve reaches the target, the same for every seed on
its own (min-max over seeds, and how many seeds reach it), and the final losses
(mean, std, min-max over seeds). Ratios are against AdamW in the same run.

Learning-rate brackets: a best learning rate at an end of its grid says only
that the optimum may lie beyond it (and, for AdamW, that the target may be too
easy). The script therefore extends any grid whose best value is at an end, by
one step of the 1-3-10 ladder at a time (at most `--extend_grid` steps per side,
all seeds), and prints a loud warning for every optimizer whose best learning
rate is still at an end of its grid.

Outputs in --out: `results.md` (markdown tables), `results.json`, `curves.png`
(validation loss against steps and wall-clock, and final loss against learning
rate) and one sub-directory per run with that run's metrics, summary and plot.

Seeds after the first reuse the first seed's compiled programs through jax's
persistent compilation cache (a temporary directory, deleted at the end;
`--no_compile_cache` turns it off); timings exclude compilation either way.

Usage:

  python benchmarks/bench_convergence.py --quick --out runs/bench_convergence_quick
      # about 8 minutes on 2 idle CPU cores: 18 (optimizer, lr) pairs x 3 seeds
  python benchmarks/bench_convergence.py --out runs/bench_convergence
      # about 80 minutes on 2 idle CPU cores: 19 pairs x 3 seeds, 800 steps
  python benchmarks/bench_convergence.py --optimizers adamw soap --learning_rates 3e-3 1e-2 \
      --seeds 0 1 2 --set steps=800 d_model=192
  python benchmarks/bench_convergence.py --quick --optimizers adamw soap soap:precision=bfloat16 \
      --out runs/bench_convergence_precision
      # per-optimizer options: 'name:key=value,...'; TrainConfig fields (precondition_frequency,
      # stagger_refresh, ...) set the run's config, the others go to the soap_optax factory
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
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
# Default learning-rate grids per mode and optimizer ("*": every soap_optax optimizer), chosen
# so that each optimum measured so far lies inside its grid. Quick mode, seed 0, commit 712aeb0:
# AdamW 1e-3 / 3e-3 / 1e-2 / 3e-2 -> final val 3.016 / 2.875 / 2.835 / 2.871; SOAP 3e-3 / 1e-2 /
# 3e-2 -> 3.502 / 2.473 / 2.505. Full model, 400 steps (docs/benchmarks.md): AdamW best at 3e-3,
# the lowest value run, with 1e-3 within 0.002 of it in an 800-step run; SOAP family best at
# 1e-2. Grids whose best value still lands on an end are extended at run time (--extend_grid).
# Muon (optax's defaults: width scaling, one learning rate for both halves) was best at 1e-2 of
# 5e-3 / 1e-2 / 2e-2 on a byte-level LM outside the repository (issue 18), and in quick mode
# (seed 0, commit fea4a65) at 3e-2 of 3e-3 / 1e-2 / 3e-2 / 1e-1 -> final val 2.553 / 2.366 /
# 2.297 / 2.464 (AdamW's best 2.834 in the same run).
QUICK_LRS = {"adamw": (3e-3, 1e-2, 3e-2), "muon": (1e-2, 3e-2, 1e-1), "*": (3e-3, 1e-2, 3e-2)}
FULL_LRS = {
  "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
  "muon": (3e-3, 1e-2, 3e-2),
  "*": (3e-3, 1e-2, 3e-2),
}
LONG_COMMAND = "python benchmarks/bench_convergence.py --out runs/bench_convergence"
QUICK_COMMAND = "python benchmarks/bench_convergence.py --quick --out runs/bench_convergence_quick"


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


def ladder_neighbour(lr: float, up: bool) -> float:
  """The next learning rate above or below `lr` on the 1-3-10 ladder (else a factor 3)."""
  exponent = math.floor(math.log10(lr) + 1e-9)
  mantissa = lr / 10**exponent
  if math.isclose(mantissa, 1, rel_tol=1e-6):
    out = 3 * 10**exponent if up else 3 * 10 ** (exponent - 1)
  elif math.isclose(mantissa, 3, rel_tol=1e-6):
    out = 10 ** (exponent + 1) if up else 10**exponent
  else:
    out = lr * 3 if up else lr / 3
  return float(f"{out:.3g}")


def default_grid(table: dict, optimizer: str) -> tuple[float, ...]:
  """The grid of the spec's optimizer name ('soap:precision=bfloat16' uses soap's)."""
  return table.get(_common.parse_spec(optimizer)[0], table["*"])


# ----------------------------------------------------------------------------
# Running.


def split_options(train_lm, spec: str) -> tuple[str, dict, dict]:
  """Splits an optimizer spec into (name, TrainConfig fields, extra factory arguments).

  'soap:precondition_frequency=20,precision=bfloat16' gives ('soap',
  {'precondition_frequency': 20}, {'precision': 'bfloat16'}): options that are
  TrainConfig fields set the run's config, the others go to the soap_optax
  factory itself. The baselines are built by the example alone, so they take
  TrainConfig fields only (an unknown option there is an error, not a no-op).
  """
  name, options = _common.parse_spec(spec)
  fields = {f.name for f in dataclasses.fields(train_lm.TrainConfig)}
  config = {k: v for k, v in options.items() if k in fields}
  extra = {k: v for k, v in options.items() if k not in fields}
  if "optimizer" in config or "learning_rate" in config:
    raise SystemExit(f"{spec!r}: set the optimizer by name and learning rates by --learning_rates")
  if extra and name not in _common.SOAP_OPTIMIZERS:
    raise SystemExit(
      f"{spec!r}: {sorted(extra)} are not TrainConfig fields, and only the soap_optax "
      "optimizers take extra factory arguments here"
    )
  return name, config, extra


@contextlib.contextmanager
def factory_options(train_lm, extra: dict):
  """Passes `extra` to the soap_optax factory that `train_lm.make_optimizer` calls.

  The example builds its optimizers from TrainConfig fields only; its soap_optax
  branch goes through `_call_with_supported_kwargs`, so the extra arguments are
  added there for the duration of one run (and, like the example's own, dropped
  with a printed note by an optimizer that does not take them).
  """
  if not extra:
    yield
    return
  original = train_lm._call_with_supported_kwargs

  def with_extra(fn, **kwargs):
    return original(fn, **{**kwargs, **extra})

  train_lm._call_with_supported_kwargs = with_extra
  try:
    yield
  finally:
    train_lm._call_with_supported_kwargs = original


def run_name(spec: str) -> str:
  """A directory-friendly name for an optimizer spec ('soap:precision=bfloat16' -> ...)."""
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)


def run_configs(train_lm, corpus, base, pairs, seeds, out_dir, runs, progress):
  """Trains every (optimizer spec, lr) of `pairs` for every seed, adding the results to `runs`."""
  for opt, lr in pairs:
    name_only, config_options, extra = split_options(train_lm, opt)
    for seed in seeds:
      progress["done"] += 1
      name = f"{run_name(opt)}_lr{lr:g}_seed{seed}"
      config = dataclasses.replace(
        base,
        **config_options,
        optimizer=name_only,
        learning_rate=lr,
        seed=seed,
        out=os.path.join(out_dir, "runs", name),
      )
      t = time.perf_counter()
      with factory_options(train_lm, extra):
        result = train_lm.train(config, corpus=corpus)
      s = result.summary
      print(
        f"[{progress['done']}/{progress['total']}] {name}: final val {s['final_val_loss']:.4f}, "
        f"train {s['final_train_loss']:.4f}, {s['wall_time_s']:.1f}s training "
        f"({time.perf_counter() - t:.1f}s with compile/eval)",
        flush=True,
      )
      runs.setdefault((opt, lr), []).append(result)


def best_lrs(runs, grids) -> dict[str, float]:
  """Each optimizer's learning rate with the lowest seed-averaged final validation loss."""

  def mean_final(opt, lr):
    return float(np.mean([_finite_or_inf(r.summary["final_val_loss"]) for r in runs[(opt, lr)]]))

  return {opt: min(grid, key=lambda lr, o=opt: mean_final(o, lr)) for opt, grid in grids.items()}


def grid_edge(best: float, grid) -> str | None:
  """'lowest' / 'highest' when `best` is at that end of `grid` (both for a 1-point grid)."""
  ends = [name for name, end in (("lowest", min(grid)), ("highest", max(grid))) if best == end]
  return " and ".join(ends) or None


def sweep(train_lm, corpus, base, grids, seeds, out_dir, extend):
  """Runs the grids, then extends every grid whose best value is at an end, `extend` times."""
  runs = {}
  pairs = [(opt, lr) for opt, grid in grids.items() for lr in grid]
  progress = {"done": 0, "total": len(pairs) * len(seeds)}
  run_configs(train_lm, corpus, base, pairs, seeds, out_dir, runs, progress)
  added = {opt: {"lowest": 0, "highest": 0} for opt in grids}
  while True:
    best = best_lrs(runs, grids)
    new_pairs = []
    for opt, grid in grids.items():
      for side, up in (("lowest", False), ("highest", True)):
        edge = grid_edge(best[opt], grid) or ""
        if side in edge and added[opt][side] < extend:
          lr = ladder_neighbour(min(grid) if not up else max(grid), up)
          added[opt][side] += 1
          grids[opt] = tuple(sorted({*grids[opt], lr}))
          new_pairs.append((opt, lr))
          print(
            f"grid extension: {opt}'s best lr {best[opt]:g} is the {side} of its grid; "
            f"adding lr {lr:g}",
            flush=True,
          )
    if not new_pairs:
      return runs, grids
    progress["total"] += len(new_pairs) * len(seeds)
    run_configs(train_lm, corpus, base, new_pairs, seeds, out_dir, runs, progress)


# ----------------------------------------------------------------------------
# Analysis.


def _spread(values):
  """mean, std, min, max of the finite values (inf where none is finite)."""
  finite = [v for v in values if math.isfinite(v)]
  if len(finite) < len(values) or not finite:
    inf = float("inf")
    return {"mean": inf, "std": float("nan"), "min": min(values, default=inf), "max": inf}
  return {
    "mean": float(np.mean(finite)),
    "std": float(np.std(finite)),
    "min": float(np.min(finite)),
    "max": float(np.max(finite)),
  }


def analyse(runs, grids):
  """Per (optimizer, lr) statistics, the AdamW target and each optimizer's best lr."""
  stats = {}
  for (opt, lr), results in runs.items():
    finals = [_finite_or_inf(r.summary["final_val_loss"]) for r in results]
    final = _spread(finals)
    stats[(opt, lr)] = {
      "final_val_mean": final["mean"],
      "final_val_std": final["std"],
      "final_val_min": final["min"],
      "final_val_max": final["max"],
      "final_val_per_seed": finals,
      "final_train_mean": float(np.mean([r.summary["final_train_loss"] for r in results])),
      "wall_time_mean": float(np.mean([r.summary["wall_time_s"] for r in results])),
      "step_ms_median": float(np.median([r.summary["median_step_time_ms"] for r in results])),
      "diverged": sum(r.summary["diverged"] for r in results),
      "curve": mean_curve([r.history for r in results]),
      "seed_curves": [mean_curve([r.history]) for r in results],
    }
  best_lr = best_lrs(runs, grids)
  target = stats[("adamw", best_lr["adamw"])]["final_val_mean"]
  for s in stats.values():
    s["steps_to_target"], s["wall_to_target"] = first_reach(*s["curve"], target)
    per_seed = [first_reach(*c, target) for c in s["seed_curves"]]
    s["steps_to_target_per_seed"] = [r[0] for r in per_seed]
    s["wall_to_target_per_seed"] = [r[1] for r in per_seed]
  edges = {opt: grid_edge(best_lr[opt], grids[opt]) for opt in grids}
  return stats, best_lr, target, edges


def edge_warnings(best_lr, grids, edges, extend) -> list[str]:
  warnings = []
  for opt, edge in edges.items():
    if edge is None:
      continue
    grid = ", ".join(f"{lr:g}" for lr in grids[opt])
    beyond = {"lowest": "below it", "highest": "above it"}.get(edge, "on either side of it")
    line = (
      f"{opt}'s best learning rate {best_lr[opt]:g} is the {edge} of its grid [{grid}] "
      f"(after up to {extend} extension(s) per side): its optimum may lie {beyond}."
    )
    if opt == "adamw":
      line += (
        " The target (AdamW's best loss) may then be too easy, and every speed-up below too large."
      )
    warnings.append(line + " Rerun with a wider --learning_rates or a larger --extend_grid.")
  return warnings


# ----------------------------------------------------------------------------
# Reporting.


def _seed_range(values, fmt):
  """'min-max, k/n seeds' over the seeds that reached the target."""
  reached = [v for v in values if v is not None]
  if not reached:
    return f"0/{len(values)} seeds"
  lo, hi = fmt(min(reached)), fmt(max(reached))
  span = lo if lo == hi else f"{lo}–{hi}"
  return f"{span}, {len(reached)}/{len(values)} seeds"


def report(stats, best_lr, target, grids, seeds, header, base, warnings):
  """Builds the markdown report."""
  ref = stats[("adamw", best_lr["adamw"])]
  optimizers = list(grids)

  def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"

  def final_cell(s):
    return (
      f"{s['final_val_mean']:.4f} ± {s['final_val_std']:.4f} "
      f"[{s['final_val_min']:.4f}, {s['final_val_max']:.4f}]"
    )

  best_rows = []
  for opt in optimizers:
    s = stats[(opt, best_lr[opt])]
    best_rows.append(
      [
        opt,
        f"{best_lr[opt]:g}" + (" (grid end!)" if grid_edge(best_lr[opt], grids[opt]) else ""),
        final_cell(s),
        s["final_train_mean"],
        s["steps_to_target"] if s["steps_to_target"] is not None else "not reached",
        _seed_range(s["steps_to_target_per_seed"], str),
        f"{s['wall_to_target']:.1f}" if s["wall_to_target"] is not None else "not reached",
        _seed_range(s["wall_to_target_per_seed"], lambda x: f"{x:.1f}"),
        ratio(ref["steps_to_target"], s["steps_to_target"]),
        ratio(ref["wall_to_target"], s["wall_to_target"]),
        s["step_ms_median"],
      ]
    )
  sweep_rows = [
    [
      opt,
      f"{lr:g}" + (" *" if lr == best_lr[opt] else ""),
      final_cell(stats[(opt, lr)]),
      stats[(opt, lr)]["final_train_mean"],
      stats[(opt, lr)]["steps_to_target"] or "-",
      _seed_range(stats[(opt, lr)]["steps_to_target_per_seed"], str),
      stats[(opt, lr)]["wall_time_mean"],
      stats[(opt, lr)]["diverged"],
    ]
    for opt in optimizers
    for lr in grids[opt]
  ]
  config = ", ".join(f"{k}={v}" for k, v in base.items())
  grid_text = "; ".join(f"{opt} [{', '.join(f'{lr:g}' for lr in grids[opt])}]" for opt in grids)
  warning_lines = (
    ["## WARNING: learning rate not bracketed", "", *[f"- **{w}**" for w in warnings], ""]
    if warnings
    else [
      "Every optimizer's best learning rate is inside its grid (a lower and a higher value "
      "were run and were worse).",
      "",
    ]
  )
  return "\n".join(
    [
      "# Convergence benchmark",
      "",
      f"Command: `{header['command']}`",
      "",
      "Machine: "
      + ", ".join(
        f"{k} {header[k]}" for k in ("platform", "cpu_count", "backend", "jax", "optax", "git")
      ),
      "",
      f"Training config: {config}; seeds {list(seeds)}; learning rates (final grids): {grid_text}.",
      "",
      *warning_lines,
      f"Target: AdamW's best seed-averaged final validation loss, **{target:.4f}** nats/byte "
      f"(lr {best_lr['adamw']:g}). Wall-clock is training-step time only (compilation and "
      "evaluation excluded); speed-ups are AdamW's steps (seconds) to the target divided by "
      "the optimizer's, both read on the seed-averaged curves. Per-seed columns read each "
      "seed's own curve: the range over the seeds that reach the target, and how many do "
      "(AdamW's own seeds straddle its mean, so some of them miss it). Final losses: "
      "mean ± std [min, max] over seeds.",
      "",
      "## Each optimizer at its best learning rate",
      "",
      _common.markdown_table(
        [
          "optimizer",
          "best lr",
          "final val",
          "final train",
          "steps to target",
          "per seed",
          "seconds to target",
          "per seed",
          "step speed-up",
          "wall-clock speed-up",
          "median step ms",
        ],
        best_rows,
      ),
      "",
      "## Full sweep (* = best learning rate)",
      "",
      _common.markdown_table(
        [
          "optimizer",
          "lr",
          "final val",
          "final train",
          "steps to target",
          "per seed",
          "training s",
          "diverged runs",
        ],
        sweep_rows,
      ),
      "",
    ]
  )


def plot(stats, best_lr, target, grids, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  all_lrs = sorted({lr for grid in grids.values() for lr in grid})
  for opt, grid in grids.items():
    steps, loss, wall = stats[(opt, best_lr[opt])]["curve"]
    label = f"{opt} (lr {best_lr[opt]:g})"
    axes[0].plot(steps, loss, "o-", markersize=2, label=label)
    axes[1].plot(wall, loss, "o-", markersize=2, label=label)
    finals = [stats[(opt, lr)]["final_val_mean"] for lr in grid]
    lows = [stats[(opt, lr)]["final_val_min"] for lr in grid]
    highs = [stats[(opt, lr)]["final_val_max"] for lr in grid]
    clean = lambda xs: [x if math.isfinite(x) else np.nan for x in xs]  # noqa: E731
    (line,) = axes[2].plot(grid, clean(finals), "o-", label=opt)
    axes[2].fill_between(grid, clean(lows), clean(highs), color=line.get_color(), alpha=0.2)
  for ax in axes[:2]:
    ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
    ax.set_ylabel("validation loss (nats/byte)")
  axes[0].set_xlabel("step")
  axes[1].set_xlabel("training wall-clock (s)")
  axes[2].set_xscale("log")
  axes[2].minorticks_off()  # Minor log ticks would overlap the few sweep labels.
  axes[2].set_xticks(all_lrs, [f"{lr:g}" for lr in all_lrs])
  axes[2].set_xlabel("peak learning rate")
  axes[2].set_ylabel("final validation loss (min-max band)")
  # Zoom on the end of training, where the optimizers differ; the first steps
  # (loss ~5.5) would otherwise squash everything else.
  lowest = min(np.nanmin(stats[(o, best_lr[o])]["curve"][1]) for o in grids)
  for ax in axes[:2]:
    ax.set_ylim(min(lowest, target) - 0.05, target + 1.0)
  axes[0].legend(fontsize=8)
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _jsonable(value):
  """Drops the curves and writes non-finite floats as null (strict JSON)."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items() if k not in ("curve", "seed_curves")}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


@contextlib.contextmanager
def compile_cache(enabled: bool):
  """jax's persistent compilation cache in a temporary directory, for the seeds after the first."""
  if not enabled:
    yield
    return
  import jax

  with tempfile.TemporaryDirectory(prefix="bench_convergence_jax_cache_") as path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
      yield
    finally:
      jax.config.update("jax_compilation_cache_dir", None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model and budget (minutes)")
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=["adamw", "muon", *_common.SOAP_OPTIMIZERS],
    help="optimizer specs, 'name' or 'name:key=value,...' (options that are TrainConfig "
    "fields set the run's config, e.g. soap:precondition_frequency=20; the others go to the "
    "soap_optax factory, e.g. soap:precision=bfloat16); plain adamw is always the reference",
  )
  parser.add_argument(
    "--learning_rates",
    nargs="+",
    type=float,
    help="peak learning rates, the same grid for every optimizer (default: a grid per "
    "optimizer, see QUICK_LRS / FULL_LRS)",
  )
  parser.add_argument(
    "--extend_grid",
    type=int,
    default=2,
    help="at most this many extra learning rates per side when the best is at a grid end",
  )
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--max_files", type=int, help="cap the corpus (default: whole stdlib)")
  parser.add_argument(
    "--set", nargs="*", metavar="KEY=VALUE", help="override TrainConfig fields, e.g. steps=800"
  )
  parser.add_argument(
    "--no_compile_cache",
    action="store_true",
    help="compile every run from scratch instead of reusing the first seed's programs",
  )
  parser.add_argument("--out", default="runs/bench_convergence")
  args = parser.parse_args()

  header = _common.print_header("bench_convergence: steps and wall-clock to AdamW's best loss")
  train_lm = _common.import_train_lm()
  base = dict(QUICK if args.quick else FULL)
  base.update(parse_overrides(args.set))
  for spec in args.optimizers:  # Fail on a bad spec before any run, not after hours.
    split_options(train_lm, spec)
  optimizers = ["adamw"] + [o for o in _common.available(args.optimizers) if o != "adamw"]
  table = QUICK_LRS if args.quick else FULL_LRS
  grids = {
    opt: tuple(sorted(args.learning_rates or default_grid(table, opt))) for opt in optimizers
  }
  base_config = train_lm.TrainConfig(
    **base, max_files=args.max_files, progress=False, log_every=10**9
  )
  corpus = train_lm.lm_data.load_corpus(max_files=args.max_files)
  n_runs = sum(len(g) for g in grids.values()) * len(args.seeds)
  print(f"{n_runs} runs (before any grid extension): seeds {args.seeds}; learning rates:")
  for opt, grid in grids.items():
    print(f"  {opt}: {[float(f'{lr:g}') for lr in grid]}")
  print(f"grid extension: up to {args.extend_grid} per side when the best is at an end")
  print(f"config: {base}\n", flush=True)

  t0 = time.perf_counter()
  with compile_cache(not args.no_compile_cache):
    runs, grids = sweep(
      train_lm, corpus, base_config, grids, args.seeds, args.out, args.extend_grid
    )
  stats, best_lr, target, edges = analyse(runs, grids)
  warnings = edge_warnings(best_lr, grids, edges, args.extend_grid)
  markdown = report(stats, best_lr, target, grids, args.seeds, header, base, warnings)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(markdown)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(
      {
        "header": header,
        "config": base,
        "seeds": args.seeds,
        "grids": grids,
        "target": target,
        "best_lr": best_lr,
        "best_lr_at_grid_end": edges,
        "warnings": warnings,
        "stats": {f"{opt}@{lr:g}": _jsonable(s) for (opt, lr), s in stats.items()},
      },
      f,
      indent=2,
    )
  plot(stats, best_lr, target, grids, os.path.join(args.out, "curves.png"))
  print()
  print(markdown)
  for line in warnings:
    print(f"\n{'!' * 100}\nWARNING: {line}\n{'!' * 100}")
  print(
    f"\ntotal {time.perf_counter() - t0:.0f}s; "
    f"wrote results.md, results.json and curves.png to {args.out}"
  )
  print(f"quick mode (about 8 min on 2 idle cores):  {QUICK_COMMAND}")
  print(f"long mode (about 80 min on 2 idle cores): {LONG_COMMAND}")


if __name__ == "__main__":
  main()
