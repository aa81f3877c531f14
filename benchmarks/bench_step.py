r"""Milliseconds per optimizer update on GPT-like parameter shapes.

Times only the jit-compiled optimizer update (`tx.update` + `optax.apply_updates`)
on random gradients for the parameters of a d_model=384, 6-layer GPT (~10.7M
parameters; see `_common.gpt_param_shapes`). Every step is timed separately
with `block_until_ready`, after a warm-up of one full refresh window, over a
whole number of refresh windows so the mean amortises the refreshes exactly.
Every row of the table, baselines included, is measured in the same process,
one after the other; the header names the commit and the load average is
printed before and after.

Two baselines are measured in the same run:

* `adamw`: `optax.adamw`, the cost to beat for an elementwise optimizer.
* `floor`: SOAP's arithmetic and nothing else, written out directly in jax
  (one jitted program per step) with the same hyperparameters as the `soap` row (lr 1e-3, b1 = b2 =
  shampoo beta = 0.95, eps 1e-8, weight decay 0.01). It is the arithmetic that
  SOAP's algorithm cannot avoid, at the library's matmul precision: a lower bound
  of the *work*, not of the time XLA takes for it. XLA schedules and fuses the two
  programs differently, so on a noisy 2-core machine the `soap` row has measured
  0.89-1.01x the floor's median: read rows within about 10% of 1.00x as "at the
  floor", and a row well below it as a measurement problem. Before timing, the script checks on
  small full-rank shapes that the floor and `soap_optax.soap` return the same
  parameters (the relative difference is printed). Per step, for every matrix
  G (m x n) with statistics L, R, bases Q_L, Q_R and moments M, V (all float32):

    - L <- b L + (1-b) G G^T,  R <- b R + (1-b) G^T G          (2 matmuls)
    - G' = Q_L^T G Q_R                                           (2 matmuls)
    - M <- b1 M + (1-b1) G',  V <- b2 V + (1-b2) G'^2,  D = M / (sqrt(V) + eps)
    - U = Q_L D Q_R^T                                            (2 matmuls)
    - P <- (1 - lr wd) (P - lr c_t U),  c_t = sqrt(1 - b2^t) / (1 - b1^t)

  and every `precondition_frequency` steps (one `lax.cond` for all matrices), per
  factor: LQ = L Q, eigenvalue estimates diag(Q^T L Q) as a row-wise dot of Q and
  LQ, a descending argsort, Q <- qr(LQ[:, order]); then M is moved into the new
  bases (M <- Q_L'^T Q_L M Q_R^T Q_R', by whichever of "rotate out, rotate in"
  (4 matmuls) and "form Q_L'^T Q_L and Q_R^T Q_R', apply them" (2 basis products
  + 2 matmuls) needs fewer flops for the shape) and V is permuted by the orders.
  Vectors (biases, LayerNorm) get Adam with the same conventions, unrotated.
  The statistic and rotation matmuls use `jax.lax.Precision.HIGHEST` and the
  refresh runs under `jax.default_matmul_precision("float32")`, as in the
  library. The first call (count 0) only sets L, R and the bases (`eigh`,
  descending), as SOAP's does; it is a separate program, run once in the untimed
  warm-up, so the timed step has no branch for it.
  What the floor leaves out is the library's bookkeeping: the non-finite-step
  guard, per-factor refresh branches and counters, and the layout machinery.
  The floor is SOAP's: Shampoo (no per-step rotations, `eigh` refreshes),
  eigen-Adafactor and EShampoo do different work, so their `/ floor` column
  compares them with SOAP's minimal cost, not with their own.

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
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

HIGHEST = lax.Precision.HIGHEST
# The hyperparameters of the `soap` row and of the floor: soap's defaults, bench_step's lr.
LEARNING_RATE = 1e-3
SOAP_HPARAMS = dict(b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.01)


def random_tree(shapes, key, scale=1.0):
  """A dict of standard-normal float32 arrays with the given shapes."""
  keys = jax.random.split(key, len(shapes))
  return {
    name: scale * jax.random.normal(k, shape, jnp.float32)
    for k, (name, shape) in zip(keys, sorted(shapes.items()), strict=True)
  }


# ----------------------------------------------------------------------------
# The floor: SOAP's arithmetic with nothing else.


def _mm(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def floor_init(params):
  """Per parameter: statistics and bases (matrices only; empty for vectors), zero moments."""
  state = {}
  for name, p in params.items():
    if p.ndim == 2:
      m, n = p.shape
      stats = (jnp.zeros((m, m), p.dtype), jnp.zeros((n, n), p.dtype))
      bases = (jnp.eye(m, dtype=p.dtype), jnp.eye(n, dtype=p.dtype))
    elif p.ndim <= 1:
      stats = bases = ()
    else:
      raise ValueError(f"The floor handles vectors and matrices only; {name} is {p.shape}.")
    state[name] = {"stats": stats, "bases": bases, "mu": jnp.zeros_like(p), "nu": jnp.zeros_like(p)}
  return state


def _transfer_by_products(m: int, n: int) -> bool:
  """Whether forming the basis changes (m³ + n³, then 2 products) beats 4 rotations."""
  return m**3 + n**3 + 2 * m * n * (m + n) < 4 * m * n * (m + n)


def make_floor_steps(
  precondition_frequency: int, learning_rate: float, b1: float, b2: float, eps: float, weight_decay
):
  """SOAP's arithmetic as two jitted programs, `(first_call, step)`.

  `first_call(grads, state, params)` is SOAP's initialising first call; `step(grads, state,
  params, count)` every later one (count >= 1). Both return `(params, state)` and donate both.
  """
  beta = b2  # SOAP's shampoo_beta defaults to b2.

  def ema_stats(stats, g):
    left, right = stats
    return (beta * left + (1 - beta) * _mm(g, g.T), beta * right + (1 - beta) * _mm(g.T, g))

  def first_call(grads, state, params):
    # Statistics from the first gradient and their eigenbases; no step (as SOAP's first call).
    new_state = {}
    for name, s in state.items():
      if s["stats"]:
        stats = ema_stats(s["stats"], grads[name])
        with jax.default_matmul_precision("float32"):
          bases = tuple(jnp.linalg.eigh(x, symmetrize_input=True)[1][:, ::-1] for x in stats)
        s = {**s, "stats": stats, "bases": bases}
      new_state[name] = s
    return params, new_state

  def refresh(stats, old_bases, mus, nus):
    # Sorted power step + QR per factor; M rotated into the new bases, V permuted.
    new_bases, new_mus, new_nus = {}, {}, {}
    with jax.default_matmul_precision("float32"):
      for name, (left, right) in stats.items():
        q_left, q_right = old_bases[name]
        bases, orders = [], []
        for matrix, q in ((left, q_left), (right, q_right)):
          lq = matrix @ q
          order = jnp.argsort(-jnp.einsum("ij,ij->j", q, lq), stable=True)
          bases.append(jnp.linalg.qr(lq[:, order])[0])
          orders.append(order)
        new_left, new_right = bases
        mu = mus[name]
        if _transfer_by_products(*mu.shape):
          mu = _mm(_mm(_mm(new_left.T, q_left), mu), _mm(q_right.T, new_right))
        else:
          mu = _mm(_mm(q_left, mu), q_right.T)
          mu = _mm(_mm(new_left.T, mu), new_right)
        new_bases[name] = (new_left, new_right)
        new_mus[name] = mu
        new_nus[name] = nus[name][orders[0]][:, orders[1]]
    return new_bases, new_mus, new_nus

  def regular_step(grads, state, params, count):
    t = count.astype(jnp.float32)
    step_size = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    new_params, new_state = {}, {}
    for name, s in state.items():
      g = grads[name]
      if s["stats"]:
        q_left, q_right = s["bases"]
        g = _mm(_mm(q_left.T, g), q_right)
      mu = b1 * s["mu"] + (1 - b1) * g
      nu = b2 * s["nu"] + (1 - b2) * jnp.square(g)
      direction = mu / (jnp.sqrt(nu) + eps)
      if s["stats"]:
        direction = _mm(_mm(q_left, direction), q_right.T)
        s = {**s, "stats": ema_stats(s["stats"], grads[name])}
      new_params[name] = (1 - learning_rate * weight_decay) * (params[name] - step_size * direction)
      new_state[name] = {**s, "mu": mu, "nu": nu}

    matrices = [name for name, s in new_state.items() if s["stats"]]
    pick = lambda key: {name: new_state[name][key] for name in matrices}  # noqa: E731
    bases, mus, nus = lax.cond(
      count % precondition_frequency == 0,
      refresh,
      lambda stats, bases, mus, nus: (bases, mus, nus),
      pick("stats"),
      pick("bases"),
      pick("mu"),
      pick("nu"),
    )
    for name in matrices:
      new_state[name] = {**new_state[name], "bases": bases[name], "mu": mus[name], "nu": nus[name]}
    return new_params, new_state

  # SOAP's first call is a program of its own, run once in the warm-up, so that the timed step
  # carries no branch for it.
  return (
    jax.jit(first_call, donate_argnums=(1, 2)),
    jax.jit(regular_step, donate_argnums=(1, 2)),
  )


def check_floor(precondition_frequency: int, seed: int) -> float | None:
  """Max relative difference of the total update of the floor and `soap_optax.soap`.

  Runs both from the same parameters over the same gradients for `precondition_frequency + 2`
  calls (the first call, one refresh and the step after it) on small shapes whose factors are
  full rank from the first gradient. (A rectangular matrix's first statistics are rank
  deficient, and each eigensolver may pick its own basis of their null space.)
  """
  soap = _common.soap_optax_fn("soap")
  if soap is None:
    return None
  shapes = {"matrix": (32, 32), "small": (8, 8), "vector": (32,)}
  rng = np.random.default_rng(seed)
  params = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  grads = [
    {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    for _ in range(precondition_frequency + 2)
  ]
  calls = len(grads)
  tx = _common.call_with_supported_kwargs(
    soap,
    learning_rate=LEARNING_RATE,
    precondition_frequency=precondition_frequency,
    **SOAP_HPARAMS,
  )
  first_call, floor_step = make_floor_steps(precondition_frequency, LEARNING_RATE, **SOAP_HPARAMS)
  runs = {
    "soap": (_common.make_optax_step(tx), None, tx.init),
    "floor": (floor_step, first_call, floor_init),
  }
  finals = {}
  for name, (step_fn, first_fn, init) in runs.items():
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = jax.tree.map(jnp.copy, init(p))
    _, _, finals[name], _ = _common.time_jax_steps(
      step_fn, state, p, grads, 1, calls - 1, first_step_fn=first_fn
    )
  errors = _common.relative_update_errors(params, finals["floor"], finals["soap"])
  return max(errors.values())


# ----------------------------------------------------------------------------
# Timing.


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--optimizers",
    nargs="+",
    default=list(_common.SOAP_OPTIMIZERS),
    help="soap_optax optimizers (or optax 'adamw'/'adafactor'); 'name:key=value,...' passes "
    "options, e.g. soap:max_precond_dim=1024.",
  )
  _common.add_timing_args(parser)
  _common.add_json_arg(parser)
  args = parser.parse_args()

  header = _common.print_header("bench_step: ms per optimizer update")
  pf = args.precondition_frequency
  windows, measured = _common.refresh_windows(args.steps, pf)
  shapes = _common.gpt_param_shapes(args.d_model, args.num_layers)
  print(
    f"{len(shapes)} parameters, {_common.num_params(shapes) / 1e6:.2f}M scalars; "
    f"precondition_frequency={pf}; warm-up {pf} steps, then {measured} timed steps "
    f"({windows} refresh windows)",
    flush=True,
  )
  floor_error = check_floor(pf, args.seed)
  if floor_error is None:
    print("floor check skipped: soap_optax.soap is not available")
  else:
    print(
      f"floor check: floor vs soap_optax.soap, max relative difference of the total update "
      f"after {pf + 2} calls (one refresh) on full-rank shapes: {floor_error:.2e}"
    )
    if not floor_error < 1e-3:
      print(
        "\n!!! WARNING: the floor does NOT compute soap's update; its ratios below compare "
        "different algorithms. !!!\n"
      )
  print(flush=True)

  key = jax.random.PRNGKey(args.seed)
  params0 = random_tree(shapes, key, scale=0.02)
  grads_pool = [random_tree(shapes, k) for k in jax.random.split(jax.random.fold_in(key, 1), 3)]

  def fresh_params():
    # Steps donate params and state, so every optimizer starts from its own copy.
    return jax.tree.map(jnp.copy, params0)

  results = []
  # The two baselines run first so a failure further down still leaves them printed.
  names = ["adamw", "floor"] + [s for s in _common.available(args.optimizers) if s != "adamw"]
  load_before, started = _common.load_summary(), time.strftime("%H:%M:%S")
  for name in names:
    params = fresh_params()
    first_fn = None
    if name == "floor":
      first_fn, step_fn = make_floor_steps(pf, LEARNING_RATE, **SOAP_HPARAMS)
      state = floor_init(params)
    else:
      soap_family = _common.parse_spec(name)[0] in _common.SOAP_OPTIMIZERS
      options = {"precondition_frequency": pf} if soap_family else {}
      if _common.parse_spec(name)[0] == "soap":
        options.update(SOAP_HPARAMS)  # explicit, so the floor's hyperparameters are soap's
      tx = _common.build_optimizer(name, learning_rate=LEARNING_RATE, **options)
      step_fn, state = _common.make_optax_step(tx), jax.tree.map(jnp.copy, tx.init(params))
    compile_time, times, _, _ = _common.time_jax_steps(
      step_fn, state, params, grads_pool, pf, measured, first_step_fn=first_fn
    )
    results.append({"optimizer": name, **_common.step_summary(times), "compile_s": compile_time})
    r = results[-1]
    print(
      f"{name:>24}: median {r['median_ms']:9.2f} ms  mean {r['mean_ms']:9.2f} ms  "
      f"max/median {r['max_over_median']:6.2f}  (compile {compile_time:.1f}s)",
      flush=True,
    )

  base = {r["optimizer"]: r for r in results}
  rows = [
    [
      r["optimizer"],
      r["median_ms"],
      r["mean_ms"],
      r["max_over_median"],
      r["mean_ms"] / base["adamw"]["mean_ms"],
      r["mean_ms"] / base["floor"]["mean_ms"],
      r["median_ms"] / base["floor"]["median_ms"],
    ]
    for r in results
  ]
  print(
    f"\nAll {len(results)} rows measured in this process between {started} and "
    f"{time.strftime('%H:%M:%S')} (1-minute load average {load_before} before, "
    f"{_common.load_summary()} after).\n"
  )
  print(
    _common.markdown_table(
      [
        "optimizer",
        "median ms",
        "mean ms",
        "max/median",
        "mean / adamw",
        "mean / floor",
        "median / floor",
      ],
      rows,
    )
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {
          "header": header,
          "args": vars(args),
          "floor_check_max_relative_difference": floor_error,
          "results": results,
        },
        f,
        indent=2,
      )


if __name__ == "__main__":
  main()
