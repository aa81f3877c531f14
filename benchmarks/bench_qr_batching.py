r"""QR of a stack of factors by size: one batched call against a loop of single QRs.

SOAP's refresh orthonormalises every factor's power step with a QR. soap_optax groups factors of
equal size into stacks and, on GPUs (and CPU meshes), decomposes a stack one matrix at a time
with `lax.map`, because cuSOLVER's batched QR has been slow for large matrices. Small matrices
may batch well; where the crossover lies decides the refresh's spike on an accelerator. Per
size n this times `jnp.linalg.qr` of a (K, n, n) float32 stack as one batched call and as
`lax.map` over the K matrices (both jitted, only Q returned, as the refresh uses), reporting
the median and the best of `--repeats` calls after one untimed call, their ratio (looped /
batched: above 1 the batched call is faster) and the batched call's rate in GFLOP/s (Householder
QR with Q formed: 8/3 n^3 flops per matrix).

The inputs are what the power step hands to QR: a statistic times the current basis, L Q, for a
statistic L = G G^T / n of a Gaussian G (full rank) and a random orthonormal Q.

Usage:

  python benchmarks/bench_qr_batching.py                         # n = 128 ... 1536, K = 12
  python benchmarks/bench_qr_batching.py --sizes 128 256 512 --count 12 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def power_step_inputs(count: int, n: int, seed: int) -> jax.Array:
  """A (count, n, n) stack of L Q: L = G G^T / n (Gaussian G), Q orthonormal."""
  kg, kq = jax.random.split(jax.random.key(seed))
  g = jax.random.normal(kg, (count, n, n), jnp.float32)
  stats = g @ jnp.swapaxes(g, -1, -2) / n
  q, _ = jnp.linalg.qr(jax.random.normal(kq, (count, n, n), jnp.float32))
  return jax.block_until_ready(stats @ q)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024, 1536])
  parser.add_argument("--count", type=int, default=12, help="K, the matrices in each stack")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  _common.add_json_arg(parser)
  args = parser.parse_args()
  header = _common.print_header("bench_qr_batching: batched vs looped QR of a factor stack")
  device = jax.devices()[0]
  print(f"device: {device.platform} / {device.device_kind}; K = {args.count}", flush=True)

  batched = jax.jit(lambda m: jnp.linalg.qr(m)[0])
  looped = jax.jit(lambda m: lax.map(lambda a: jnp.linalg.qr(a)[0], m))
  rows, records = [], []
  for n in args.sizes:
    stack = power_step_inputs(args.count, n, args.seed)
    # The two forms must agree: Q is unique up to column signs, so compare magnitudes (the
    # "max Q difference" column).
    q_batched, q_looped = batched(stack), looped(stack)
    agree = float(jnp.max(jnp.abs(jnp.abs(q_batched) - jnp.abs(q_looped))))
    t_batched = _common.timed_calls(batched, stack, args.repeats)
    t_looped = _common.timed_calls(looped, stack, args.repeats)
    med_b, med_l = float(np.median(t_batched)), float(np.median(t_looped))
    gflops = args.count * 8 / 3 * n**3 / med_b / 1e9
    record = {
      "n": n,
      "count": args.count,
      "batched_median_ms": 1e3 * med_b,
      "batched_best_ms": 1e3 * float(t_batched.min()),
      "looped_median_ms": 1e3 * med_l,
      "looped_best_ms": 1e3 * float(t_looped.min()),
      "looped_over_batched": med_l / med_b,
      "batched_gflops": gflops,
      "max_abs_difference": agree,
    }
    records.append(record)
    rows.append(
      [
        f"{args.count} × {n}²",
        f"{record['batched_median_ms']:.2f}",
        f"{record['batched_best_ms']:.2f}",
        f"{record['looped_median_ms']:.2f}",
        f"{record['looped_best_ms']:.2f}",
        f"{record['looped_over_batched']:.2f}",
        f"{gflops:.1f}",
        f"{agree:.1e}",
      ]
    )
    print(
      f"n={n}: batched {record['batched_median_ms']:.2f} ms, looped "
      f"{record['looped_median_ms']:.2f} ms; load {_common.load_summary()}",
      flush=True,
    )
    del stack, q_batched, q_looped
  headers = [
    "stack",
    "batched median ms",
    "batched best ms",
    "looped median ms",
    "looped best ms",
    "looped / batched",
    "batched GFLOP/s",
    "max Q difference",
  ]
  print()
  print(_common.markdown_table(headers, rows))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"header": header, "device": device.device_kind, "rows": records}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
