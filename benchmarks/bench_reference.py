r"""Step time of `soap_optax.soap` against the authors' PyTorch SOAP, same shapes and gradients.

The reference is `soap.py` from github.com/nikhilvyas/SOAP. It is not part of this repository;
download it (tested with commit a1e553530fde97d0e6b307d7c82ac6d38b072340, file sha256
9e9021335ad02371584622fa256e73fe75f3eb74446a8d8a216e956534148f6b):

  curl -fL -o /tmp/soap_reference.py \
    https://raw.githubusercontent.com/nikhilvyas/SOAP/a1e553530fde97d0e6b307d7c82ac6d38b072340/soap.py

and install PyTorch next to this library, preferably in an environment of its own so that the
library's test environment stays free of torch (the CPU build avoids a multi-GB CUDA download):

  python -m venv /tmp/torchenv && . /tmp/torchenv/bin/activate
  pip install torch --index-url https://download.pytorch.org/whl/cpu
  pip install numpy -e .

What it does, in one process (torch and jax coexist; checked with torch 2.13.0+cpu and jax 0.10.2):

1. Timing, on the GPT-like shapes of `bench_step.py` (`_common.gpt_param_shapes`, d_model 384,
   6 layers by default), with the same gradients (a pool of 3 gradient sets drawn once with
   NumPy from `--seed`, fed as the very same arrays to both frameworks) and the same
   hyperparameters (the reference's defaults: lr 3e-3, betas (0.95, 0.95), eps 1e-8,
   weight_decay 0.01, shampoo beta = b2, precondition_frequency 10) for torch's `AdamW`, the
   reference `SOAP`, `optax.adamw` and `soap_optax.soap`, one after the other: torch first,
   before jax has run anything, then jax, so that neither framework's worker threads are still
   busy from the other's work. Each runs a warm-up of one refresh window (its first,
   initialising call included) and then a whole number of refresh windows, every step timed on
   its own (`optimizer.step()`; the jitted update up to `block_until_ready`), so the mean
   amortises the refreshes exactly. Reported: median and mean ms per step, max/median, and the
   ratios reference / soap_optax and torch AdamW / optax AdamW.
2. Numerical check, after the timing. Both SOAPs start from the same parameters and see the
   same float32 gradients for `precondition_frequency + 2` calls (the initialising call, one QR
   refresh and the step after it); the script prints the relative difference of the parameters
   and of their total change, after 3 calls and at the end, and does the same for the two
   AdamWs. The check uses a (32, 32) kernel, a bias and a LayerNorm scale of 32: wider square
   first statistics are ill-conditioned (see `CHECK_WIDTH`), and a rectangular matrix's are rank
   deficient and each eigensolver picks its own basis of their null space, after which the two
   updates legitimately differ (by about 60% of the update on a (32, 96) matrix after 3 calls,
   against 2e-5 on a (32, 32) one). Agreement to float32 rounding (about 1e-5) means the timing
   compares the same algorithm; above 1e-3 the script prints a loud warning.

Threads: `OPENBLAS_NUM_THREADS=1` (jax's CPU QR and eigh run through OpenBLAS; see
`_common.py`) and torch's intra-op threads set to the core count (`--torch_threads`); both are
printed. Run on an idle machine: on the 2-core development machine with a load average of 3 from
other processes, torch's OpenMP threads waited on descheduled peers and a torch AdamW step took
10-80x its idle time (with 1 thread: 1-5x), far more than jax's steps slowed. On a GPU, pass
`--torch_device cuda` (jax then runs on its default backend, the GPU; set
`XLA_PYTHON_CLIENT_PREALLOCATE=false` so that both frameworks fit); torch's steps are timed up
to `torch.cuda.synchronize()`. The script warns when the two run on different kinds of device.

Usage:

  python benchmarks/bench_reference.py --reference /tmp/soap_reference.py
  python benchmarks/bench_reference.py --reference /tmp/soap_reference.py --steps 40 \
      --json runs/bench_reference.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets OPENBLAS_NUM_THREADS before any linear algebra runs)

TESTED_COMMIT = "a1e553530fde97d0e6b307d7c82ac6d38b072340"
TESTED_SHA256 = "9e9021335ad02371584622fa256e73fe75f3eb74446a8d8a216e956534148f6b"
# The reference's defaults, passed explicitly to all four optimizers.
HPARAMS = dict(lr=3e-3, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.01)


def load_reference(path: str):
  """Imports the reference `soap.py` from `path`; returns (module, sha256 of the file)."""
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  spec = importlib.util.spec_from_file_location("soap_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, digest


# ----------------------------------------------------------------------------
# The four optimizers behind one interface: `.run(grads_pool, warmup, measured)` -> step
# seconds, `.final_params()` -> NumPy arrays.


class TorchRunner:
  """A torch optimizer over NumPy parameters, stepped with NumPy gradients."""

  def __init__(self, torch, make_optimizer, params: dict[str, np.ndarray], device: str = "cpu"):
    self.torch = torch
    self.device = device
    self.names = sorted(params)
    self.params = [torch.nn.Parameter(torch.tensor(params[k], device=device)) for k in self.names]
    self.optimizer = make_optimizer(self.params)

  def _sync(self):
    # CUDA steps return before the GPU has finished; time the work, not its launch.
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def run(self, grads_pool, warmup: int, measured: int) -> np.ndarray:
    """Step `warmup + measured` times; returns the seconds of the measured steps."""
    # torch.from_numpy shares memory: every framework reads the very same gradient arrays (on
    # a GPU, copies of them made once, before any step is timed).
    pool = [[self.torch.from_numpy(g[k]).to(self.device) for k in self.names] for g in grads_pool]
    self._sync()
    times = []
    for i in range(warmup + measured):
      for p, g in zip(self.params, pool[i % len(pool)], strict=True):
        p.grad = g
      t = time.perf_counter()
      self.optimizer.step()
      self._sync()
      if i >= warmup:
        times.append(time.perf_counter() - t)
    return np.asarray(times)

  def final_params(self) -> dict[str, np.ndarray]:
    return {
      k: p.detach().cpu().numpy().copy() for k, p in zip(self.names, self.params, strict=True)
    }


class JaxRunner:
  """An optax optimizer over NumPy parameters, stepped with NumPy gradients."""

  def __init__(self, tx: optax.GradientTransformation, params: dict[str, np.ndarray]):
    self.params = {k: jnp.asarray(v) for k, v in params.items()}
    # Copies: the step donates params and state, and an init may alias buffers.
    self.state = jax.tree.map(jnp.copy, tx.init(self.params))
    self.step = _common.make_optax_step(tx)
    self.compile_s = None

  def run(self, grads_pool, warmup: int, measured: int) -> np.ndarray:
    pool = [{k: jnp.asarray(v) for k, v in g.items()} for g in grads_pool]
    self.compile_s, times, self.params, self.state = _common.time_jax_steps(
      self.step, self.state, self.params, pool, warmup, measured
    )
    return times

  def final_params(self) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in self.params.items()}


def make_runners(torch, reference, pf: int, device: str = "cpu"):
  """name -> (framework, constructor from NumPy params), all with HPARAMS; torch on `device`."""
  h = HPARAMS
  betas = (h["b1"], h["b2"])
  return {
    "torch AdamW": (
      "torch",
      lambda p: TorchRunner(
        torch,
        lambda ps: torch.optim.AdamW(
          ps, lr=h["lr"], betas=betas, eps=h["eps"], weight_decay=h["weight_decay"]
        ),
        p,
        device,
      ),
    ),
    "optax adamw": (
      "jax",
      lambda p: JaxRunner(
        optax.adamw(h["lr"], h["b1"], h["b2"], h["eps"], weight_decay=h["weight_decay"]), p
      ),
    ),
    "reference SOAP": (
      "torch",
      lambda p: TorchRunner(
        torch,
        lambda ps: reference.SOAP(
          ps,
          lr=h["lr"],
          betas=betas,
          eps=h["eps"],
          weight_decay=h["weight_decay"],
          precondition_frequency=pf,
        ),
        p,
        device,
      ),
    ),
    "soap_optax soap": (
      "jax",
      lambda p: JaxRunner(
        _common.soap_optax_fn("soap")(
          learning_rate=h["lr"],
          b1=h["b1"],
          b2=h["b2"],
          eps=h["eps"],
          weight_decay=h["weight_decay"],
          precondition_frequency=pf,
        ),
        p,
      ),
    ),
  }


def numpy_tree(shapes, rng, scale=1.0):
  return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}


# ----------------------------------------------------------------------------
# Numerical check.


# The numerical check's width. The first statistic is the Gram matrix of one square random
# gradient (a Wishart matrix with ratio 1), whose smallest eigenvalues shrink like 1/d² of its
# largest: the two eigh implementations then pick bases that differ in those directions, and
# Adam's per-coordinate step there amplifies the difference. Measured (reference vs soap_optax,
# total change after 3 calls, CPU): 2.9e-5 at d = 32, 1.5e-4 at 128, 1.0e-2 at 384, the same
# for soap_optax before and after its restructuring; so the check stays at 32.
CHECK_WIDTH = 32


def check_same_updates(runners, d_model: int, pf: int, seed: int) -> dict:
  """Runs each pair on the same params and gradients; returns the relative differences."""
  d = min(d_model, CHECK_WIDTH)
  shapes = {"attn_out/kernel": (d, d), "attn_out/bias": (d,), "ln1/scale": (d,)}
  rng = np.random.default_rng(seed + 1000)
  params0 = numpy_tree(shapes, rng, scale=0.02)
  grads = [numpy_tree(shapes, rng) for _ in range(pf + 2)]
  checkpoints = sorted({min(3, len(grads)), len(grads)})
  results = {}
  for torch_name, jax_name in (
    ("reference SOAP", "soap_optax soap"),
    ("torch AdamW", "optax adamw"),
  ):
    finals = {}
    for name in (torch_name, jax_name):
      runner = runners[name][1](params0)
      done = 0
      for calls in checkpoints:
        # Each checkpoint continues the same run with the next gradients.
        runner.run(grads[done:calls], 0, calls - done)
        done = calls
        finals.setdefault(name, {})[calls] = runner.final_params()
    pair = {}
    for calls in checkpoints:
      ours, ref = finals[jax_name][calls], finals[torch_name][calls]
      pair[calls] = {
        "params": max(_common.relative_param_errors(ours, ref).values()),
        "update": max(_common.relative_update_errors(params0, ours, ref).values()),
      }
    results[f"{jax_name} vs {torch_name}"] = pair
  return results


# ----------------------------------------------------------------------------
# Main.


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--reference", required=True, help="path to the reference soap.py (see the docstring)"
  )
  _common.add_timing_args(parser)
  parser.add_argument(
    "--warmup", type=int, help="untimed steps first (default: one refresh window)"
  )
  parser.add_argument(
    "--torch_threads", type=int, default=os.cpu_count(), help="torch intra-op threads"
  )
  parser.add_argument(
    "--torch_device",
    default="cpu",
    help="where torch runs: 'cpu' or 'cuda'; it should be where jax runs (its default backend)",
  )
  _common.add_json_arg(parser)
  args = parser.parse_args()

  header = _common.print_header("bench_reference: soap_optax vs the authors' PyTorch SOAP")
  import torch

  torch.set_num_threads(args.torch_threads)
  reference, digest = load_reference(args.reference)
  threads = {
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_interop_threads": torch.get_num_interop_threads(),
    "torch_mkl": torch.backends.mkl.is_available(),
    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
    "reference": os.path.abspath(args.reference),
    "reference_sha256": digest,
    "torch_device": args.torch_device,
    "jax_backend": jax.default_backend(),
  }
  for key, value in threads.items():
    print(f"{key:>21}: {value}")
  if digest == TESTED_SHA256:
    print(f"reference file: identical to soap.py at the tested commit {TESTED_COMMIT[:7]}")
  else:
    print(
      f"reference file: NOT the tested soap.py of commit {TESTED_COMMIT[:7]}; the numerical "
      "check below says whether it still computes the same update"
    )
  torch_on_gpu = args.torch_device != "cpu"
  if (jax.default_backend() == "gpu") != torch_on_gpu:
    print(
      f"\n!!! WARNING: jax runs on {jax.default_backend()} and torch on {args.torch_device}: the "
      "timings below compare devices, not implementations. !!!"
    )
  if _common.soap_optax_fn("soap") is None:
    raise SystemExit("soap_optax.soap is not available.")

  pf = args.precondition_frequency
  warmup = pf if args.warmup is None else args.warmup
  windows, measured = _common.refresh_windows(args.steps, pf)
  runners = make_runners(torch, reference, pf, args.torch_device)

  shapes = _common.gpt_param_shapes(args.d_model, args.num_layers)
  rng = np.random.default_rng(args.seed)
  params0 = numpy_tree(shapes, rng, scale=0.02)
  grads_pool = [numpy_tree(shapes, rng) for _ in range(3)]
  print(
    f"\ntiming: {len(shapes)} parameters, {_common.num_params(shapes) / 1e6:.2f}M scalars; "
    f"precondition_frequency={pf}; warm-up {warmup} steps, then {measured} timed steps "
    f"({windows} refresh windows); lr {HPARAMS['lr']:g}, betas ({HPARAMS['b1']:g}, "
    f"{HPARAMS['b2']:g}), eps {HPARAMS['eps']:g}, weight_decay {HPARAMS['weight_decay']:g}",
    flush=True,
  )
  if hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
    print(
      f"\n!!! WARNING: 1-minute load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores: "
      "other processes compete for the cores, and torch's OpenMP threads slow down far more "
      "than jax's under contention (see the docstring). Rerun on an idle machine. !!!\n"
    )
  if warmup % pf:
    print("note: --warmup is not a multiple of precondition_frequency; windows are misaligned")
  load_before, started = _common.load_summary(), time.strftime("%H:%M:%S")
  results = {}
  # Torch first, before jax has run anything, then jax: neither framework's threads are still
  # busy from the other's last computation when its own steps are timed.
  order = sorted(runners, key=lambda name: runners[name][0] != "torch")
  for name in order:
    framework, make = runners[name]
    runner = make(params0)
    times = runner.run(grads_pool, warmup, measured)
    r = {"optimizer": name, "framework": framework, **_common.step_summary(times)}
    if framework == "jax":
      r["compile_s"] = runner.compile_s
    results[name] = r
    compile_note = f"  (compile {r['compile_s']:.1f}s)" if "compile_s" in r else ""
    print(
      f"{name:>18}: median {r['median_ms']:9.2f} ms  mean {r['mean_ms']:9.2f} ms  "
      f"max/median {r['max_over_median']:6.2f}{compile_note}",
      flush=True,
    )
    del runner
  finished = time.strftime("%H:%M:%S")
  load_after = _common.load_summary()

  print(
    f"\nnumerical check: same float32 params and gradients, {pf + 2} calls "
    "(the first initialises, a QR refresh at update "
    f"{pf}); shapes ({args.d_model}, {args.d_model}), ({args.d_model},) x 2",
    flush=True,
  )
  check = check_same_updates(runners, args.d_model, pf, args.seed)
  worst = 0.0
  for pair, by_calls in check.items():
    for calls, err in by_calls.items():
      print(
        f"  {pair:>38}, after {calls:3d} calls: max relative difference of params "
        f"{err['params']:.2e}, of their total change {err['update']:.2e}"
      )
      worst = max(worst, err["update"])
  if not worst < 1e-3:
    print(
      "\n!!! WARNING: the two sides do NOT compute the same update; the timings above compare "
      "different algorithms. !!!"
    )

  def ratio(a, b, key):
    return results[a][key] / results[b][key]

  ratios = {
    "reference SOAP / soap_optax soap": ("reference SOAP", "soap_optax soap"),
    "torch AdamW / optax adamw": ("torch AdamW", "optax adamw"),
    "reference SOAP / torch AdamW": ("reference SOAP", "torch AdamW"),
    "soap_optax soap / optax adamw": ("soap_optax soap", "optax adamw"),
  }
  ratio_values = {
    label: {"mean": ratio(a, b, "mean_ms"), "median": ratio(a, b, "median_ms")}
    for label, (a, b) in ratios.items()
  }
  print(
    f"\nAll rows measured in this process between {started} and {finished} "
    f"(1-minute load average {load_before} before, {load_after} after), torch first, before "
    "jax had run anything, then jax; the numerical check ran after the timing.\n"
  )
  print(
    _common.markdown_table(
      ["optimizer", "framework", "median ms", "mean ms", "max/median"],
      [
        [r["optimizer"], r["framework"], r["median_ms"], r["mean_ms"], r["max_over_median"]]
        for r in results.values()
      ],
    )
  )
  print()
  print(
    _common.markdown_table(
      ["ratio", "of means", "of medians"],
      [[label, v["mean"], v["median"]] for label, v in ratio_values.items()],
    )
  )
  speedup = ratio_values["reference SOAP / soap_optax soap"]
  print(
    f"\nreference SOAP / soap_optax soap, step time: {speedup['mean']:.2f} of means, "
    f"{speedup['median']:.2f} of medians (above 1: soap_optax is faster)."
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "header": {**header, **threads},
          "args": vars(args),
          "hparams": HPARAMS,
          "check_max_update_difference": worst,
          "check": {
            pair: {str(k): v for k, v in by_calls.items()} for pair, by_calls in check.items()
          },
          "results": list(results.values()),
          "ratios": ratio_values,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  main()
