"""Self-checks of the NumPy SOAP oracle (independent of soap_optax)."""

import numpy as np
import pytest
from runner import assert_close, assert_equal

try:  # works whether or not tests/ is a package
  from tests.oracles import (
    AdamOracle,
    SoapOracle,
    assign_phases,
    factor_layout,
    merge_dims,
    run_soap,
  )
except ModuleNotFoundError:
  from oracles import AdamOracle, SoapOracle, assign_phases, factor_layout, merge_dims, run_soap

SHAPES = {"s": (), "b": (5,), "w": (4, 6), "c": (3, 2, 5), "k": (2, 3, 3, 4)}


def _random_tree(rng, shapes=SHAPES):
  return {k: rng.normal(size=s) for k, s in shapes.items()}


def _grad_seq(rng, n, shapes=SHAPES):
  return [_random_tree(rng, shapes) for _ in range(n)]


@pytest.mark.parametrize(
  "shape, max_dim, expected",
  [
    ((3, 3, 64, 128), 10000, (576, 128)),
    ((2, 3, 4), 100, (24,)),
    ((10, 10, 10), 100, (100, 10)),
    ((20000, 5), 10000, (20000, 5)),
    ((5, 20000), 10000, (5, 20000)),
    ((3, 20000, 2), 10000, (3, 20000, 2)),
    ((3, 20000, 1), 10000, (3, 20000)),  # trailing 1 after a big axis is dropped
    ((1, 20000), 10000, (20000,)),
    ((4, 1), 10000, (4,)),
    ((1, 4), 10000, (4,)),
    ((1, 1), 10000, (1,)),
    ((), 10000, (1,)),
    ((7,), 10000, (7,)),
    ((3, 4), 0, (3, 4)),
    ((1, 3), 0, (1, 3)),
    ((100, 100), 10000, (10000,)),  # equality is allowed
  ],
)
def test_merge_dims(shape, max_dim, expected):
  assert merge_dims(shape, max_dim) == expected


def test_factor_layout():
  assert factor_layout((), 10, False, False) == ((), [])
  assert factor_layout((), 10, True, False) == ((1,), [True])
  assert factor_layout((5,), 10, False, False) == ((5,), [False])
  assert factor_layout((5,), 10, False, True) == ((5,), [True])
  assert factor_layout((50,), 10, True, True) == ((50,), [False])
  assert factor_layout((4, 50), 10, False, False) == ((4, 50), [True, False])
  assert factor_layout((2, 3, 4), 10, True, False) == ((6, 4), [True, True])


def _textbook_adam(params, grads_seq, lr, b1, b2, eps, wd):
  """Reference-convention Adam: first call only initialises; decay after the step."""
  params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  out = []
  for call, grads in enumerate(grads_seq):
    if call > 0:
      lr_t = lr(call) if callable(lr) else lr
      for k in params:
        g = grads[k]
        m[k] = b1 * m[k] + (1 - b1) * g
        v[k] = b2 * v[k] + (1 - b2) * g**2
        size = lr_t * np.sqrt(1 - b2**call) / (1 - b1**call)
        params[k] = params[k] - size * m[k] / (np.sqrt(v[k]) + eps)
        params[k] = params[k] - lr_t * wd * params[k]
    out.append({k: x.copy() for k, x in params.items()})
  return out


@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("lr", [1e-2, lambda t: 1e-2 / (1 + t)])
def test_no_rotation_is_reference_adam(merge, lr):
  rng = np.random.default_rng(0)
  params = _random_tree(rng)
  grads = _grad_seq(rng, 25)
  hp = dict(lr=lr, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
  expected = _textbook_adam(params, grads, lr, b1=0.9, b2=0.99, eps=1e-8, wd=0.1)
  got = run_soap(params, grads, max_precond_dim=0, merge_dims=merge, **hp)
  adam = AdamOracle(**hp)
  cur = params
  for want, have, g in zip(expected, got, grads, strict=True):
    cur = adam.step(cur, g)
    for k in params:
      assert_close(have[k], want[k], rtol=1e-13, atol=1e-15)
      assert_close(cur[k], want[k], rtol=1e-13, atol=1e-15)


def test_first_call_returns_params_unchanged():
  rng = np.random.default_rng(1)
  params = _random_tree(rng)
  opt = SoapOracle(lr=0.1, weight_decay=0.5, precondition_1d=True)
  new = opt.step(params, _random_tree(rng))
  for k in params:
    assert_equal(new[k], params[k])
    assert opt.state[k]["step"] == 0
    assert_equal(opt.state[k]["m"], 0.0)
  assert opt.count == 1


def _check_orthonormal(q):
  assert_close(q.T @ q, np.eye(q.shape[0]), atol=1e-12, rtol=1e-7)


@pytest.mark.parametrize("merge", [False, True])
def test_initial_eigh_bases(merge):
  rng = np.random.default_rng(2)
  shapes = {"w": (6, 6), "c": (3, 4, 4), "b": (5,), "big": (3, 40)}
  opt = SoapOracle(shampoo_beta=0.9, precondition_1d=True, max_precond_dim=20, merge_dims=merge)
  g = _random_tree(rng, shapes)
  opt.step(_random_tree(rng, shapes), g)
  assert opt.state["big"]["GG"][1] is None and opt.state["big"]["Q"][1] is None
  for k, st in opt.state.items():
    work = g[k].reshape(st["work_shape"])
    for axis, (gg, q) in enumerate(zip(st["GG"], st["Q"], strict=True)):
      if gg is None:
        continue
      unfolded = np.moveaxis(work, axis, 0).reshape(work.shape[axis], -1)
      assert_close(gg, 0.1 * unfolded @ unfolded.T, rtol=1e-13)
      _check_orthonormal(q)
      d = q.T @ gg @ q
      assert_close(d, np.diag(np.diag(d)), atol=1e-12, rtol=1e-7)
      assert np.all(np.diff(np.diag(d)) <= 1e-12)


def test_projection_is_two_sided_rotation():
  rng = np.random.default_rng(3)
  opt = SoapOracle()
  opt.step({"w": np.zeros((4, 6))}, {"w": rng.normal(size=(4, 6))})
  ql, qr = opt.state["w"]["Q"]
  x = rng.normal(size=(4, 6))
  assert_close(opt.project("w", x), ql.T @ x @ qr, atol=1e-13, rtol=1e-7)
  assert_close(opt.project_back("w", opt.project("w", x)), x, atol=1e-13, rtol=1e-7)


def test_refresh_schedule_orthonormality_and_carried_momentum():
  rng = np.random.default_rng(4)
  shapes = {"w": (5, 5), "c": (2, 3, 4), "b": (4,)}
  opt = SoapOracle(precondition_1d=True, merge_dims=True, max_precond_dim=8)
  refreshed = []
  original = opt._refresh

  def spy(st):
    refreshed.append(st["step"])
    original(st)

  opt._refresh = spy
  params = _random_tree(rng, shapes)
  ema = {k: np.zeros(s) for k, s in shapes.items()}
  prev_q = None
  for call in range(26):
    g = _random_tree(rng, shapes)
    params = opt.step(params, g)
    if call > 0:
      ema = {k: 0.95 * ema[k] + 0.05 * g[k] for k in shapes}
    q = opt.state["w"]["Q"]
    if prev_q is not None:
      changed = not all(np.array_equal(a, b) for a, b in zip(q, prev_q, strict=True))
      assert changed == (call in (10, 20))
    prev_q = [a.copy() for a in q]
    for k, st in opt.state.items():
      for basis in st["Q"]:
        if basis is not None:
          _check_orthonormal(basis)
      # m is carried exactly: in parameter space it is the plain EMA of gradients.
      assert_close(opt.project_back(k, st["m"]), ema[k], atol=1e-12, rtol=1e-7)
  assert refreshed == [10] * len(shapes) + [20] * len(shapes)


def test_normalize_grads_unit_rms():
  rng = np.random.default_rng(5)
  opt = SoapOracle(lr=1.0, weight_decay=0.0, normalize_grads=True, correct_bias=False)
  p = {"w": rng.normal(size=(3, 4))}
  p = opt.step(p, {"w": rng.normal(size=(3, 4))})
  new = opt.step(p, {"w": rng.normal(size=(3, 4))})
  assert_close(np.sqrt(np.mean((new["w"] - p["w"]) ** 2)), 1.0, rtol=1e-12)


def test_run_soap_accepts_grad_function():
  target = np.arange(6.0).reshape(2, 3)
  hist = run_soap({"w": np.zeros((2, 3))}, lambda p: {"w": p["w"] - target}, num_steps=3)
  assert len(hist) == 3
  assert_equal(hist[0]["w"], 0.0)
  moved = hist[2]["w"]
  assert np.all(np.isfinite(moved)) and np.any(moved != 0.0), moved  # np.allclose passes a NaN


# -- staggered refresh -------------------------------------------------------------------------


def test_assign_phases_greedy_least_loaded():
  # Descending cost; each unit to the least-loaded phase, lowest index on ties.
  assert assign_phases([512, 216, 64, 27], 2) == [0, 1, 1, 1]
  assert assign_phases([64, 216, 512], 3) == [2, 1, 0]
  # Equal costs keep their order of appearance.
  assert assign_phases([8, 8, 8, 8, 8], 2) == [0, 1, 0, 1, 0]
  assert assign_phases([1, 5, 5, 1], 2) == [0, 0, 1, 1]
  assert assign_phases([3, 2], 1) == [0, 0]
  assert assign_phases([], 4) == []


def test_soap_stagger_phases_by_hand():
  shapes = {"b": (8,), "a": (4, 6), "big": (3, 40)}
  params = {k: np.zeros(s) for k, s in shapes.items()}
  # Units (sorted names, ascending axes): a0 = 64, a1 = 216, b0 = 512, big0 = 27; big1 has no
  # factor. Descending: b0 -> 0, a1 -> 1, a0 -> 2, big0 -> 2 (load 64 < 216 < 512).
  opt = SoapOracle(stagger=True, precondition_frequency=3, precondition_1d=True, max_precond_dim=20)
  opt.step(params, params)
  assert opt.phases == {"a": [2, 1], "b": [0], "big": [2, None]}
  plain = SoapOracle(precondition_frequency=3, precondition_1d=True, max_precond_dim=20)
  plain.step(params, params)
  assert plain.phases == {"a": [0, 0], "b": [0], "big": [0, None]}


def test_soap_stagger_refreshes_only_due_factors_and_carries_momentum():
  rng = np.random.default_rng(6)
  shapes = {"a": (4, 6), "b": (5,)}
  freq = 3
  opt = SoapOracle(stagger=True, precondition_frequency=freq, precondition_1d=True)
  params = opt.step(_random_tree(rng, shapes), _random_tree(rng, shapes))
  ema = {k: np.zeros(s) for k, s in shapes.items()}
  for t in range(1, 9):
    before = {k: [q.copy() for q in opt.state[k]["Q"]] for k in shapes}
    g = _random_tree(rng, shapes)
    params = opt.step(params, g)
    ema = {k: 0.95 * ema[k] + 0.05 * g[k] for k in shapes}
    for k in shapes:
      for axis, q in enumerate(opt.state[k]["Q"]):
        _check_orthonormal(q)
        if t % freq == opt.phases[k][axis]:
          assert np.max(np.abs(q - before[k][axis])) > 1e-8
        else:
          assert_equal(q, before[k][axis])
      assert_close(opt.project_back(k, opt.state[k]["m"]), ema[k], atol=1e-12, rtol=1e-7)
