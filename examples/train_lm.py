r"""Trains a byte-level transformer language model on the Python standard library.

The corpus is the `.py` files that ship with the running interpreter, so the
example needs no download. Files are split into train and validation by a hash
of their path, the model is a small decoder-only transformer in Flax NNX, and
the optimizer is one of the `soap_optax` optimizers or an optax baseline,
always chained after global-norm gradient clipping.

Example:

  python examples/train_lm.py --optimizer=soap --out=runs/soap

Outputs in `--out`: `metrics.jsonl` (one JSON object per step), `loss.png`
(train/validation loss against steps and against wall-clock) and
`summary.json` (final losses, timings and the full configuration).

Timing convention: `wall_time` is the cumulative time spent inside training
steps. XLA compilation happens ahead of time, before the first step, and is
reported separately as `compile_time_s`; evaluation time is also excluded and
reported as `eval_time_s`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

# Importable both as a script (`python examples/train_lm.py`) and from tests or
# benchmarks that put this directory on sys.path.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lm_data  # noqa: E402
import lm_model  # noqa: E402

# On CPU, jax runs QR and eigh (the preconditioner refreshes) through scipy's
# OpenBLAS, which is loaded lazily on first use. Its worker threads compete with
# XLA's own thread pool, and on a machine with few cores that can make a single
# QR 100x slower (seconds instead of milliseconds). One BLAS thread avoids it;
# set OPENBLAS_NUM_THREADS yourself to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SOAP_OPTIMIZERS = ("soap", "shampoo", "eigen_adafactor", "eshampoo")
OPTAX_OPTIMIZERS = ("adamw", "adafactor")
OPTIMIZERS = SOAP_OPTIMIZERS + OPTAX_OPTIMIZERS
# Evaluation batches are drawn with a fixed seed, independent of --seed, so the
# validation loss of runs with different seeds is measured on the same bytes.
EVAL_SEED = 1234


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a training run. Mirrors the command-line flags."""

  optimizer: str = "soap"
  learning_rate: float = 1e-2
  b1: float = 0.95
  b2: float = 0.95
  weight_decay: float = 0.01
  precondition_frequency: int = 10
  refresh_tolerance: float | None = None
  stagger_refresh: bool = False
  warmup_steps: int = 50
  final_lr_fraction: float = 0.1
  clip_norm: float = 1.0
  steps: int = 800
  batch_size: int = 16
  seq_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  seed: int = 0
  eval_every: int = 50
  eval_batches: int = 8
  log_every: int = 50
  max_files: int | None = None
  corpus_dir: str | None = None
  val_fraction: float = 0.1
  out: str | None = "runs/train_lm"
  progress: bool = True


@dataclasses.dataclass
class TrainResult:
  """What `train` returns: the summary written to summary.json and the per-step history."""

  summary: dict[str, Any]
  history: list[dict[str, Any]]


# ----------------------------------------------------------------------------
# Optimizers.


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warmup from 0 to the peak rate, then cosine decay to a fraction of it."""
  warmup = min(config.warmup_steps, max(config.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    # optax counts decay_steps from step 0, warmup included.
    decay_steps=max(config.steps, warmup + 1),
    end_value=config.learning_rate * config.final_lr_fraction,
  )


def _call_with_supported_kwargs(fn, **kwargs):
  """Calls `fn` with only the keyword arguments its signature accepts.

  The soap_optax optimizers share most options but not all of them (e.g. only
  EShampoo has `refresh_tolerance`), so options a given optimizer lacks are
  dropped with a note instead of failing.
  """
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return fn(**kwargs)
  dropped = sorted(k for k in kwargs if k not in params)
  if dropped:
    print(f"note: {fn.__name__} does not take {dropped}; using its defaults for those.")
  return fn(**{k: v for k, v in kwargs.items() if k in params})


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """Builds the optimizer named by `config.optimizer`, after gradient clipping."""
  schedule = learning_rate_schedule(config)
  name = config.optimizer
  if name == "adamw":
    opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay)
  elif name == "adafactor":
    # Without parameter-scale multiplication the learning rate means the same
    # thing as for Adam-style optimizers, which keeps sweeps comparable.
    opt = optax.adafactor(
      schedule,
      multiply_by_parameter_scale=False,
      weight_decay_rate=config.weight_decay or None,
    )
  elif name in SOAP_OPTIMIZERS:
    import soap_optax  # Imported lazily: the examples also run without it.

    fn = getattr(soap_optax, name, None)
    if fn is None:
      raise ValueError(f"soap_optax.{name} is not available in this soap_optax version.")
    kwargs = dict(
      learning_rate=schedule,
      b1=config.b1,
      b2=config.b2,
      weight_decay=config.weight_decay,
      precondition_frequency=config.precondition_frequency,
    )
    if config.refresh_tolerance is not None:
      kwargs["refresh_tolerance"] = config.refresh_tolerance
    if config.stagger_refresh:
      kwargs["stagger_refresh"] = True
    opt = _call_with_supported_kwargs(fn, **kwargs)
  else:
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)


# ----------------------------------------------------------------------------
# Model, loss and compiled steps.


def make_model(config: TrainConfig) -> lm_model.Transformer:
  model_config = lm_model.ModelConfig(
    vocab_size=lm_data.VOCAB_SIZE,
    max_len=config.seq_len,
    d_model=config.d_model,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
  )
  return lm_model.Transformer(model_config, rngs=nnx.Rngs(config.seed))


def make_loss_fn(graphdef):
  """Mean next-byte cross-entropy (nats per byte) as a pure function of params."""

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  return loss_fn


def _global_norm(tree) -> jax.Array:
  # Written out rather than via optax, whose name for this moved between versions.
  return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(tree)))


def make_train_step(loss_fn, tx: optax.GradientTransformation):
  """Returns a jitted (params, opt_state, batch) -> (params, opt_state, metrics) step.

  The model is handled as a plain pytree (split once with `nnx.split`) rather
  than through `nnx.jit`, which keeps the per-step Python overhead to a single
  jitted call; params and optimizer state are donated so XLA updates them in
  place.
  """

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": _global_norm(grads)}

  return train_step


# ----------------------------------------------------------------------------
# Output.


def environment() -> dict[str, Any]:
  """Describes the machine and library versions, for reproducibility."""
  return {
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
  }


def _ema(values: list[float], decay: float = 0.9) -> list[float]:
  """Exponential moving average, used only to make noisy train curves readable."""
  out, avg = [], None
  for v in values:
    avg = v if avg is None else decay * avg + (1 - decay) * v
    out.append(avg)
  return out


def plot_history(history: list[dict[str, Any]], path: str, title: str) -> None:
  """Plots train and validation loss against steps and against wall-clock seconds."""
  import matplotlib

  matplotlib.use("Agg")  # No display needed; must precede the pyplot import.
  import matplotlib.pyplot as plt

  train = [r for r in history if "train_loss" in r]
  val = [r for r in history if "val_loss" in r]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
  for ax, key, label in ((axes[0], "step", "step"), (axes[1], "wall_time", "wall-clock (s)")):
    x = [r[key] for r in train]
    y = [r["train_loss"] for r in train]
    ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(x, _ema(y), color="tab:blue", label="train (EMA)")
    ax.plot(
      [r[key] for r in val],
      [r["val_loss"] for r in val],
      "o-",
      color="tab:orange",
      markersize=3,
      label="validation",
    )
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("loss (nats/byte)")
  axes[0].legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Training loop.


def _log(message: str, progress_bar) -> None:
  # tqdm.write keeps the progress bar intact below the printed line.
  if not progress_bar.disable:
    progress_bar.write(message)
  else:
    print(message, flush=True)


def init_training(config: TrainConfig):
  """Builds the model, optimizer and their state as plain pytrees.

  Returns:
    (loss_fn, tx, params, opt_state), where `loss_fn(params, batch)` closes
    over the model's static structure.
  """
  graphdef, state = nnx.split(make_model(config))
  params = nnx.to_pure_dict(state)
  tx = make_optimizer(config)
  # Params and optimizer state are donated to the train step, and XLA refuses
  # to donate one buffer twice; copying every leaf guarantees distinct buffers
  # even if an optimizer's init shares one array between state entries.
  opt_state = jax.tree.map(jnp.copy, tx.init(params))
  return make_loss_fn(graphdef), tx, params, opt_state


def train(config: TrainConfig, corpus: lm_data.Corpus | None = None) -> TrainResult:
  """Trains the model described by `config` and writes outputs to `config.out`.

  Args:
    config: the run configuration.
    corpus: an already loaded corpus, so that sweeps can reuse it; loaded from
      `config.corpus_dir` (default: the standard library) when omitted.

  Returns:
    A `TrainResult` with the summary and the per-step metric history.
  """
  from tqdm.auto import tqdm

  t_start = time.perf_counter()
  if corpus is None:
    corpus = lm_data.load_corpus(
      config.corpus_dir, max_files=config.max_files, val_fraction=config.val_fraction
    )
  print(f"corpus: {corpus.describe()}", flush=True)

  loss_fn, tx, params, opt_state = init_training(config)
  num_params = lm_model.count_params(params)
  train_batches = lm_data.batch_iterator(
    corpus.train, config.batch_size, config.seq_len, seed=config.seed
  )
  eval_data = lm_data.fixed_batches(
    corpus.val, config.eval_batches, config.batch_size, config.seq_len, seed=EVAL_SEED
  )

  # Compile ahead of time so that no step's timing includes XLA compilation.
  t0 = time.perf_counter()
  batch = next(train_batches)
  train_step = make_train_step(loss_fn, tx).lower(params, opt_state, batch).compile()
  eval_step = jax.jit(loss_fn).lower(params, eval_data[0]).compile()
  compile_time = time.perf_counter() - t0
  print(
    f"model: {num_params / 1e6:.3f}M params, optimizer: {config.optimizer}, "
    f"compile: {compile_time:.1f}s",
    flush=True,
  )

  eval_time = 0.0

  def evaluate() -> float:
    nonlocal eval_time
    t = time.perf_counter()
    loss = float(np.mean([float(eval_step(params, b)) for b in eval_data]))
    eval_time += time.perf_counter() - t
    return loss

  if config.out:
    os.makedirs(config.out, exist_ok=True)
  history: list[dict[str, Any]] = []
  wall_time = 0.0
  diverged = False
  with contextlib.ExitStack() as stack:
    metrics_file = None
    if config.out:
      metrics_file = stack.enter_context(open(os.path.join(config.out, "metrics.jsonl"), "w"))

    def record(entry: dict[str, Any]) -> None:
      history.append(entry)
      if metrics_file is not None:
        metrics_file.write(json.dumps(entry) + "\n")

    record({"step": 0, "wall_time": 0.0, "val_loss": evaluate()})
    print(f"step {0:5d}  val {history[0]['val_loss']:.4f}", flush=True)
    bar = stack.enter_context(
      tqdm(
        range(1, config.steps + 1),
        # None lets tqdm hide the bar when stderr is not a terminal (e.g. logs).
        disable=None if config.progress else True,
        dynamic_ncols=True,
        mininterval=0.5,
        desc=config.optimizer,
      )
    )
    for step in bar:
      t = time.perf_counter()
      params, opt_state, metrics = train_step(params, opt_state, batch)
      loss = float(metrics["loss"])  # Blocks until the step has finished.
      step_time = time.perf_counter() - t
      wall_time += step_time
      batch = next(train_batches)  # Host-side sampling, outside the timed region.

      entry = {
        "step": step,
        "train_loss": loss,
        "grad_norm": float(metrics["grad_norm"]),
        "step_time": step_time,
        "wall_time": wall_time,
      }
      diverged = not math.isfinite(loss)
      if not diverged and (step % config.eval_every == 0 or step == config.steps):
        entry["val_loss"] = evaluate()
      record(entry)

      bar.set_postfix(loss=f"{loss:.3f}", ms=f"{step_time * 1e3:.0f}", refresh=False)
      if step % config.log_every == 0 or step == config.steps or diverged:
        val = f"  val {entry['val_loss']:.4f}" if "val_loss" in entry else ""
        _log(f"step {step:5d}  train {loss:.4f}{val}  {step_time * 1e3:6.1f} ms/step", bar)
      if diverged:
        _log(f"loss is not finite at step {step}; stopping.", bar)
        break

  summary = _summarize(config, history, corpus, num_params, diverged)
  summary.update(
    compile_time_s=compile_time,
    eval_time_s=eval_time,
    total_time_s=time.perf_counter() - t_start,
  )
  if config.out:
    with open(os.path.join(config.out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    plot_history(history, os.path.join(config.out, "loss.png"), _title(config))
    print(f"wrote metrics.jsonl, summary.json and loss.png to {config.out}", flush=True)
  print(
    f"done: {summary['steps']} steps in {summary['wall_time_s']:.1f}s of training "
    f"({summary['total_time_s']:.1f}s total); final train {summary['final_train_loss']:.4f}, "
    f"val {summary['final_val_loss']:.4f}",
    flush=True,
  )
  return TrainResult(summary=summary, history=history)


def _title(config: TrainConfig) -> str:
  return (
    f"{config.optimizer}, lr {config.learning_rate:g}, d_model {config.d_model}, "
    f"{config.num_layers} layers, batch {config.batch_size}x{config.seq_len}"
  )


def _summarize(config, history, corpus, num_params, diverged) -> dict[str, Any]:
  """Condenses the history into the numbers a reader or a benchmark needs."""
  train = [r for r in history if "train_loss" in r]
  val = [r["val_loss"] for r in history if "val_loss" in r]
  # The last few steps are averaged because a single batch loss is noisy.
  tail = [r["train_loss"] for r in train[-10:]]
  step_times = [r["step_time"] for r in train]
  # A diverged run has no meaningful final loss, even if it was evaluated earlier.
  final_val = val[-1] if val and not diverged else float("nan")
  return {
    "optimizer": config.optimizer,
    "steps": len(train),
    "diverged": diverged,
    "initial_val_loss": val[0] if val else float("nan"),
    "final_train_loss": float(np.mean(tail)) if tail else float("nan"),
    "final_val_loss": final_val,
    "final_val_bits_per_byte": final_val / math.log(2),
    "best_val_loss": float(np.nanmin(val)) if val else float("nan"),
    "wall_time_s": train[-1]["wall_time"] if train else 0.0,
    "median_step_time_ms": 1e3 * float(np.median(step_times)) if step_times else 0.0,
    "num_params": num_params,
    "corpus": {
      "root": corpus.root,
      "train_files": len(corpus.train_files),
      "val_files": len(corpus.val_files),
      "train_bytes": int(corpus.train.size),
      "val_bytes": int(corpus.val.size),
    },
    "config": dataclasses.asdict(config),
    "environment": environment(),
  }


# ----------------------------------------------------------------------------
# Command line.

_D = TrainConfig()
flags.DEFINE_enum("optimizer", _D.optimizer, OPTIMIZERS, "Optimizer to train with.")
flags.DEFINE_float("learning_rate", _D.learning_rate, "Peak learning rate.")
flags.DEFINE_float("b1", _D.b1, "First-moment decay (adamw and soap_optax optimizers).")
flags.DEFINE_float("b2", _D.b2, "Second-moment decay (adamw and soap_optax optimizers).")
flags.DEFINE_float("weight_decay", _D.weight_decay, "Decoupled weight decay.")
flags.DEFINE_integer(
  "precondition_frequency", _D.precondition_frequency, "Steps between preconditioner refreshes."
)
flags.DEFINE_float(
  "refresh_tolerance", None, "EShampoo adaptive refresh tolerance (library default if unset)."
)
flags.DEFINE_bool(
  "stagger_refresh", _D.stagger_refresh, "Spread the factors' refreshes over each window."
)
flags.DEFINE_integer("warmup_steps", _D.warmup_steps, "Linear warmup steps before cosine decay.")
flags.DEFINE_integer("steps", _D.steps, "Number of training steps.")
flags.DEFINE_integer("batch_size", _D.batch_size, "Sequences per batch.")
flags.DEFINE_integer("seq_len", _D.seq_len, "Bytes per training sequence.")
flags.DEFINE_integer("d_model", _D.d_model, "Transformer width.")
flags.DEFINE_integer("num_layers", _D.num_layers, "Number of transformer blocks.")
flags.DEFINE_integer("num_heads", _D.num_heads, "Attention heads per block.")
flags.DEFINE_integer("seed", _D.seed, "Seed for initialisation and data sampling.")
flags.DEFINE_integer("eval_every", _D.eval_every, "Steps between validation evaluations.")
flags.DEFINE_integer("eval_batches", _D.eval_batches, "Batches per validation evaluation.")
flags.DEFINE_integer("log_every", _D.log_every, "Steps between printed loss lines.")
flags.DEFINE_integer("max_files", None, "Use at most this many corpus files (default: all).")
flags.DEFINE_string("corpus_dir", None, "Directory of .py files (default: the stdlib).")
flags.DEFINE_string("out", _D.out, "Output directory; empty to write nothing.")
flags.DEFINE_bool("progress", _D.progress, "Show a tqdm progress bar.")

FLAGS = flags.FLAGS


def config_from_flags() -> TrainConfig:
  """Builds a TrainConfig from the parsed command-line flags."""
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{n: FLAGS[n].value for n in names if n in FLAGS})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train(config_from_flags())


if __name__ == "__main__":
  app.run(main)
