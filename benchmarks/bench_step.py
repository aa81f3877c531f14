r"""Milliseconds per optimizer update on GPT-like parameter shapes.

Times only the jit-compiled optimizer update (`tx.update` + `optax.apply_updates`)
on random gradients for the parameters of a d_model=384, 6-layer GPT (~10.7M
parameters; see `_common.gpt_param_shapes`). Every step is timed separately
with `block_until_ready`, after a warm-up of one full refresh window, over a
whole number of refresh windows so the mean amortises the refreshes exactly.

Two baselines are measured in the same run:

* `adamw`: `optax.adamw`, the cost to beat for an elementwise optimizer.
* `floor`: a jitted function doing only the linear algebra any SOAP-style
  optimizer cannot avoid for these shapes: per matrix, the factor statistics
  G Gᵀ and Gᵀ G every step, the two rotations Q_Lᵀ G Q_R and back, and, every
  `precondition_frequency` steps, one matmul + QR per factor.

Usage:

  python benchmarks/bench_step.py
  python benchmarks/bench_step.py --optimizers soap shampoo --precondition_frequency 10 --steps 40
"""

from __future__ import annotations

import argparse
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


def random_tree(shapes, key, scale=1.0):
  """A dict of standard-normal float32 arrays with the given shapes."""
  keys = jax.random.split(key, len(shapes))
  return {
    name: scale * jax.random.normal(k, shape, jnp.float32)
    for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
  }


# ----------------------------------------------------------------------------
# The linear-algebra floor.


def floor_init(params):
  """Statistics (zeros) and orthonormal bases (identity) for both factors of each matrix."""
  state = {}
  for name, p in params.items():
    if p.ndim == 2:
      m, n = p.shape
      state[name] = (jnp.zeros((m, m)), jnp.zeros((n, n)), jnp.eye(m), jnp.eye(n))
  return state


def make_floor_step(precondition_frequency: int, beta: float = 0.95, lr: float = 1e-3):
  """Returns a jitted (grads, state, params, count) -> (params, state) doing the floor work."""

  def refresh(stats, basis):
    # One power-iteration step re-orthonormalised by QR: SOAP's cheap refresh.
    return jnp.linalg.qr(stats @ basis)[0]

  def step(grads, state, params, count):
    do_refresh = count % precondition_frequency == 0
    new_params, new_state = dict(params), {}
    for name, (left, right, q_left, q_right) in state.items():
      g = grads[name]
      left = beta * left + (1 - beta) * (g @ g.T)
      right = beta * right + (1 - beta) * (g.T @ g)
      rotated = q_left.T @ g @ q_right
      update = q_left @ rotated @ q_right.T
      q_left, q_right = jax.lax.cond(
        do_refresh,
        lambda stats, bases: tuple(map(refresh, stats, bases)),
        lambda stats, bases: bases,
        (left, right),
        (q_left, q_right),
      )
      new_params[name] = params[name] - lr * update
      new_state[name] = (left, right, q_left, q_right)
    return new_params, new_state

  return jax.jit(step, donate_argnums=(1, 2))


# ----------------------------------------------------------------------------
# Timing.


def make_optax_step(tx: optax.GradientTransformation):
  def step(grads, state, params, count):
    del count  # The optimizer keeps its own step counter.
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return jax.jit(step, donate_argnums=(1, 2))


def time_steps(step_fn, state, params, grads_pool, warmup: int, measured: int):
  """Runs `warmup` untimed then `measured` timed steps; returns (compile s, step seconds)."""
  count = jnp.zeros([], jnp.int32)
  t0 = time.perf_counter()
  compiled = step_fn.lower(grads_pool[0], state, params, count).compile()
  compile_time = time.perf_counter() - t0
  times = []
  for i in range(warmup + measured):
    grads = grads_pool[i % len(grads_pool)]
    t = time.perf_counter()
    params, state = compiled(grads, state, params, jnp.asarray(i, jnp.int32))
    jax.block_until_ready((params, state))
    if i >= warmup:
      times.append(time.perf_counter() - t)
  return compile_time, np.asarray(times)


def summarize(name, compile_time, times):
  median = float(np.median(times))
  return {
    "optimizer": name,
    "median_ms": 1e3 * median,
    "mean_ms": 1e3 * float(np.mean(times)),
    "max_over_median": float(np.max(times) / median),
    "compile_s": compile_time,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=list(_common.SOAP_OPTIMIZERS),
    help="soap_optax optimizers (or optax 'adamw'/'adafactor'); 'name:key=value,...' passes "
    "options, e.g. soap:max_precond_dim=1024.",
  )
  parser.add_argument("--precondition_frequency", type=int, default=10)
  parser.add_argument(
    "--steps",
    type=int,
    default=30,
    help="timed steps after warm-up; rounded up to a whole number (>= 2) of refresh windows",
  )
  parser.add_argument("--d_model", type=int, default=384)
  parser.add_argument("--num_layers", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="also write the results to this JSON file")
  args = parser.parse_args()

  header = _common.print_header("bench_step: ms per optimizer update")
  pf = args.precondition_frequency
  windows = max(2, -(-args.steps // pf))
  measured = windows * pf
  shapes = _common.gpt_param_shapes(args.d_model, args.num_layers)
  print(
    f"{len(shapes)} parameters, {_common.num_params(shapes) / 1e6:.2f}M scalars; "
    f"precondition_frequency={pf}; warm-up {pf} steps, then {measured} timed steps "
    f"({windows} refresh windows)\n",
    flush=True,
  )
  key = jax.random.PRNGKey(args.seed)
  params0 = random_tree(shapes, key, scale=0.02)
  grads_pool = [random_tree(shapes, k) for k in jax.random.split(jax.random.fold_in(key, 1), 3)]

  def fresh_params():
    # Steps donate params and state, so every optimizer starts from its own copy.
    return jax.tree.map(jnp.copy, params0)

  results = []
  # The two baselines run first so a failure further down still leaves them printed.
  names = ["adamw", "floor"] + [s for s in _common.available(args.optimizers) if s != "adamw"]
  for name in names:
    params = fresh_params()
    if name == "floor":
      step_fn, state = make_floor_step(pf), floor_init(params)
    else:
      soap_family = _common.parse_spec(name)[0] in _common.SOAP_OPTIMIZERS
      options = {"precondition_frequency": pf} if soap_family else {}
      tx = _common.build_optimizer(name, learning_rate=1e-3, **options)
      step_fn, state = make_optax_step(tx), jax.tree.map(jnp.copy, tx.init(params))
    compile_time, times = time_steps(step_fn, state, params, grads_pool, pf, measured)
    results.append(summarize(name, compile_time, times))
    r = results[-1]
    print(
      f"{name:>24}: median {r['median_ms']:9.2f} ms  mean {r['mean_ms']:9.2f} ms  "
      f"max/median {r['max_over_median']:6.2f}  (compile {compile_time:.1f}s)",
      flush=True,
    )

  base = {r["optimizer"]: r["mean_ms"] for r in results}
  rows = [
    [
      r["optimizer"],
      r["median_ms"],
      r["mean_ms"],
      r["max_over_median"],
      r["mean_ms"] / base["adamw"],
      r["mean_ms"] / base["floor"],
    ]
    for r in results
  ]
  print()
  print(
    _common.markdown_table(
      ["optimizer", "median ms", "mean ms", "max/median", "mean / adamw", "mean / floor"], rows
    )
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"header": header, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
