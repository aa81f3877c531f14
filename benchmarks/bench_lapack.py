r"""Batched against one-matrix-at-a-time QR and ``eigh`` on stacks of factors.

soap_optax decomposes stacks of equal-size factors. On the CPU (and on GPUs for QR) it hands them
to the solver one matrix at a time (``lax.map``) instead of in one batched call: jaxlib 0.10's
batched CPU kernels can deadlock when simulated devices share XLA's thread pool, and cuBLAS'
batched QR is slow for large matrices (``docs/scaling.md``). This measures what the choice costs
on the default backend: per stack shape, the best of ``--repeats`` jitted calls of each form, and
their ratio (looped / batched; below 1 the loop is faster).

Usage:

  python benchmarks/bench_lapack.py
  python benchmarks/bench_lapack.py --shapes 64x128 16x512 4x1024 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def best_seconds(fn, x, repeats: int) -> float:
  jax.block_until_ready(fn(x))  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", nargs="+", default=["64x128", "16x512", "4x1024"])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  _common.print_header("bench_lapack: batched vs looped decompositions of a factor stack")

  solvers = {"qr": lambda m: jnp.linalg.qr(m)[0], "eigh": lambda m: jnp.linalg.eigh(m)[1]}
  rows = []
  for spec in args.shapes:
    count, n = (int(v) for v in spec.split("x"))
    g = jax.random.normal(jax.random.key(0), (count, n, n))
    stack = g @ jnp.swapaxes(g, -1, -2) / n  # symmetric positive definite, like a statistic
    for name, solve in solvers.items():
      batched = best_seconds(jax.jit(solve), stack, args.repeats)
      looped = best_seconds(jax.jit(lambda m, f=solve: lax.map(f, m)), stack, args.repeats)
      rows.append(
        [
          name,
          f"{count} × {n}²",
          f"{batched * 1e3:.1f}",
          f"{looped * 1e3:.1f}",
          f"{looped / batched:.2f}",
        ]
      )
  headers = ["solver", "stack", "batched ms", "looped ms", "looped / batched"]
  print(_common.markdown_table(headers, rows))


if __name__ == "__main__":
  main()
