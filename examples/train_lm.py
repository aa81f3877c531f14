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

Checkpoints (`--checkpoint_dir`, needs orbax-checkpoint): every
`--checkpoint_every` steps the parameters, the optimizer state, the step, the
training-data stream's position and the elapsed training time are saved with
orbax; running the same command again resumes from the latest checkpoint and
continues exactly as the uninterrupted run would have (same batches, same
numbers). The metrics already in `--out` up to that step are kept.

Device mesh (`--mesh=fsdp:4,tp:2`): the parameters are sharded by the rule of
`lm_model.partition_spec` (FSDP over `fsdp`, Megatron-style tensor parallelism
over `tp`), the batch over every axis but `tp`, and the soap_optax optimizers
spread their statistics and bases over the mesh themselves. On CPU the example
asks jax for as many simulated devices as the mesh needs when it can (before
jax has started); otherwise set
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before starting Python.

Several processes (`--coordinator=HOST:PORT --num_processes=N --process_id=I`,
or `--distributed` to let `jax.distributed.initialize` read them from the
cluster: SLURM, TPU pods, ...): every process runs this same command with its
own id, the mesh spans the devices of all of them, each process places only its
own rows of every batch on its devices, process 0 alone prints and writes
`--out`, and the checkpoints are written by all and restored onto whatever
devices the restarted run has (`soap_optax.abstract_state`). Two processes of 4
simulated CPU devices on one machine:

  for i in 0 1; do
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_lm.py \
      --coordinator=localhost:12355 --num_processes=2 --process_id=$i \
      --mesh=fsdp:4,tp:2 --checkpoint_dir=runs/mp/checkpoints --out=runs/mp &
  done; wait

Diagnostics (`--diagnostics_every=N`, soap_optax optimizers only): every N
steps `soap_optax.diagnostics` reads the optimizer state; each factor's
staleness, refresh count, QR iterations and eigenvalue spread (the worst block
of each) and the count of skipped non-finite steps go into that step's line of
`metrics.jsonl` under `"diagnostics"`, and `diagnostics.png` plots every
factor's staleness over training.

Timing convention: `wall_time` is the cumulative time spent inside training
steps. XLA compilation happens ahead of time, before the first step, and is
reported separately as `compile_time_s`; evaluation time is also excluded and
reported as `eval_time_s`.
"""

from __future__ import annotations

import collections
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
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

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
OPTAX_OPTIMIZERS = ("adamw", "adafactor", "muon")
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
  muon_adam_learning_rate: float | None = None
  muon_consistent_rms: float | None = None
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
  checkpoint_dir: str | None = None
  checkpoint_every: int = 100
  mesh: str | None = None
  diagnostics_every: int = 0


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


# Parameters that Muon leaves to its Adam half even though they are matrices: the byte embedding
# (also the tied output head) and the position embedding. Their rows are looked up, not multiplied
# by an activation, so orthogonalising their update has no meaning (Jordan, 2024).
MUON_ADAM_MATRICES = frozenset({"embed", "embedding", "pos_embed", "head", "lm_head"})


def muon_dimension_numbers(params) -> Any:
  """Which parameters `optax.contrib.muon` orthogonalises: the hidden 2-D kernels.

  A tree like `params` with `MuonDimensionNumbers()` (rows = inputs, columns = outputs, as
  `nnx.Linear` stores its kernel) at every 2-D parameter whose path names none of
  `MUON_ADAM_MATRICES`, and None elsewhere; None sends a parameter to Muon's Adam half. In the
  example's model that leaves the four kernels of every block to Muon, and the embeddings, the
  output head (tied to the byte embedding here, or a separate `head`/`lm_head` matrix in
  another model), the biases and the LayerNorm parameters to Adam, as Muon is meant to be used.
  """

  def rule(path, x):
    names = {str(getattr(k, "key", getattr(k, "idx", k))) for k in path}
    if x.ndim == 2 and not names & MUON_ADAM_MATRICES:
      return optax.contrib.MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    return None

  return jax.tree_util.tree_map_with_path(rule, params)


def make_muon(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """`optax.contrib.muon` on the hidden kernels, Adam on everything else.

  The example's one `--learning_rate` drives both halves unless `--muon_adam_learning_rate` sets
  the Adam half's peak (it then follows the same warmup-cosine shape). `--b1` is Muon's momentum
  and Adam's first-moment decay, `--b2` Adam's second-moment decay, and `--weight_decay` applies
  to both halves (decoupled, multiplied by the learning rate, as in `optax.adamw`).
  `--muon_consistent_rms` (e.g. 0.2, Liu et al. 2025) scales Muon's updates to Adam's RMS, so that
  one learning rate suits both halves; unset, optax's width scaling is used.
  """
  adam_schedule = None
  if config.muon_adam_learning_rate is not None:
    adam_schedule = learning_rate_schedule(
      dataclasses.replace(config, learning_rate=config.muon_adam_learning_rate)
    )
  muon = optax.contrib.muon(
    schedule,
    beta=config.b1,
    weight_decay=config.weight_decay,
    adam_b1=config.b1,
    adam_b2=config.b2,
    adam_weight_decay=config.weight_decay,
    adam_learning_rate=adam_schedule,
    muon_weight_dimension_numbers=muon_dimension_numbers,
    consistent_rms=config.muon_consistent_rms,
  )
  return in_auto_sharding(muon)


def _explicit_mesh_axes() -> tuple[str, ...]:
  """The axes of the context mesh that are of the explicit type (none outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  explicit = jax.sharding.AxisType.Explicit
  return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True) if t == explicit)


def in_auto_sharding(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` with its update run in an automatic-sharding region when the mesh is explicit.

  `optax.contrib.muon`'s Newton-Schulz step multiplies a kernel by its own transpose
  (`x @ x.T`); with the kernel sharded over `fsdp`, both operands are sharded along the
  contracted dimension, and under explicit sharding jax refuses to guess the product's sharding
  (`ShardingTypeError: Contracting dimensions are sharded ...`). Inside `auto_axes` XLA's
  partitioner chooses; the updates leave with the gradients' shardings and the state with its
  own, so everything outside the optimizer keeps its explicit shardings. Without a mesh, or with
  no explicit axis, `tx` is returned unchanged in effect.
  """

  def update_fn(updates, state, params=None):
    if not _explicit_mesh_axes():
      return tx.update(updates, state, params)
    spec = lambda x: jax.typeof(x).sharding.spec  # noqa: E731
    out_sharding = (jax.tree.map(spec, updates), jax.tree.map(spec, state))
    return jax.sharding.auto_axes(tx.update, out_sharding=out_sharding)(updates, state, params)

  return optax.GradientTransformation(tx.init, update_fn)


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
  elif name == "muon":
    opt = make_muon(config, schedule)
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


def make_loss_fn(graphdef, mesh: jax.sharding.Mesh | None = None):
  """Mean next-byte cross-entropy (nats per byte) as a pure function of params.

  On a mesh (explicit sharding, where every operation must know the sharding of
  its result), the model, written for one device, runs in an automatic-sharding
  region: XLA's partitioner decides how to split the computation (gathering the
  FSDP-sharded kernels as it needs them), and the loss comes out replicated.
  Parameters, gradients, batch and optimizer state keep their explicit shardings.
  """

  def loss_fn(params, batch):
    model = nnx.merge(graphdef, params)
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  if mesh is None:
    return loss_fn
  return jax.sharding.auto_axes(loss_fn, out_sharding=PartitionSpec())


def _global_norm(tree) -> jax.Array:
  # Written out rather than via optax, whose name for this moved between versions.
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def step_metrics(loss, grads, opt_state) -> dict[str, jax.Array]:
  """The numbers each step reports, computed inside the compiled step.

  Every entry becomes a field of the step's line in metrics.jsonl (`loss` as
  `train_loss`), so a new metric, e.g. one read from the optimizer state, is one
  more entry here.
  """
  del opt_state  # Nothing is read from it yet.
  return {"loss": loss, "grad_norm": _global_norm(grads)}


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
    return params, opt_state, step_metrics(loss, grads, opt_state)

  return train_step


def make_diagnostics_fn():
  """A jitted ``opt_state -> {"factors": {key: {...}}, "skipped_steps": n}`` for logging.

  Each factor's blocks are reduced to the worst one (largest staleness and spread, fewest
  refreshes), so that a line of metrics.jsonl stays short whatever the blocking.
  """
  import soap_optax

  @jax.jit
  def read(opt_state):
    report = soap_optax.diagnostics(opt_state)
    factors = {
      key: {
        "staleness": jnp.max(f.staleness),
        "refreshes": jnp.min(f.refreshes),
        "qr_iterations": jnp.max(f.qr_iterations),
        "eigenvalue_spread": jnp.max(f.eigenvalue_spread),
      }
      for key, f in report.factors.items()
    }
    return {"factors": factors, "skipped_steps": report.skipped_steps}

  return read


def diagnostics_entry(read, opt_state) -> dict[str, Any]:
  """`read(opt_state)` as JSON-ready Python numbers."""
  report = jax.device_get(read(opt_state))
  return {
    "factors": {k: {n: float(v) for n, v in f.items()} for k, f in report["factors"].items()},
    "skipped_steps": int(report["skipped_steps"]),
  }


# ----------------------------------------------------------------------------
# Device mesh.


def parse_mesh(spec: str) -> dict[str, int]:
  """`"fsdp:4,tp:2"` -> `{"fsdp": 4, "tp": 2}` (mesh axis names and sizes, in order)."""
  axes: dict[str, int] = {}
  for item in spec.split(","):
    name, sep, size = item.strip().partition(":")
    if not sep or not name or not size.strip().isdigit() or int(size) < 1 or name in axes:
      raise ValueError(f"--mesh must look like 'fsdp:4,tp:2' (distinct names), got {spec!r}.")
    axes[name] = int(size)
  return axes


def request_cpu_devices(count: int) -> None:
  """Asks jax for `count` simulated CPU devices, if that can still be done.

  Only possible before jax has started its backends (before the first array is
  made), and not needed when XLA_FLAGS already sets the device count.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  if jax.config.jax_num_cpu_devices > 0:  # already asked for (each process asks for its share)
    return
  with contextlib.suppress(RuntimeError):  # jax has started: keep what it has.
    jax.config.update("jax_num_cpu_devices", count)


def make_mesh(spec: str) -> jax.sharding.Mesh:
  """The device mesh `--mesh` describes, with jax's default (explicit) axis types."""
  axes = parse_mesh(spec)
  count = math.prod(axes.values())
  request_cpu_devices(count)
  devices = jax.devices()
  if len(devices) < count:
    raise ValueError(
      f"--mesh={spec} needs {count} devices, but jax has {len(devices)}. On CPU, start Python "
      f"with XLA_FLAGS=--xla_force_host_platform_device_count={count}."
    )
  return jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices[:count])


def shard_params(params, mesh: jax.sharding.Mesh):
  """Places every parameter on the mesh by `lm_model.partition_spec`."""

  def place(path, x):
    names = jax.tree_util.keystr(path, simple=True, separator="/").split("/")
    spec = lm_model.partition_spec(names, x.shape, dict(mesh.shape))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(place, params)


def batch_sharding(mesh: jax.sharding.Mesh, batch_size: int) -> NamedSharding:
  """Batches are divided over every mesh axis but the tensor-parallel one."""
  axes = tuple(a for a in mesh.axis_names if a != lm_model.TP)
  count = math.prod(mesh.shape[a] for a in axes)
  if batch_size % count:
    raise ValueError(f"--batch_size={batch_size} does not divide over {count} devices ({axes}).")
  return NamedSharding(mesh, PartitionSpec(axes or None, None))


def place_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global batch as an array sharded by `sharding`, built by every process from its rows.

  Each process hands over only the rows its own devices hold (in one process, all of them).
  Every process draws the same global stream of batches from the same seed (a random window
  costs nothing), so a resumed run continues from one saved position, whatever the process
  count.
  """
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])


def step_memory(compiled) -> dict[str, int] | None:
  """XLA's memory plan of a compiled step: its arguments, outputs and temporaries, and the peak.

  The peak counts the arguments, the outputs that do not reuse an argument's buffer (donation)
  and the temporaries, all live at once: an upper bound of what one step holds. None where the
  backend gives no plan.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  sizes = {
    name: int(getattr(analysis, f"{name}_size_in_bytes"))
    for name in ("argument", "output", "alias", "temp")
  }
  sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  return sizes


def memory_per_device(tree) -> dict[str, int]:
  """Bytes of `tree` in all and on its fullest device (replicated arrays count on each)."""
  per_device: collections.Counter = collections.Counter()
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device.id] += shard.data.nbytes
  return {
    "bytes": sum(int(x.nbytes) for x in jax.tree.leaves(tree)),
    "max_bytes_per_device": max(per_device.values(), default=0),
  }


# ----------------------------------------------------------------------------
# Checkpoints.


class Checkpoints:
  """The run's checkpoints in `--checkpoint_dir`, through an orbax CheckpointManager.

  A checkpoint holds the parameters and the optimizer state (restored with the
  shardings of freshly initialised ones, so a run on a mesh resumes sharded) and,
  as JSON, where the loop was: the step, the training-data stream's position and
  the training time so far.
  """

  def __init__(self, directory: str, keep: int = 2):
    import orbax.checkpoint as ocp  # Imported lazily: only runs with checkpoints need it.

    self._ocp = ocp
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, params, opt_state, loop: dict[str, Any]) -> None:
    ocp = self._ocp
    args = ocp.args.Composite(
      state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
      loop=ocp.args.JsonSave(loop),
    )
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, params, tx: optax.GradientTransformation):
    """`(params, opt_state, loop)` of checkpoint `step`; `params` is the template.

    The target's shardings are those of the current devices (the parameters' and, for the
    optimizer state, `soap_optax.abstract_state`), whatever devices, processes or mesh wrote
    the checkpoint: orbax refuses a target without them after a change of topology.
    """
    import soap_optax  # Imported lazily, as in make_optimizer.

    ocp = self._ocp
    params = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    abstract = {"params": params, "opt_state": soap_optax.abstract_state(tx, params)}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    state = restored["state"]
    return state["params"], state["opt_state"], restored["loop"]

  def close(self) -> None:
    self._manager.close()


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


def plot_diagnostics(history: list[dict[str, Any]], path: str, title: str) -> None:
  """Plots each factor's staleness ‖B − diag B‖_F/‖B‖_F (B = QᵀLQ) against steps."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  logged = [r for r in history if "diagnostics" in r]
  if not logged:
    return
  steps = [r["step"] for r in logged]
  keys = sorted(logged[-1]["diagnostics"]["factors"])
  fig, ax = plt.subplots(figsize=(7, 3.6))
  for key in keys:
    values = [r["diagnostics"]["factors"].get(key, {}).get("staleness", np.nan) for r in logged]
    ax.plot(steps, values, linewidth=0.8, alpha=0.7)
  ax.set_xlabel("step")
  ax.set_ylabel("staleness (per factor)")
  ax.set_title(f"{title}\n{len(keys)} factors; a refresh drops a factor's staleness", fontsize=9)
  ax.grid(alpha=0.3)
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


def init_training(config: TrainConfig, mesh: jax.sharding.Mesh | None = None):
  """Builds the model, optimizer and their state as plain pytrees.

  With a mesh (which must be the context mesh, `jax.set_mesh`), the parameters
  are sharded by `lm_model.partition_spec` and the optimizer state follows.

  Returns:
    (loss_fn, tx, params, opt_state), where `loss_fn(params, batch)` closes
    over the model's static structure.
  """
  graphdef, state = nnx.split(make_model(config))
  params = nnx.to_pure_dict(state)
  if mesh is not None:
    params = shard_params(params, mesh)
  tx = make_optimizer(config)
  # Params and optimizer state are donated to the train step, and XLA refuses
  # to donate one buffer twice; copying every leaf guarantees distinct buffers
  # even if an optimizer's init shares one array between state entries.
  opt_state = jax.tree.map(jnp.copy, tx.init(params))
  return make_loss_fn(graphdef, mesh), tx, params, opt_state


# Options that may change between a run and its resumption without changing its numbers.
_RESUMABLE_CHANGES = ("out", "progress", "checkpoint_dir", "checkpoint_every", "log_every")


def _note_config_changes(saved: dict[str, Any], config: TrainConfig) -> None:
  current = dataclasses.asdict(config)
  changed = sorted(
    k for k in current if k not in _RESUMABLE_CHANGES and saved.get(k, current[k]) != current[k]
  )
  if changed:
    print(f"note: resuming with changed options {changed}; the run will differ from one without.")


def _earlier_history(out: str | None, step: int) -> list[dict[str, Any]]:
  """The records up to `step` of the metrics.jsonl already in `out` (none if absent)."""
  path = os.path.join(out, "metrics.jsonl") if out else None
  if path is None or not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if r["step"] <= step]


def train(config: TrainConfig, corpus: lm_data.Corpus | None = None) -> TrainResult:
  """Trains the model described by `config` and writes outputs to `config.out`.

  Args:
    config: the run configuration.
    corpus: an already loaded corpus, so that sweeps can reuse it; loaded from
      `config.corpus_dir` (default: the standard library) when omitted.

  Returns:
    A `TrainResult` with the summary and the per-step metric history.
  """
  with contextlib.ExitStack() as stack:
    mesh = None
    if config.mesh:
      mesh = make_mesh(config.mesh)
      stack.enter_context(jax.set_mesh(mesh))
    return _train(config, corpus, mesh)


def _train(config: TrainConfig, corpus: lm_data.Corpus | None, mesh) -> TrainResult:
  from tqdm.auto import tqdm

  t_start = time.perf_counter()
  if corpus is None:
    corpus = lm_data.load_corpus(
      config.corpus_dir, max_files=config.max_files, val_fraction=config.val_fraction
    )
  print(f"corpus: {corpus.describe()}", flush=True)
  if mesh is not None:
    print(f"mesh: {dict(mesh.shape)} over {mesh.size} {jax.default_backend()} devices", flush=True)

  loss_fn, tx, params, opt_state = init_training(config, mesh)
  num_params = lm_model.count_params(params)

  # Resume from the latest checkpoint, if there is one.
  checkpoints = Checkpoints(config.checkpoint_dir) if config.checkpoint_dir else None
  start_step, data_position, wall_time = 0, None, 0.0
  latest = checkpoints.latest_step() if checkpoints else None
  if latest is not None:
    params, opt_state, loop = checkpoints.restore(latest, params, tx)
    start_step, data_position, wall_time = loop["step"], loop["data_position"], loop["wall_time"]
    _note_config_changes(loop["config"], config)
    print(f"resuming from the checkpoint of step {start_step} in {config.checkpoint_dir}")

  if mesh is None:
    put_batch = lambda batch: batch  # noqa: E731
  else:
    sharding = batch_sharding(mesh, config.batch_size)
    put_batch = functools.partial(place_batch, sharding=sharding)
  train_batches = lm_data.BatchStream(
    corpus.train, config.batch_size, config.seq_len, seed=config.seed, position=data_position
  )
  eval_data = [
    put_batch(b)
    for b in lm_data.fixed_batches(
      corpus.val, config.eval_batches, config.batch_size, config.seq_len, seed=EVAL_SEED
    )
  ]

  # Compile ahead of time so that no step's timing includes XLA compilation.
  t0 = time.perf_counter()
  batch = put_batch(next(train_batches))
  train_step = make_train_step(loss_fn, tx).lower(params, opt_state, batch).compile()
  eval_step = jax.jit(loss_fn).lower(params, eval_data[0]).compile()
  compile_time = time.perf_counter() - t0
  print(
    f"model: {num_params / 1e6:.3f}M params, optimizer: {config.optimizer}, "
    f"compile: {compile_time:.1f}s",
    flush=True,
  )

  read_diagnostics = None
  if config.diagnostics_every > 0:
    if config.optimizer in SOAP_OPTIMIZERS:
      read_diagnostics = make_diagnostics_fn()
    else:
      print(f"note: --diagnostics_every reads soap_optax states; ignored for {config.optimizer}.")

  eval_time = 0.0
  checkpoint_time = 0.0

  def evaluate() -> float:
    nonlocal eval_time
    t = time.perf_counter()
    loss = float(np.mean([float(eval_step(params, b)) for b in eval_data]))
    eval_time += time.perf_counter() - t
    return loss

  def save_checkpoint(step: int) -> None:
    # Called after step `step` and before the batch of the next one is drawn, so
    # the data position saved is exactly where a resumed run must continue.
    nonlocal checkpoint_time
    t = time.perf_counter()
    loop = {
      "step": step,
      "data_position": train_batches.position(),
      "wall_time": wall_time,
      "config": dataclasses.asdict(config),
    }
    checkpoints.save(step, params, opt_state, loop)
    checkpoint_time += time.perf_counter() - t

  if config.out:
    os.makedirs(config.out, exist_ok=True)
  history = _earlier_history(config.out, start_step) if start_step else []
  diverged = False
  with contextlib.ExitStack() as stack:
    metrics_file = None
    if config.out:
      metrics_file = stack.enter_context(open(os.path.join(config.out, "metrics.jsonl"), "w"))
      for entry in history:  # A resumed run keeps the records up to its checkpoint.
        metrics_file.write(json.dumps(entry) + "\n")

    def record(entry: dict[str, Any]) -> None:
      history.append(entry)
      if metrics_file is not None:
        metrics_file.write(json.dumps(entry) + "\n")

    if start_step == 0:
      record({"step": 0, "wall_time": 0.0, "val_loss": evaluate()})
      print(f"step {0:5d}  val {history[0]['val_loss']:.4f}", flush=True)
    bar = stack.enter_context(
      tqdm(
        range(start_step + 1, config.steps + 1),
        initial=start_step,
        total=config.steps,
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

      entry = {"step": step, "train_loss": loss}
      entry.update({k: float(v) for k, v in metrics.items() if k != "loss"})
      entry.update(step_time=step_time, wall_time=wall_time)
      diverged = not math.isfinite(loss)
      if not diverged and (step % config.eval_every == 0 or step == config.steps):
        entry["val_loss"] = evaluate()
      if read_diagnostics and (step % config.diagnostics_every == 0 or step == config.steps):
        entry["diagnostics"] = diagnostics_entry(read_diagnostics, opt_state)
      record(entry)

      bar.set_postfix(loss=f"{loss:.3f}", ms=f"{step_time * 1e3:.0f}", refresh=False)
      if step % config.log_every == 0 or step == config.steps or diverged:
        val = f"  val {entry['val_loss']:.4f}" if "val_loss" in entry else ""
        _log(f"step {step:5d}  train {loss:.4f}{val}  {step_time * 1e3:6.1f} ms/step", bar)
      if diverged:
        _log(f"loss is not finite at step {step}; stopping.", bar)
        break
      if checkpoints and (step % config.checkpoint_every == 0 or step == config.steps):
        save_checkpoint(step)
      batch = put_batch(next(train_batches))  # Host-side sampling, outside the timed region.

  if checkpoints:
    checkpoints.close()
  summary = _summarize(config, history, corpus, num_params, diverged)
  summary.update(
    start_step=start_step,
    compile_time_s=compile_time,
    train_step_memory=step_memory(train_step),
    eval_time_s=eval_time,
    checkpoint_time_s=checkpoint_time,
    total_time_s=time.perf_counter() - t_start,
  )
  if mesh is not None:
    summary["sharding"] = {
      "mesh": dict(mesh.shape),
      "params": memory_per_device(params),
      "optimizer_state": memory_per_device(opt_state),
    }
    state = summary["sharding"]["optimizer_state"]
    print(
      f"optimizer state: {state['bytes'] / 1e6:.2f} MB in all, at most "
      f"{state['max_bytes_per_device'] / 1e6:.2f} MB on one of {mesh.size} devices",
      flush=True,
    )
  if config.out:
    with open(os.path.join(config.out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    plot_history(history, os.path.join(config.out, "loss.png"), _title(config))
    written = "metrics.jsonl, summary.json and loss.png"
    if read_diagnostics:
      plot_diagnostics(history, os.path.join(config.out, "diagnostics.png"), _title(config))
      written = "metrics.jsonl, summary.json, loss.png and diagnostics.png"
    print(f"wrote {written} to {config.out}", flush=True)
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
flags.DEFINE_float(
  "b1",
  _D.b1,
  "First-moment decay (adamw, soap_optax optimizers; muon: its momentum and Adam's b1).",
)
flags.DEFINE_float(
  "b2", _D.b2, "Second-moment decay (adamw, soap_optax optimizers, muon's Adam half)."
)
flags.DEFINE_float("weight_decay", _D.weight_decay, "Decoupled weight decay.")
flags.DEFINE_float(
  "muon_adam_learning_rate",
  None,
  "muon only: peak learning rate of the Adam half (embeddings, head, vectors); "
  "default --learning_rate.",
)
flags.DEFINE_float(
  "muon_consistent_rms",
  None,
  "muon only: scale Muon's updates to about this RMS (0.2 matches AdamW's, so one learning "
  "rate suits both halves); default optax's width scaling.",
)
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
flags.DEFINE_string(
  "checkpoint_dir",
  None,
  "Save checkpoints (orbax) here; rerunning with the same directory resumes from the latest.",
)
flags.DEFINE_integer("checkpoint_every", _D.checkpoint_every, "Steps between checkpoints.")
flags.DEFINE_string(
  "mesh",
  None,
  "Device mesh, e.g. 'fsdp:4,tp:2': shard params (FSDP/TP) and batch over it. "
  "On CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N if jax has started.",
)

flags.DEFINE_integer(
  "diagnostics_every",
  _D.diagnostics_every,
  "Log soap_optax.diagnostics (staleness, refreshes, ...) every N steps to metrics.jsonl and "
  "plot staleness in diagnostics.png; 0 for never.",
)

flags.DEFINE_string(
  "coordinator",
  None,
  "Several processes: the address (host:port) of process 0's coordination service, the same "
  "in every process (with --num_processes and --process_id).",
)
flags.DEFINE_integer("num_processes", None, "Several processes: how many there are in all.")
flags.DEFINE_integer("process_id", None, "Several processes: this process's id, 0 to N - 1.")
flags.DEFINE_bool(
  "distributed",
  False,
  "Start JAX's distributed runtime with what the cluster says (SLURM, TPU pods, Kubernetes, or "
  "JAX_COORDINATOR_ADDRESS, ...); implied by --coordinator.",
)
flags.DEFINE_integer(
  "runtime_timeout",
  None,
  "Several processes: seconds after which the survivors of a process that died stop "
  "(the distributed runtime's heartbeat and shutdown timeouts; JAX's defaults, 100 and 300 s, "
  "if unset).",
)

FLAGS = flags.FLAGS


def config_from_flags() -> TrainConfig:
  """Builds a TrainConfig from the parsed command-line flags."""
  names = {f.name for f in dataclasses.fields(TrainConfig)}
  return TrainConfig(**{n: FLAGS[n].value for n in names if n in FLAGS})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # absl (which orbax logs through) would print every checkpoint's progress at INFO.
  logging.set_verbosity(logging.WARNING)
  config = config_from_flags()
  if not (FLAGS.distributed or FLAGS.coordinator):
    train(config)
    return
  start_distributed(config)
  if jax.process_index() == 0:
    train(config)
    return
  # Every process trains; only process 0 prints and writes --out.
  config = dataclasses.replace(config, out=None, progress=False)
  with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
    train(config)


def start_distributed(config: TrainConfig) -> None:
  """Starts JAX's distributed runtime, before anything starts JAX's backends."""
  # On CPU the processes' devices exchange data through gloo; other platforms ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if FLAGS.num_processes and config.mesh:
    # The simulated CPU devices are per process: each brings its share of the mesh.
    request_cpu_devices(math.prod(parse_mesh(config.mesh).values()) // FLAGS.num_processes)
  timeouts = {}
  if FLAGS.runtime_timeout is not None:
    timeouts = dict(
      heartbeat_timeout_seconds=FLAGS.runtime_timeout,
      shutdown_timeout_seconds=FLAGS.runtime_timeout,
    )
  jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id, **timeouts)


if __name__ == "__main__":
  app.run(main)
