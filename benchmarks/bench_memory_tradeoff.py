r"""What each of SOAP's memory levers costs in convergence, on the model whose bytes are counted.

Trains `examples/train_lm.py`'s model (by default d_model 256, 2 layers: MLP axes 1024 long,
square attention kernels) with AdamW, optax's Muon, default SOAP and SOAP memory settings of
`bench_memory.LEVERS` (one-sided factors, per-parameter rules, a bf16 first moment, bf16
statistics and bases), on the same data, model and schedule, over several seeds. For each
setting it reports:

- optimizer-state bytes per parameter (exact, from `jax.eval_shape`) and the ratio to AdamW's;
- the peak memory of the compiled train step (`compiled.memory_analysis()`: arguments, outputs
  not aliased to a donated argument, temporaries) and its ratio to AdamW's;
- the final validation loss (mean, std and min-max over seeds) and the gap of the mean to
  default SOAP's mean;
- the steps to default SOAP's final loss: the first evaluation at which the seed-averaged
  validation curve reaches default SOAP's mean final loss (and each seed's own curve, min-max,
  with how many seeds reach it), and the ratio to default SOAP's own step.

Every setting of a family runs at one learning rate (`--adamw_lr`, `--muon_lr`, `--soap_lr`):
the comparison is between memory settings at SOAP's learning rate, not a tuning of each.
Results are written after every run to `--out`/results.json, and a run already there is not
repeated (an interrupted sweep continues where it stopped); the table goes to results.md.

Usage:

  python benchmarks/bench_memory_tradeoff.py --out runs/memory_tradeoff
      # the sweep of docs/benchmarks.md: 400 steps, evaluation every 20, 2 seeds (3 for the
      # settings the hyperparameter guide recommends); about an hour on 2 idle CPU cores
  python benchmarks/bench_memory_tradeoff.py --steps 120 --seeds 0 --extra_seeds \
      --settings adamw "soap (default)" "soap smaller" --out runs/memory_probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import bench_memory  # noqa: E402

REFERENCE = "soap (default)"
# The settings docs/hyperparameters.md recommends for a budget: they get the extra seeds.
RECOMMENDED = (
  REFERENCE,
  "soap block 256 + stats+basis bf16 + mu bf16",
  "soap block 256, embeddings one-sided + stats+basis bf16 + moments bf16",
)
DEFAULT_SETTINGS = (
  "adamw",
  "muon",
  *RECOMMENDED,
  "soap block 128 + stats+basis bf16 + moments bf16",
  "soap block 256, MLP one-sided + stats+basis bf16 + mu bf16",
  "soap smaller, attention and embeddings both + mu bf16",
  "soap smaller, attention and embeddings both + stats+basis bf16 + mu bf16",
  "soap mu bf16",
  "soap smaller",
)


def make_optimizer_for(train_lm, setting: str, original):
  """A `make_optimizer(config)` that builds ``setting`` (a baseline, or a LEVERS entry)."""
  import soap_optax

  if setting in ("adamw", "muon"):
    return original  # the example's own baselines, built from the config

  alias, options = bench_memory.LEVERS[setting]

  def make(config):
    opt = getattr(soap_optax, alias)(
      train_lm.learning_rate_schedule(config),
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      precondition_frequency=config.precondition_frequency,
      **options,
    )
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)

  return make


def run_one(train_lm, corpus, params, args, setting: str, seed: int) -> dict:
  original = train_lm.make_optimizer
  family = setting if setting in ("adamw", "muon") else "soap"
  config = train_lm.TrainConfig(
    optimizer=family,
    learning_rate={"adamw": args.adamw_lr, "muon": args.muon_lr, "soap": args.soap_lr}[family],
    steps=args.steps,
    eval_every=args.eval_every,
    log_every=args.steps,
    d_model=args.d_model,
    num_layers=args.num_layers,
    seq_len=args.seq_len,
    batch_size=args.batch_size,
    warmup_steps=args.warmup_steps,
    seed=seed,
    out=None,
    progress=False,
  )
  train_lm.make_optimizer = make_optimizer_for(train_lm, setting, original)
  try:
    state_bytes, _ = bench_memory.state_bytes(train_lm.make_optimizer(config), params)
    t0 = time.perf_counter()
    result = train_lm.train(config, corpus)
  finally:
    train_lm.make_optimizer = original
  memory = result.summary.get("train_step_memory") or {}
  return {
    "setting": setting,
    "seed": seed,
    "learning_rate": config.learning_rate,
    "state_bytes": state_bytes,
    "step_peak_bytes": memory.get("peak"),
    "curve": [(r["step"], r["val_loss"]) for r in result.history if "val_loss" in r],
    "seconds": time.perf_counter() - t0,
  }


def first_reach(curve, target):
  return next((step for step, loss in curve if loss <= target), None)


def summarize(runs: list[dict], num_params: int) -> tuple[list[str], list[list]]:
  """The trade-off table: one row per setting, in the order the settings first ran."""
  settings = list(dict.fromkeys(r["setting"] for r in runs))
  by_setting = {s: [r for r in runs if r["setting"] == s] for s in settings}

  def mean_curve(rs):
    length = min(len(r["curve"]) for r in rs)
    steps = [step for step, _ in rs[0]["curve"][:length]]
    losses = np.mean([[v for _, v in r["curve"][:length]] for r in rs], axis=0)
    return list(zip(steps, losses, strict=True))

  finals = {s: np.array([r["curve"][-1][1] for r in rs]) for s, rs in by_setting.items()}
  target = float(finals[REFERENCE].mean()) if REFERENCE in finals else None
  ref_reach = first_reach(mean_curve(by_setting[REFERENCE]), target) if target else None
  adamw = by_setting.get("adamw", [None])[0]
  rows = []
  for s, rs in by_setting.items():
    f = finals[s]
    reach = first_reach(mean_curve(rs), target) if target is not None else None
    seeds_reach = [first_reach(r["curve"], target) for r in rs] if target is not None else []
    hit = [x for x in seeds_reach if x is not None]
    peak = rs[0]["step_peak_bytes"]
    rows.append(
      [
        s,
        len(rs),
        f"{rs[0]['state_bytes'] / num_params:.2f}",
        f"{rs[0]['state_bytes'] / adamw['state_bytes']:.2f}" if adamw else "",
        f"{peak / 2**20:.1f}" if peak else "",
        f"{peak / adamw['step_peak_bytes']:.2f}" if adamw and peak else "",
        f"{f.mean():.4f} ± {f.std():.4f} ({f.min():.4f}–{f.max():.4f})",
        f"{f.mean() - target:+.4f}" if target is not None else "",
        reach if reach is not None else "not reached",
        f"{reach / ref_reach:.2f}" if reach and ref_reach else "",
        f"{min(hit)}–{max(hit)} ({len(hit)}/{len(rs)})" if hit else f"none of {len(rs)}",
      ]
    )
  headers = [
    "setting",
    "seeds",
    "state bytes / param",
    "× AdamW",
    "train-step peak MiB",
    "× AdamW",
    "final val loss: mean ± std (min–max)",
    "gap to SOAP",
    "steps to SOAP's final (mean curve)",
    "× SOAP's",
    "per seed (reached)",
  ]
  return headers, rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
  parser.add_argument(
    "--extra_seeds",
    nargs="*",
    type=int,
    default=[2],
    help="more seeds for the recommended settings (RECOMMENDED); none with an empty list",
  )
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--eval_every", type=int, default=20)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_layers", type=int, default=2)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--warmup_steps", type=int, default=40)
  parser.add_argument("--adamw_lr", type=float, default=3e-3)
  parser.add_argument("--muon_lr", type=float, default=1e-2)
  parser.add_argument("--soap_lr", type=float, default=1e-2)
  parser.add_argument("--max_files", type=int, default=None)
  parser.add_argument("--out", default="runs/memory_tradeoff")
  parser.add_argument(
    "--report_only", action="store_true", help="print the table of the runs in --out, run none"
  )
  args = parser.parse_args()
  unknown = [
    s for s in args.settings if s not in ("adamw", "muon") and s not in bench_memory.LEVERS
  ]
  if unknown:
    raise SystemExit(f"unknown settings {unknown}; see bench_memory.LEVERS")

  header = _common.print_header("bench_memory_tradeoff: SOAP's memory levers, bytes and loss")
  train_lm = _common.import_train_lm()
  import lm_data

  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  runs: list[dict] = []
  if os.path.exists(path):
    with open(path) as f:
      runs = json.load(f)["runs"]
    print(f"continuing: {len(runs)} runs already in {path}", flush=True)
  done = {(r["setting"], r["seed"]) for r in runs}

  corpus = lm_data.load_corpus(None, max_files=args.max_files, val_fraction=0.1)
  params = bench_memory.lm_params(args.d_model, args.num_layers, args.seq_len)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  plan = [
    (s, seed)
    for seed in args.seeds + args.extra_seeds
    for s in args.settings
    if seed in args.seeds or s in RECOMMENDED
  ]
  for setting, seed in plan:
    if (setting, seed) in done or args.report_only:
      continue
    print(f"\n== {setting}, seed {seed}", flush=True)
    runs.append(run_one(train_lm, corpus, params, args, setting, seed))
    with open(path, "w") as f:
      json.dump({"header": header, "args": vars(args), "runs": runs}, f, indent=2)

  headers, rows = summarize(runs, num_params)
  table = _common.markdown_table(headers, rows)
  print()
  print(table)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"`{header['command']}`\n\n{table}\n")


if __name__ == "__main__":
  main()
