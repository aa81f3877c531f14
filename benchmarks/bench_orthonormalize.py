r"""The refresh's orthonormalisation: Householder QR against Cholesky-QR2 and shifted Cholesky-QR3.

SOAP's refresh orthonormalises every factor's power step L Q. `eigenbasis_refresh(...,
orthonormalization=...)` does it by Householder QR (`"qr"`, the default) or by Cholesky-QR
(`"cholesky_qr2"`, `"shifted_cholesky_qr3"`): products, a Cholesky and a triangular solve per
pass, with a per-matrix test and a Householder fallback (`soap_optax._linalg.cholesky_qr2`).
Per size n this times each on a (K, n, n) float32 stack (jitted, the best and the median of
`--repeats` calls after one untimed call) on two inputs:

* `fresh`: L Q for a statistic L with eigenvalues spread over `--spread` and Q its eigenbasis
  slightly perturbed, the common refresh; the Cholesky forms should not fall back here;
* `rank-deficient`: L of rank n/4 (a thin gradient's Gram matrix), where every Cholesky pass
  fails and each matrix pays for the passes *and* a Householder QR: the worst case.

Ratios are against QR in the same run. `--strategies N` also times three ways of placing the
fallback on a (`--strategy_count`, N, N) stack with 0, 1 and all matrices failing (best of
`--repeats`): `batched` (the stack's passes batched, then `lax.map` with a branch per matrix
that runs QR only where needed), `where` (batched passes and a batched QR always computed,
`jnp.where` between them), `per-matrix` (passes and branch per matrix inside `lax.map`), and
`library`, what `cholesky_qr2` does on this platform (per-matrix on CPU, batched elsewhere).

Usage:

  python benchmarks/bench_orthonormalize.py                       # n = 128 ... 1024, K = 8
  python benchmarks/bench_orthonormalize.py --sizes 128 256 --strategies 384 --strategy_count 12
  python benchmarks/bench_orthonormalize.py --sizes 256 512 1024 1536 --count 12 --inputs fresh
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from soap_optax import _linalg  # noqa: E402


def power_step(count: int, n: int, seed: int, spread: float, rank: int | None = None):
  """A (count, n, n) float32 stack of L Q: L with the given spectrum, Q near its eigenbasis.

  Built on the device (float32, the refresh's own QR), so that large stacks cost seconds."""
  ku, kq = jax.random.split(jax.random.key(seed))
  u = _linalg.orthonormalize(jax.random.normal(ku, (count, n, n), jnp.float32))
  eigenvalues = jnp.logspace(0, -np.log10(spread), n, dtype=jnp.float32)
  if rank is not None:
    eigenvalues = eigenvalues.at[rank:].set(0)
  stat = jnp.matmul(u * eigenvalues, jnp.swapaxes(u, -1, -2), precision=_linalg.HIGHEST)
  drift = 1e-3 * jax.random.normal(kq, (count, n, n), jnp.float32)
  basis = _linalg.orthonormalize(u + drift)
  return jax.block_until_ready(jnp.matmul(stat, basis, precision=_linalg.HIGHEST))


def _fallbacks(result: _linalg.CholeskyQR):
  return result.basis, jnp.sum(result.fallback.astype(jnp.int32))


def orthonormality(q) -> float:
  q = np.asarray(q, np.float64)
  eye = np.eye(q.shape[-1])
  return float(np.max(np.linalg.norm(np.swapaxes(q, -1, -2) @ q - eye, axis=(-2, -1))))


def strategies(count: int, n: int, seed: int, repeats: int) -> list[list[str]]:
  """Times three placements of the fallback with 0, 1 and all matrices failing."""

  def library(m):  # per matrix on CPU, batched passes + per-matrix fallback elsewhere
    return _linalg.cholesky_qr2(m).basis

  def batched(m):
    return _linalg._cholesky_qr_batched(m, False)[0]

  def where_all(m):
    q, ok = _linalg._cholesky_qr_passes(m, False)
    return jnp.where(ok[:, None, None], q, _linalg._qr_positive_diagonal(m))

  def per_matrix(m):
    return _linalg._cholesky_qr_looped(m, False)[0]

  good = power_step(count, n, seed, 1e2)
  bad = power_step(count, n, seed + 1, 1e2, rank=n // 4)
  rows = []
  for failing in (0, 1, count):
    stack = jnp.concatenate([bad[:failing], good[failing:]])
    times = {}
    named = (("library", library), ("batched", batched), ("where", where_all))
    for name, fn in (*named, ("per_matrix", per_matrix)):
      times[name] = float(_common.timed_calls(jax.jit(fn), stack, repeats).min())
    rows.append(
      [
        f"{count} × {n}², {failing} failing",
        *(f"{1e3 * t:.1f}" for t in times.values()),
        f"{times['where'] / times['batched']:.2f}",
        f"{times['per_matrix'] / times['batched']:.2f}",
      ]
    )
    print(f"strategies, {failing} failing: {times}; load {_common.load_summary()}", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512, 1024])
  parser.add_argument("--count", type=int, default=8, help="K, the matrices in each stack")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--spread", type=float, default=1e4, help="eigenvalue spread of `fresh`")
  parser.add_argument(
    "--inputs", nargs="+", choices=["fresh", "rank-deficient"], default=["fresh", "rank-deficient"]
  )
  parser.add_argument("--strategies", type=int, default=0, help="n of the fallback timings")
  parser.add_argument("--strategy_count", type=int, default=12, help="K of the fallback timings")
  parser.add_argument("--seed", type=int, default=0)
  _common.add_json_arg(parser)
  args = parser.parse_args()
  header = _common.print_header("bench_orthonormalize: QR vs Cholesky-QR for the refresh")
  device = jax.devices()[0]
  print(f"device: {device.platform} / {device.device_kind}; K = {args.count}", flush=True)

  # Each returns Q and how many matrices fell back, from one compiled program.
  fns = {
    "qr": jax.jit(lambda m: (_linalg.orthonormalize(m), jnp.zeros((), jnp.int32))),
    "cholesky_qr2": jax.jit(lambda m: _fallbacks(_linalg.cholesky_qr2(m))),
    "shifted_cholesky_qr3": jax.jit(lambda m: _fallbacks(_linalg.cholesky_qr2(m, shift=True))),
  }
  rows, records = [], []
  for n in args.sizes:
    for kind in args.inputs:
      rank = n // 4 if kind == "rank-deficient" else None
      stack = power_step(args.count, n, args.seed, args.spread, rank)
      best = {}
      for name, fn in fns.items():
        t = _common.timed_calls(fn, stack, args.repeats)
        q, fell = fn(stack)
        fell = int(fell)
        best[name] = float(t.min())
        record = {
          "n": n,
          "count": args.count,
          "input": kind,
          "method": name,
          "best_ms": 1e3 * best[name],
          "median_ms": 1e3 * float(np.median(t)),
          "ratio_to_qr": best[name] / best["qr"],
          "fallbacks": fell,
          "orthonormality": orthonormality(q),
        }
        records.append(record)
        rows.append(
          [
            f"{args.count} × {n}²",
            kind,
            name,
            f"{record['best_ms']:.2f}",
            f"{record['median_ms']:.2f}",
            f"{record['ratio_to_qr']:.2f}",
            f"{fell}/{args.count}",
            f"{record['orthonormality']:.1e}",
          ]
        )
        print(
          f"n={n} {kind} {name}: best {record['best_ms']:.2f} ms, "
          f"{record['ratio_to_qr']:.2f}x QR, {fell} fallbacks; load {_common.load_summary()}",
          flush=True,
        )
      del stack, q
  headers = [
    "stack",
    "input",
    "method",
    "best ms",
    "median ms",
    "best / QR's",
    "fell back",
    "max ‖QᵀQ − I‖_F",
  ]
  print()
  print(_common.markdown_table(headers, rows))
  strategy_rows = []
  if args.strategies:
    strategy_rows = strategies(args.strategy_count, args.strategies, args.seed, args.repeats)
    print()
    print(
      _common.markdown_table(
        [
          "stack",
          "library ms",
          "batched ms",
          "where ms",
          "per-matrix ms",
          "where / batched",
          "per-matrix / batched",
        ],
        strategy_rows,
      )
    )
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      payload = {"header": header, "device": device.device_kind, "rows": records}
      json.dump({**payload, "strategies": strategy_rows}, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
