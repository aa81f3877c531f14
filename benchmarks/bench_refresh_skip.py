r"""What a scheduled refresh costs when the adaptive test skips it, per factor.

`eigenbasis_refresh(refresh_tolerance=τ)` tests each factor at a scheduled step and refreshes it
only when its basis is stale; the refresh is a runtime branch per factor. This benchmark times
the `eigenbasis_refresh` update alone (statistics included, as in a real chain) on the GPT-like
shapes of `bench_step.py`, at a scheduled step, for:

* `no_refresh`: a step that is not scheduled (the baseline: what every other step costs);
* `skip_all`: τ = 1, every factor passes the test and skips (pays only its test, B = QᵀLQ);
* `refresh_all`: τ = 0, every factor runs the sorted power step + QR (SOAP's refresh);
* `refresh_all_qr3`: τ = 1e-9 with up to 3 QR iterations: every factor runs all of them.

Usage:

  python benchmarks/bench_refresh_skip.py
  python benchmarks/bench_refresh_skip.py --repeats 5 --d_model 384 --num_layers 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import soap_optax  # noqa: E402

FREQUENCY = 10


def time_scheduled_update(tolerance, iterations, grads, later_grads, count, repeats):
  """Median seconds of one `kronecker_stats` + `eigenbasis_refresh` update at `count`.

  The bases come from `grads`; the timed step sees independent `later_grads`, so that every
  basis is stale there (with the same gradient again the first basis would stay exact).
  """
  layout = soap_optax.LayoutRule()
  tx = optax.chain(
    soap_optax.kronecker_stats(0.95, layout=layout),
    soap_optax.eigenbasis_refresh(
      FREQUENCY, layout=layout, refresh_tolerance=tolerance, max_qr_iterations=iterations
    ),
  )
  state = tx.init(grads)
  step = jax.jit(tx.update)
  _, state = step(grads, state)  # the first call: eigh for every factor, and compilation
  stats_state, basis_state = state
  # Jump the clock to the requested count without running the steps in between.
  state = (stats_state._replace(count=jnp.asarray(count, jnp.int32)), basis_state)
  jax.block_until_ready(step(later_grads, state))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(later_grads, state))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  _common.add_model_args(parser)
  args = parser.parse_args()
  _common.print_header("eigenbasis_refresh: cost of skipped vs performed refreshes")
  shapes = _common.gpt_param_shapes(d_model=args.d_model, num_layers=args.num_layers)

  def random_grads(seed):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return {
      name: jax.random.normal(key, shape, jnp.float32)
      for key, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
    }

  grads, later_grads = random_grads(0), random_grads(1)
  cases = {
    "no_refresh": (0.0, 1, FREQUENCY + 1),
    "skip_all": (1.0, 1, FREQUENCY),
    "refresh_all": (0.0, 1, FREQUENCY),
    "refresh_all_qr3": (1e-9, 3, FREQUENCY),
  }
  results = {
    name: time_scheduled_update(tol, it, grads, later_grads, count, args.repeats)
    for name, (tol, it, count) in cases.items()
  }
  base = results["no_refresh"]
  rows = [[name, f"{t * 1e3:.1f}", f"{t / base:.2f}"] for name, t in results.items()]
  print(_common.markdown_table(["case", "median ms", "/ no_refresh"], rows))


if __name__ == "__main__":
  main()
