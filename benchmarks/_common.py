"""Helpers shared by the benchmark scripts: provenance printing, optimizer specs, shapes, tables.

Benchmarks are run by hand (never by the test suite). Every script prints the
exact command line and a description of the machine first, so pasted output is
self-describing, and reports each number as a ratio against a baseline measured
in the same process.
"""

from __future__ import annotations

import ast
import inspect
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(REPO_ROOT, "examples")
SOAP_OPTIMIZERS = ("soap", "shampoo", "eigen_adafactor", "eshampoo")

# jax's CPU QR/eigh go through scipy's OpenBLAS, loaded lazily on first use; its
# threads fight XLA's thread pool and can slow a refresh by 100x on few-core
# machines. Set before any linear algebra runs; an explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
OPTAX_OPTIMIZERS = ("adamw", "adafactor", "muon")


def machine_info() -> dict[str, Any]:
  """Versions and hardware that the numbers depend on."""
  info = {
    "platform": platform.platform(),
    "processor": platform.processor() or platform.machine(),
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": getattr(getattr(jax, "lib", None), "__version__", None) or _jaxlib_version(),
    "optax": optax.__version__,
    "backend": jax.default_backend(),
    "devices": ", ".join(str(d) for d in jax.devices()),
    # Other processes competing for the cores distort timings; this makes it visible.
    "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    # Which code the numbers belong to: rows measured on different commits are not comparable.
    "git": git_revision(),
  }
  try:
    import soap_optax

    info["soap_optax"] = getattr(soap_optax, "__version__", "unversioned")
  except ImportError:
    info["soap_optax"] = "not importable"
  return info


def git_revision() -> str | None:
  """The repository's commit, with "+uncommitted changes" when the work tree differs from it."""

  def run(*args):
    return subprocess.run(
      ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()

  try:
    commit = run("rev-parse", "--short=12", "HEAD")
    dirty = run("status", "--porcelain", "--untracked-files=no")
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + (" +uncommitted changes" if dirty else "")


def _jaxlib_version() -> str:
  try:
    import jaxlib

    return jaxlib.__version__
  except (ImportError, AttributeError):
    return "unknown"


def print_header(title: str) -> dict[str, Any]:
  """Prints the benchmark title, exact command line and machine; returns the machine info."""
  command = shlex.join([sys.executable, *sys.argv])
  info = machine_info()
  print(f"== {title} ==")
  print(f"command: {command}")
  for key, value in info.items():
    print(f"{key:>12}: {value}")
  print(flush=True)
  return {"command": command, **info}


# ----------------------------------------------------------------------------
# Optimizers.


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """Parses 'name' or 'name:key=value,key=value' into (name, options).

  Values are Python literals when they parse as one (numbers, booleans, None),
  otherwise strings, so `soap:max_precond_dim=1024,stats_dtype=bfloat16` works.
  """
  name, _, rest = spec.partition(":")
  options = {}
  for item in filter(None, rest.split(",")):
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"Bad option {item!r} in optimizer spec {spec!r}; expected key=value.")
    try:
      options[key.strip()] = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      options[key.strip()] = raw.strip()
  return name.strip(), options


def soap_optax_fn(name: str) -> Callable[..., optax.GradientTransformation] | None:
  """Returns `soap_optax.<name>`, or None (with a printed note) if it does not exist yet."""
  try:
    import soap_optax
  except ImportError as e:
    print(f"note: skipping {name}: soap_optax is not importable ({e}).")
    return None
  fn = getattr(soap_optax, name, None)
  if fn is None:
    print(f"note: skipping {name}: soap_optax.{name} does not exist in this version.")
  return fn


def available(specs: Sequence[str]) -> list[str]:
  """Keeps the optimizer specs that can be built here, printing a note for the others."""
  kept = []
  for spec in specs:
    name, _ = parse_spec(spec)
    if name in OPTAX_OPTIMIZERS or (name in SOAP_OPTIMIZERS and soap_optax_fn(name)):
      kept.append(spec)
    elif name not in SOAP_OPTIMIZERS:
      print(f"note: skipping unknown optimizer {name!r}.")
  return kept


def call_with_supported_kwargs(fn: Callable[..., Any], **kwargs) -> Any:
  """Calls `fn` with the keyword arguments its signature accepts; notes the rest."""
  params = inspect.signature(fn).parameters
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return fn(**kwargs)
  dropped = sorted(k for k in kwargs if k not in params)
  if dropped:
    print(f"note: {getattr(fn, '__name__', fn)} does not take {dropped}; ignoring them.")
  return fn(**{k: v for k, v in kwargs.items() if k in params})


def build_optimizer(
  spec: str, learning_rate: float = 1e-3, **defaults
) -> optax.GradientTransformation:
  """Builds an optimizer from a spec string; options in the spec override `defaults`."""
  name, options = parse_spec(spec)
  kwargs = {**defaults, **options}
  if name == "adamw":
    return call_with_supported_kwargs(optax.adamw, learning_rate=learning_rate, **kwargs)
  if name == "adafactor":
    return call_with_supported_kwargs(optax.adafactor, learning_rate=learning_rate, **kwargs)
  if name == "muon":
    return build_muon(learning_rate, **kwargs)
  fn = soap_optax_fn(name)
  if fn is None:
    raise ValueError(f"Optimizer {name!r} is not available.")
  return call_with_supported_kwargs(fn, learning_rate=learning_rate, **kwargs)


def build_muon(learning_rate: float, **kwargs) -> optax.GradientTransformation:
  """`optax.contrib.muon` as the LM example uses it: Muon on the hidden kernels, Adam elsewhere.

  Which parameters are Muon's is `examples/train_lm.py`'s `muon_dimension_numbers` (every 2-D
  parameter but the embeddings and an output head; on `gpt_param_shapes` that leaves `embed` to
  Adam). The soap_optax-style options map as in the example: `b1` is Muon's momentum and Adam's
  b1, `b2` Adam's b2 and `weight_decay` applies to both halves; any other option (e.g.
  `consistent_rms=0.2`, `adam_learning_rate`) goes to `optax.contrib.muon` as it is. On an
  explicit-sharding mesh the update runs in an automatic-sharding region (see the example's
  `in_auto_sharding`).
  """
  train_lm = import_train_lm()
  if "muon_weight_dimension_numbers" not in inspect.signature(optax.contrib.muon).parameters:
    # Without it this optax's muon orthogonalises every matrix, embeddings included: a different
    # optimizer from the baseline the benchmarks mean, so refuse rather than measure it.
    raise ValueError(
      f"optax {optax.__version__}'s contrib.muon has no muon_weight_dimension_numbers"
    )
  options = dict(kwargs)
  renamed = {}
  if "b1" in options:
    renamed["beta"] = renamed["adam_b1"] = options.pop("b1")
  if "b2" in options:
    renamed["adam_b2"] = options.pop("b2")
  if "weight_decay" in options:
    renamed["weight_decay"] = renamed["adam_weight_decay"] = options.pop("weight_decay")
  tx = call_with_supported_kwargs(
    optax.contrib.muon,
    learning_rate=learning_rate,
    muon_weight_dimension_numbers=train_lm.muon_dimension_numbers,
    **{**renamed, **options},
  )
  return train_lm.in_auto_sharding(tx)


# ----------------------------------------------------------------------------
# Parameter shapes.


def gpt_param_shapes(
  d_model: int = 384, num_layers: int = 6, vocab_size: int = 256, mlp_ratio: int = 4
) -> dict[str, tuple[int, ...]]:
  """Shapes of a GPT-like model's parameters, flattened into one dict.

  Per layer: fused QKV (d, 3d), attention output (d, d), MLP up (d, 4d) and
  down (4d, d) kernels with their biases, and two LayerNorms; plus a tied
  (vocab, d) embedding and a final LayerNorm. With the defaults this is the
  d_model=384, 6-layer setting (~10.7M parameters).
  """
  d, h = d_model, mlp_ratio * d_model
  shapes: dict[str, tuple[int, ...]] = {"embed": (vocab_size, d)}
  for i in range(num_layers):
    layer = {
      "qkv/kernel": (d, 3 * d),
      "qkv/bias": (3 * d,),
      "attn_out/kernel": (d, d),
      "attn_out/bias": (d,),
      "mlp_up/kernel": (d, h),
      "mlp_up/bias": (h,),
      "mlp_down/kernel": (h, d),
      "mlp_down/bias": (d,),
      "ln1/scale": (d,),
      "ln1/bias": (d,),
      "ln2/scale": (d,),
      "ln2/bias": (d,),
    }
    shapes.update({f"layer{i}/{k}": v for k, v in layer.items()})
  shapes.update({"ln_f/scale": (d,), "ln_f/bias": (d,)})
  return shapes


def num_params(shapes: dict[str, tuple[int, ...]]) -> int:
  return int(sum(np.prod(s) for s in shapes.values()))


# ----------------------------------------------------------------------------
# Command lines.


def add_model_args(parser) -> None:
  """``--d_model`` / ``--num_layers``: the GPT shapes of ``gpt_param_shapes``."""
  parser.add_argument("--d_model", type=int, default=384)
  parser.add_argument("--num_layers", type=int, default=6)


def add_timing_args(parser) -> None:
  """The options of a timed run over whole refresh windows, on the GPT shapes."""
  parser.add_argument("--precondition_frequency", type=int, default=10)
  parser.add_argument(
    "--steps",
    type=int,
    default=30,
    help="timed steps after warm-up; rounded up to a whole number (>= 2) of refresh windows",
  )
  add_model_args(parser)
  parser.add_argument("--seed", type=int, default=0)


def add_json_arg(parser) -> None:
  parser.add_argument("--json", help="also write the results to this JSON file")


# ----------------------------------------------------------------------------
# Timing.


def refresh_windows(steps: int, precondition_frequency: int) -> tuple[int, int]:
  """(windows, timed steps): `steps` rounded up to a whole number (>= 2) of refresh windows.

  Timing whole windows after a warm-up of one window makes every timed window contain exactly
  one scheduled refresh, so the mean amortises the refreshes exactly.
  """
  windows = max(2, -(-steps // precondition_frequency))
  return windows, windows * precondition_frequency


def make_optax_step(tx: optax.GradientTransformation):
  """A jitted `(grads, state, params, count) -> (params, state)` step; state and params donated."""

  def step(grads, state, params, count):
    del count  # The optimizer keeps its own step counter.
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(1, 2))


def time_jax_steps(
  step_fn, state, params, grads_pool, warmup: int, measured: int, first_step_fn=None
):
  """Runs `warmup` untimed then `measured` timed steps of a jitted step.

  `step_fn(grads, state, params, count)` must return `(params, state)`; step `i` gets
  `grads_pool[i % len(grads_pool)]` and `count = i`. With `first_step_fn(grads, state, params)`
  (jitted too), step 0 runs that instead, untimed. Every step is timed on its own, up to
  `block_until_ready`. Returns (compile seconds, step seconds as an array, final params, final
  state); the params and state passed in are donated.
  """
  count = jnp.zeros([], jnp.int32)
  t0 = time.perf_counter()
  compiled = step_fn.lower(grads_pool[0], state, params, count).compile()
  compile_time = time.perf_counter() - t0
  start = 0
  if first_step_fn is not None:
    if warmup + measured == 0:
      return compile_time, np.asarray([]), params, state
    if warmup < 1:
      raise ValueError("first_step_fn runs untimed: it needs warmup >= 1.")
    params, state = first_step_fn(grads_pool[0], state, params)
    jax.block_until_ready((params, state))
    start = 1
  times = []
  for i in range(start, warmup + measured):
    grads = grads_pool[i % len(grads_pool)]
    t = time.perf_counter()
    params, state = compiled(grads, state, params, jnp.asarray(i, jnp.int32))
    jax.block_until_ready((params, state))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return compile_time, np.asarray(times), params, state


def timed_calls(fn, x, repeats: int) -> np.ndarray:
  """Seconds of `repeats` calls of the jitted `fn` on `x`, after one untimed (compiling) call."""
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return np.asarray(times)


def step_summary(times) -> dict[str, float]:
  """Median and mean milliseconds per step, and max/median (the max is the refresh step)."""
  times = np.asarray(times)
  median = float(np.median(times))
  return {
    "median_ms": 1e3 * median,
    "mean_ms": 1e3 * float(np.mean(times)),
    "max_over_median": float(np.max(times) / median),
  }


def relative_update_errors(start, ours, reference) -> dict[str, float]:
  """Per parameter, ‖Δours − Δreference‖ / ‖Δreference‖ of the total change from `start`.

  Parameters are compared through their change rather than their value: the change is what the
  optimizers compute, and the start (shared) would hide any difference in it.
  """
  errors = {}
  for name, p0 in start.items():
    p0 = np.asarray(p0, np.float64)
    want = np.asarray(reference[name], np.float64) - p0
    got = np.asarray(ours[name], np.float64) - p0
    errors[name] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  return errors


def relative_param_errors(ours, reference) -> dict[str, float]:
  """Per parameter, ‖ours − reference‖ / ‖reference‖ of the parameters themselves."""
  errors = {}
  for name, want in reference.items():
    want = np.asarray(want, np.float64)
    got = np.asarray(ours[name], np.float64)
    errors[name] = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
  return errors


def load_summary() -> str:
  """The 1-minute load average now, to print next to timings taken over several minutes."""
  return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "unknown"


# ----------------------------------------------------------------------------
# Reporting.


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """Formats rows as a GitHub markdown table; floats get 4 significant digits."""

  def fmt(x):
    if isinstance(x, float):
      return "nan" if x != x else f"{x:.4g}"
    return str(x)

  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def import_train_lm():
  """Imports examples/train_lm.py as a module (examples/ is not a package)."""
  if EXAMPLES_DIR not in sys.path:
    sys.path.insert(0, EXAMPLES_DIR)
  import train_lm

  return train_lm
