r"""Milliseconds per whole training step of a transformer LM: forward, backward and update.

What users weigh is the whole step against the optimizer they would otherwise use, not the
update alone (`bench_step.py`). This times the complete jitted train step of the LM example's
model (`examples/lm_model.py`: pre-LayerNorm GPT blocks, fused QKV, tied embedding head) on
random tokens: the loss and its gradient, global-norm clipping at 1.0 (as the example chains
before every optimizer), the optimizer's update and `optax.apply_updates`, with the parameters
and the optimizer state donated, as `examples/train_lm.py` runs it. Every row is measured in the
same process, one after the other, with the baselines:

* `adamw`: `optax.adamw` (defaults, constant learning rate), the elementwise baseline;
* `muon`: `optax.contrib.muon` as it is meant to be used (and as the LM example builds it): Muon
  on the hidden 2-D kernels, Adam on the embeddings, the tied output head and the vectors;

then every soap_optax alias at its defaults (`soap`, `shampoo`, `eigen_adafactor`, `eshampoo`),
`soap` with `stagger_refresh=True` (the factors' refreshes spread over the window, so no step
carries them all) and `soap` with `first_basis="qr"` (the first basis from one QR step on the
first statistics instead of `eigh`). Every optimizer uses learning rate 1e-3 and the soap_optax
ones `--precondition_frequency` (default 10).

Timing: every configuration is first compiled ahead of time (`compile s`) and run untimed for
one refresh window (the warm-up: the first call and the first basis); then `--windows` rounds go
over all the configurations, each running one whole refresh window per round, every step timed
on its own up to `block_until_ready`. Whole windows make the mean amortise the refreshes
exactly; the median is the ordinary step and max / median the refresh spike. The rounds put a
change of the machine's load (other processes on a shared machine) on every configuration alike.
Ratios are against `adamw` (and `muon`) in the same run. `peak MB` is what the compiled program
reports (`compiled.memory_analysis()`: its peak where the backend gives one, otherwise arguments
+ outputs + temporaries − donated aliases, marked "(sum)"); `state MB` is the optimizer state's
bytes. All the configurations' states are alive together, so the device must hold all of them.

Presets (the tokens per step are fixed by the preset, since a larger batch dilutes any
optimizer's cost; `--batch_size` and the model options override them):

* `cpu` (default): d_model 128, 2 layers, 4 heads, sequence 128, batch 8 (1,024 tokens per
  step), the example's byte vocabulary (256); about two minutes on 2 cores;
* `gpt2_small`: d_model 768, 12 layers, 12 heads, sequence 1024, batch 8 (8,192 tokens per
  step), vocabulary 50,304 (GPT-2's 50,257 padded to a multiple of 64), 124M parameters. For an
  accelerator; compiling a soap_optax step there takes a minute or more.

`--precision` is passed to the soap_optax aliases when they take a `precision` argument; a
version without one ignores it with a note (and the JSON records that it was ignored).

Usage:

  python benchmarks/bench_train_step.py
  python benchmarks/bench_train_step.py --preset gpt2_small --optimizers adamw muon soap \
      "soap:stagger_refresh=True" --json runs/train_step_gpt2.json
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PRESETS = {
  "cpu": dict(d_model=128, num_layers=2, num_heads=4, seq_len=128, batch_size=8, vocab_size=256),
  "gpt2_small": dict(
    d_model=768, num_layers=12, num_heads=12, seq_len=1024, batch_size=8, vocab_size=50304
  ),
}
DEFAULT_OPTIMIZERS = (
  "adamw",
  "muon",
  *_common.SOAP_OPTIMIZERS,
  "soap:stagger_refresh=True",
  "soap:first_basis=qr",
)
LEARNING_RATE = 1e-3
CLIP_NORM = 1.0
# Batches cycled through the timed steps: a few distinct ones, so that no step sees the
# gradient of the step before, made once on the device so that no host work is timed.
BATCH_POOL = 4


def make_model(options: dict, seed: int):
  """The LM example's transformer, split into its static graph and its parameter pytree."""
  from flax import nnx

  train_lm = _common.import_train_lm()
  lm_model = train_lm.lm_model
  config = lm_model.ModelConfig(
    vocab_size=options["vocab_size"],
    max_len=options["seq_len"],
    d_model=options["d_model"],
    num_layers=options["num_layers"],
    num_heads=options["num_heads"],
  )
  graphdef, state = nnx.split(lm_model.Transformer(config, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def make_loss_fn(graphdef):
  """Mean next-token cross-entropy as a pure function of the parameters."""
  from flax import nnx

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return loss_fn


def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """The jitted whole step `(params, state, batch) -> (params, state, loss)`, both donated."""

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return train_step


def build(spec: str, precondition_frequency: int, precision: str | None):
  """The optimizer of `spec` after global-norm clipping, and a note on `--precision`."""
  name, _ = _common.parse_spec(spec)
  defaults = {}
  note = None
  if name in _common.SOAP_OPTIMIZERS:
    defaults["precondition_frequency"] = precondition_frequency
    if precision is not None:
      fn = _common.soap_optax_fn(name)
      if "precision" in inspect.signature(fn).parameters:
        defaults["precision"] = precision
        note = "applied"
      else:
        note = f"ignored: soap_optax.{name} has no precision argument"
        print(f"note: --precision {precision} {note}.")
  tx = _common.build_optimizer(spec, learning_rate=LEARNING_RATE, **defaults)
  return optax.chain(optax.clip_by_global_norm(CLIP_NORM), tx), note


def peak_bytes(compiled) -> tuple[int | None, str]:
  """The compiled program's peak memory, and how it was read ("peak", "sum" or "n/a")."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # Some backends do not implement it.  # noqa: BLE001
    return None, "n/a"
  if stats is None:
    return None, "n/a"
  peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
  if peak > 0:
    return int(peak), "peak"
  total = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return int(total), "sum"


def tree_bytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


class Run:
  """One optimizer's compiled step and its live state, timed window by window."""

  def __init__(self, spec, args, loss_fn, fresh_params, batches):
    self.spec = spec
    self.batches = batches
    self.steps_done = 0
    self.times: list[float] = []
    tx, self.precision_note = build(spec, args.precondition_frequency, args.precision)
    self.params = fresh_params()
    # Params and state are donated, and XLA refuses to donate one buffer twice: copy every leaf
    # in case an optimizer's init shares an array between entries (as the LM example does).
    self.state = jax.tree.map(jnp.copy, tx.init(self.params))
    self.state_bytes = tree_bytes(self.state)
    step = make_train_step(loss_fn, tx)
    t0 = time.perf_counter()
    self.compiled = step.lower(self.params, self.state, batches[0]).compile()
    self.compile_s = time.perf_counter() - t0
    self.peak_bytes, self.peak_kind = peak_bytes(self.compiled)
    self.loss = None

  def run(self, steps: int, timed: bool) -> None:
    """Runs `steps` steps, each timed on its own up to `block_until_ready` when `timed`."""
    for _ in range(steps):
      batch = self.batches[self.steps_done % len(self.batches)]
      t = time.perf_counter()
      self.params, self.state, self.loss = self.compiled(self.params, self.state, batch)
      jax.block_until_ready((self.params, self.state, self.loss))
      if timed:
        self.times.append(time.perf_counter() - t)
      self.steps_done += 1

  def row(self, precision) -> dict:
    row = {
      "optimizer": self.spec,
      **_common.step_summary(self.times),
      "compile_s": self.compile_s,
      "peak_bytes": self.peak_bytes,
      "peak_kind": self.peak_kind,
      "state_bytes": self.state_bytes,
      "final_loss": float(self.loss),
      "timed_steps": len(self.times),
    }
    if self.precision_note is not None:
      row["precision"] = f"{precision} ({self.precision_note})"
    return row

  def release(self) -> None:
    del self.params, self.state, self.compiled


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=list(DEFAULT_OPTIMIZERS),
    help="optimizer specs ('name' or 'name:key=value,...'); adamw is always measured first",
  )
  parser.add_argument("--precondition_frequency", type=int, default=10)
  parser.add_argument(
    "--windows", type=int, default=2, help="timed refresh windows after one window of warm-up"
  )
  for key in ("d_model", "num_layers", "num_heads", "seq_len", "batch_size", "vocab_size"):
    parser.add_argument(f"--{key}", type=int, help=f"override the preset's {key}")
  parser.add_argument(
    "--precision",
    help="matmul precision for the soap_optax aliases, if this version takes one (else ignored)",
  )
  parser.add_argument("--seed", type=int, default=0)
  _common.add_json_arg(parser)
  args = parser.parse_args()
  if args.windows < 1 or args.precondition_frequency < 1:
    parser.error("--windows and --precondition_frequency must be at least 1")

  header = _common.print_header("bench_train_step: the whole training step")
  options = dict(PRESETS[args.preset])
  options.update({k: getattr(args, k) for k in options if getattr(args, k) is not None})
  specs = ["adamw"] + [s for s in _common.available(args.optimizers) if s != "adamw"]

  graphdef, params0 = make_model(options, args.seed)
  host_params = jax.device_get(params0)
  del params0
  num_params = sum(int(np.size(x)) for x in jax.tree.leaves(host_params))
  loss_fn = make_loss_fn(graphdef)
  keys = jax.random.split(jax.random.key(args.seed + 1), BATCH_POOL)
  shape = (options["batch_size"], options["seq_len"] + 1)
  batches = [jax.random.randint(k, shape, 0, options["vocab_size"], jnp.int32) for k in keys]
  tokens = options["batch_size"] * options["seq_len"]
  device = jax.devices()[0]
  print(
    f"model: {num_params / 1e6:.2f}M parameters ({options}); {tokens:,} tokens per step "
    f"(batch {options['batch_size']} x sequence {options['seq_len']}); float32 parameters; "
    f"device {device.platform} / {device.device_kind}; learning rate {LEARNING_RATE:g}, "
    f"clip {CLIP_NORM:g}, precondition_frequency {args.precondition_frequency}; "
    f"{args.windows} timed window(s) of {args.precondition_frequency} steps after one of "
    "warm-up.",
    flush=True,
  )

  def fresh_params():
    return jax.tree.map(jnp.asarray, host_params)

  # Every configuration is compiled and warmed up (one refresh window) first; then the timed
  # windows go round the configurations, one window each per round, so that a change of the
  # machine's load during the run (other processes on a shared machine) falls on all of them
  # alike instead of on whichever ran at the time.
  f = args.precondition_frequency
  runs, rows = [], {}
  for spec in specs:
    try:
      run = Run(spec, args, loss_fn, fresh_params, batches)
      run.run(f, timed=False)
    except Exception as e:  # One failing optimizer should not lose the others' numbers.  # noqa: BLE001
      print(f"FAILED {spec}: {type(e).__name__}: {str(e)[:500]}", flush=True)
      rows[spec] = {"optimizer": spec, "error": f"{type(e).__name__}: {str(e)[:500]}"}
      continue
    runs.append(run)
    print(
      f"{spec}: compiled in {run.compile_s:.1f} s, warmed up; load {_common.load_summary()}",
      flush=True,
    )
  for window in range(args.windows):
    for run in runs:
      run.run(f, timed=True)
    print(f"timed window {window + 1}/{args.windows}; load {_common.load_summary()}", flush=True)
  for run in runs:
    rows[run.spec] = run.row(args.precision)
    run.release()
  rows = [rows[s] for s in specs if s in rows]

  by_name = {r["optimizer"]: r for r in rows if "error" not in r}
  adamw, muon = by_name.get("adamw"), by_name.get("muon")

  def ratio(row, ref, key):
    return f"{row[key] / ref[key]:.2f}x" if ref and row.get(key) else "-"

  table_rows = []
  for r in rows:
    if "error" in r:
      table_rows.append([r["optimizer"], "failed", *["-"] * 9])
      continue
    mb = lambda b: f"{b / 2**20:.1f}" if b is not None else "n/a"  # noqa: E731
    table_rows.append(
      [
        r["optimizer"],
        f"{r['median_ms']:.2f}",
        f"{r['mean_ms']:.2f}",
        f"{r['max_over_median']:.1f}",
        ratio(r, adamw, "median_ms"),
        ratio(r, adamw, "mean_ms"),
        ratio(r, muon, "mean_ms"),
        f"{r['compile_s']:.1f}",
        mb(r["peak_bytes"]) + ("" if r["peak_kind"] != "sum" else " (sum)"),
        mb(r["state_bytes"]),
        f"{r['final_loss']:.3f}",
      ]
    )
  headers = [
    "optimizer",
    "median ms",
    "mean ms",
    "max / median",
    "median / adamw",
    "mean / adamw",
    "mean / muon",
    "compile s",
    "peak MB",
    "state MB",
    "loss",
  ]
  print()
  print(_common.markdown_table(headers, table_rows))
  print(f"\nload average after: {_common.load_summary()}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(
        {
          "header": header,
          "preset": args.preset,
          "model": {**options, "num_params": num_params, "tokens_per_step": tokens},
          "device": {"platform": device.platform, "kind": device.device_kind},
          "precondition_frequency": args.precondition_frequency,
          "windows": args.windows,
          "learning_rate": LEARNING_RATE,
          "precision": args.precision,
          "rows": rows,
        },
        f,
        indent=2,
      )
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
