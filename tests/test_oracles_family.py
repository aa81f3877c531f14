"""Self-checks of the NumPy family oracles (Shampoo, eigen-Adafactor, EShampoo); no soap_optax."""

import numpy as np
import pytest

try:  # works whether or not tests/ is a package
  from tests.oracles import SoapOracle
  from tests.oracles_family import (
    EigenAdafactorOracle,
    EShampooOracle,
    ShampooOracle,
    adafactor_axes,
    adafactor_reference_step,
    axis_gram,
    family_layout,
    idealized_claim,
    mode_product,
    refresh_factor,
  )
except ModuleNotFoundError:
  from oracles import SoapOracle
  from oracles_family import (
    EigenAdafactorOracle,
    EShampooOracle,
    ShampooOracle,
    adafactor_axes,
    adafactor_reference_step,
    axis_gram,
    family_layout,
    idealized_claim,
    mode_product,
    refresh_factor,
  )

SHAPES = {"s": (), "b": (5,), "w": (4, 6), "t": (6, 4), "c": (3, 5, 5), "k": (2, 3, 4)}


def _random_tree(rng, shapes=SHAPES):
  return {k: rng.normal(size=s) for k, s in shapes.items()}


def _grad_seq(rng, n, shapes=SHAPES):
  return [_random_tree(rng, shapes) for _ in range(n)]


def _sym_power(a, power, eps=0.0):
  vals, vecs = np.linalg.eigh(a)
  return (vecs * (np.maximum(vals, 0.0) + eps) ** power) @ vecs.T


def _check_orthonormal(q, atol=1e-12):
  np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=atol)


def _lr_at(lr, t):
  return lr(t) if callable(lr) else lr


# -- layout and helpers ------------------------------------------------------------------------


def test_family_layout_never_factors_scalars():
  assert family_layout((), 10, True, True) == ((), [])
  assert family_layout((), 10, False, False) == ((), [])
  assert family_layout((5,), 10, False, True) == ((5,), [True])
  assert family_layout((5,), 10, True, False) == ((5,), [False])
  assert family_layout((2, 3, 4), 10, True, False) == ((6, 4), [True, True])
  assert family_layout((4, 50), 10, False, False) == ((4, 50), [True, False])


def test_adafactor_axes_stable():
  assert adafactor_axes(()) is None and adafactor_axes((7,)) is None
  assert adafactor_axes((4, 6)) == (0, 1)
  assert adafactor_axes((6, 4)) == (1, 0)
  assert adafactor_axes((5, 5)) == (0, 1)
  assert adafactor_axes((3, 5, 5)) == (1, 2)
  assert adafactor_axes((5, 3, 5)) == (0, 2)
  assert adafactor_axes((7, 2, 7, 7)) == (2, 3)


def test_mode_product_matrix():
  rng = np.random.default_rng(0)
  x, a, b = rng.normal(size=(3, 4)), rng.normal(size=(3, 3)), rng.normal(size=(4, 4))
  np.testing.assert_allclose(mode_product(x, [a.T, b.T]), a.T @ x @ b, atol=1e-13)
  np.testing.assert_allclose(mode_product(x, [None, b]), x @ b.T, atol=1e-13)


# -- idealized claim ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (6, 6), (8, 4)])
def test_idealized_claim(shape):
  rng = np.random.default_rng(sum(shape))
  # Anisotropic gradients so that the bases are far from trivial.
  left = rng.normal(size=(shape[0], shape[0]))
  right = rng.normal(size=(shape[1], shape[1]))
  data = [left @ rng.normal(size=shape) @ right for _ in range(12)]
  for g in [data[0], data[5], rng.normal(size=shape)]:
    out = idealized_claim(data, g)
    scale = np.max(np.abs(out["shampoo"]))
    np.testing.assert_allclose(out["adafactor"], out["shampoo"], rtol=0, atol=1e-10 * scale)
  np.testing.assert_allclose(out["A"], np.diag(out["Q_L"].T @ out["L"] @ out["Q_L"]), rtol=1e-11)
  np.testing.assert_allclose(out["C"], np.diag(out["Q_R"].T @ out["R"] @ out["Q_R"]), rtol=1e-11)
  np.testing.assert_allclose(np.sum(out["A"]), np.trace(out["L"]), rtol=1e-12)
  assert np.all(np.diff(out["lam_L"]) <= 0) and np.all(np.diff(out["lam_R"]) <= 0)
  # The default direction is the first gradient's.
  np.testing.assert_allclose(
    idealized_claim(data)["shampoo"], idealized_claim(data, data[0])["shampoo"]
  )


# -- Shampoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 5), (3, 4, 2)])
@pytest.mark.parametrize("exponent, trace_scaling", [(0.25, False), (0.5, True)])
def test_shampoo_fixed_gradient_matches_direct_eigh(shape, exponent, trace_scaling):
  rng = np.random.default_rng(1)
  g = rng.normal(size=shape)
  beta, eps = 0.9, 1e-30
  opt = ShampooOracle(
    lr=1.0,
    b1=0.0,
    shampoo_beta=beta,
    eps=eps,
    exponent=exponent,
    trace_scaling=trace_scaling,
    grafting="none",
    precondition_frequency=1,
  )
  p = {"w": rng.normal(size=shape)}
  new = opt.step(p, {"w": g})
  np.testing.assert_array_equal(new["w"], p["w"])
  p = new
  for t in range(1, 6):
    # The bases used at call t come from the statistics after t calls.
    stats = [(1.0 - beta**t) * axis_gram(g, k) for k in range(g.ndim)]
    want = mode_product(g, [_sym_power(s, -exponent, eps) for s in stats])
    if trace_scaling:
      want = want * np.trace(stats[0]) ** (exponent * (g.ndim - 1))
    new = opt.step(p, {"w": g})
    np.testing.assert_allclose(p["w"] - new["w"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    for k in range(g.ndim):
      np.testing.assert_allclose(
        opt.state["w"]["L"][k], (1.0 - beta ** (t + 1)) * axis_gram(g, k), rtol=1e-12
      )
    p = new


@pytest.mark.parametrize("grafting", ["sgd", "rmsprop", "adam"])
def test_shampoo_grafting_norms_and_unfactored(grafting):
  rng = np.random.default_rng(2)
  shapes = {"w": (4, 6), "b": (5,), "s": ()}
  b2, geps = 0.99, 1e-8
  opt = ShampooOracle(lr=1.0, b1=0.0, b2=b2, grafting=grafting, graft_eps=geps)
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  nu = {k: np.zeros(s) for k, s in shapes.items()}
  for t in range(1, 5):
    g = _random_tree(rng, shapes)
    new = opt.step(params, g)
    for k in shapes:
      if grafting == "sgd":
        graft = g[k]
      else:
        nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2
        v = nu[k] / (1 - b2**t) if grafting == "adam" else nu[k]
        graft = g[k] / (np.sqrt(v) + geps)
      step = params[k] - new[k]
      if k == "w":
        np.testing.assert_allclose(np.linalg.norm(step), np.linalg.norm(graft), rtol=1e-12)
      else:  # no factored axis: the grafted optimizer itself
        np.testing.assert_allclose(step, graft, rtol=1e-12)
    params = new


def test_shampoo_momentum_and_weight_decay():
  rng = np.random.default_rng(3)
  b1, wd = 0.8, 0.1
  lr = lambda t: 0.1 / (1 + t)  # noqa: E731
  opt = ShampooOracle(lr=lr, b1=b1, grafting="none", weight_decay=wd, precondition_frequency=3)
  ref = ShampooOracle(lr=1.0, b1=0.0, grafting="none", precondition_frequency=3)
  params = {"w": rng.normal(size=(3, 4))}
  zero = {"w": np.zeros((3, 4))}
  mu = np.zeros((3, 4))
  for t, g in enumerate(_grad_seq(rng, 8, {"w": (3, 4)})):
    d = zero["w"] - ref.step(zero, g)["w"]  # the bare direction D with the same bases
    new = opt.step(params, g)
    if t == 0:
      np.testing.assert_array_equal(new["w"], params["w"])
    else:
      mu = b1 * mu + (1 - b1) * d
      want = params["w"] - lr(t) * mu / (1 - b1 ** (t + 1))  # optax.ema counts the first call
      want = want - lr(t) * wd * want
      np.testing.assert_allclose(new["w"], want, rtol=1e-12, atol=1e-14)
    params = new


# -- EShampoo ----------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [False, True])
def test_eshampoo_no_rotation_is_adam(merge):
  rng = np.random.default_rng(4)
  lr = lambda t: 1e-2 / (1 + t)  # noqa: E731
  b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.1
  opt = EShampooOracle(
    lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=wd, max_precond_dim=0, merge_dims=merge
  )
  params = _random_tree(rng)
  want = {k: v.copy() for k, v in params.items()}
  m = {k: np.zeros(s) for k, s in SHAPES.items()}
  v = {k: np.zeros(s) for k, s in SHAPES.items()}
  for t, g in enumerate(_grad_seq(rng, 12)):
    params = opt.step(params, g)
    if t > 0:
      for k in SHAPES:
        m[k] = b1 * m[k] + (1 - b1) * g[k]
        v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
        upd = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
        want[k] = want[k] - lr(t) * upd
        want[k] = want[k] - lr(t) * wd * want[k]
    for k in SHAPES:
      np.testing.assert_allclose(params[k], want[k], rtol=1e-13, atol=1e-15)
  assert opt.count == 12


def test_eshampoo_diagonal_follows_refresh():
  """D is the EMA of squared rotated gradients and is permuted with the refresh's order."""
  rng = np.random.default_rng(5)
  b2 = 0.95
  opt = EShampooOracle(b2=b2, precondition_frequency=2, refresh_tolerance=0.0)
  shapes = {"w": (4, 5)}
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  st = opt.state["w"]
  for _ in range(1, 7):
    d_before, (ql, qr) = st["D"].copy(), st["Q"]
    g = rng.normal(size=shapes["w"])
    params = opt.step(params, {"w": g})
    want = b2 * d_before + (1 - b2) * (ql.T @ g @ qr) ** 2
    if st["step"] % 2 == 0:
      ol, orr = st["order"]
      assert sorted(ol) == list(range(4)) and sorted(orr) == list(range(5))
      want = want[ol][:, orr]
    np.testing.assert_allclose(st["D"], want, rtol=1e-13)


# -- eigen-Adafactor ---------------------------------------------------------------------------


def _inline_adafactor(params, grads_seq, lr, b1, b2, eps, eps2, wd):
  """Plain Adafactor with the family conventions, written out for matrices and tensors."""
  params = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
  state = {}
  out = []
  for t, grads in enumerate(grads_seq):
    for k, g in grads.items():
      if t == 0:
        state[k] = {"m": np.zeros(g.shape), "r": 0.0, "c": 0.0, "v": 0.0}
        continue
      st = state[k]
      st["m"] = b1 * st["m"] + (1 - b1) * g
      g2 = g**2 + eps2
      if g.ndim >= 2:
        rank = np.argsort(g.shape, kind="stable")
        a, b = rank[-2], rank[-1]
        st["r"] = b2 * st["r"] + (1 - b2) * g2.sum(axis=b, keepdims=True)
        st["c"] = b2 * st["c"] + (1 - b2) * g2.sum(axis=a, keepdims=True)
        v = st["r"] * st["c"] / st["r"].sum(axis=a, keepdims=True)
      else:
        st["v"] = b2 * st["v"] + (1 - b2) * g2
        v = st["v"]
      upd = np.sqrt(1 - b2**t) / (1 - b1**t) * st["m"] / (np.sqrt(v) + eps)
      lr_t = _lr_at(lr, t)
      params[k] = params[k] - lr_t * upd
      params[k] = params[k] - lr_t * wd * params[k]
    out.append({k: v.copy() for k, v in params.items()})
  return out


@pytest.mark.parametrize("lr", [3e-3, lambda t: 1e-2 / (1 + t)])
def test_eigen_adafactor_no_rotation_is_adafactor(lr):
  rng = np.random.default_rng(6)
  params = _random_tree(rng)
  grads = _grad_seq(rng, 10)
  hp = dict(b1=0.9, b2=0.95, eps=1e-8, eps2=1e-3, weight_decay=0.05)
  want = _inline_adafactor(params, grads, lr, hp["b1"], hp["b2"], hp["eps"], hp["eps2"], 0.05)
  opt = EigenAdafactorOracle(lr=lr, max_precond_dim=0, **hp)
  cur = params
  ref_state = dict.fromkeys(params)
  ref = {k: np.array(v) for k, v in params.items()}
  for t, (g, w) in enumerate(zip(grads, want, strict=True)):
    cur = opt.step(cur, g)
    for k in params:
      ref_state[k], ref[k] = adafactor_reference_step(
        ref_state[k], ref[k], g[k], _lr_at(lr, t), **hp
      )
      np.testing.assert_allclose(cur[k], w[k], rtol=1e-13, atol=1e-15)
      np.testing.assert_allclose(ref[k], w[k], rtol=1e-13, atol=1e-15)
  assert opt.state["c"]["r"].shape == (3, 5, 1) and opt.state["c"]["c"].shape == (3, 1, 5)
  # (6, 4): a = 1 (size 4), b = 0 (size 6); r is reduced over b, c over a.
  assert opt.state["t"]["r"].shape == (1, 4) and opt.state["t"]["c"].shape == (6, 1)
  assert opt.state["b"]["V"].shape == (5,) and opt.state["s"]["V"].shape == ()


def test_eigen_adafactor_on_vectors_is_soap():
  """With < 2 working axes the second moment is full: SOAP (up to eps2 = 0).

  The first refresh comes after 4 gradients, so the 3x3 statistics are nonsingular there (QR of a
  singular statistic amplifies rounding differences between the two implementations).
  """
  rng = np.random.default_rng(7)
  shapes = {"b": (3,), "s": (), "big": (12,)}
  hp = dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, precondition_frequency=3)
  hp.update(precondition_1d=True, max_precond_dim=8, shampoo_beta=0.8)
  ours = EigenAdafactorOracle(eps2=0.0, **hp)
  soap = SoapOracle(**hp)
  pa = pb = _random_tree(rng, shapes)
  for g in _grad_seq(rng, 14, shapes):
    pa, pb = ours.step(pa, g), soap.step(pb, g)
    for k in shapes:
      np.testing.assert_allclose(pa[k], pb[k], rtol=1e-10, atol=1e-13)


def test_eigen_adafactor_momentum_carried_exactly():
  rng = np.random.default_rng(8)
  shapes = {"w": (4, 6), "c": (2, 3, 4)}
  opt = EigenAdafactorOracle(precondition_frequency=2, merge_dims=True, max_precond_dim=8)
  params = _random_tree(rng, shapes)
  ema = {k: np.zeros(s) for k, s in shapes.items()}
  for t, g in enumerate(_grad_seq(rng, 9, shapes)):
    params = opt.step(params, g)
    if t > 0:
      ema = {k: 0.95 * ema[k] + 0.05 * g[k] for k in shapes}
    for k in shapes:
      np.testing.assert_allclose(
        opt.project_back(k, opt.state[k]["m"]),
        ema[k].reshape(opt.state[k]["work_shape"]),
        atol=1e-12,
      )


def test_eigen_adafactor_factors_follow_refresh():
  """r and c are EMAs of rotated row/column sums, permuted along their unreduced axis."""
  rng = np.random.default_rng(14)
  b2, eps2 = 0.9, 1e-3
  opt = EigenAdafactorOracle(b2=b2, eps2=eps2, precondition_frequency=2)
  shape = (6, 4)  # a = 1, b = 0
  params = {"w": rng.normal(size=shape)}
  params = opt.step(params, {"w": rng.normal(size=shape)})
  st = opt.state["w"]
  for _ in range(1, 7):
    r0, c0, (ql, qr) = st["r"].copy(), st["c"].copy(), st["Q"]
    g = rng.normal(size=shape)
    params = opt.step(params, {"w": g})
    g2 = (ql.T @ g @ qr) ** 2 + eps2
    want_r = b2 * r0 + (1 - b2) * g2.sum(axis=0, keepdims=True)
    want_c = b2 * c0 + (1 - b2) * g2.sum(axis=1, keepdims=True)
    if st["step"] % 2 == 0:
      ol, orr = st["order"]
      want_r, want_c = want_r[:, orr], want_c[ol]
    np.testing.assert_allclose(st["r"], want_r, rtol=1e-13)
    np.testing.assert_allclose(st["c"], want_c, rtol=1e-13)


# -- refresh rule ------------------------------------------------------------------------------


def test_qr_tau0_one_iteration_is_soap_refresh():
  rng = np.random.default_rng(9)
  shapes = {"w": (5, 4), "c": (2, 3, 4)}
  hp = dict(precondition_frequency=2, shampoo_beta=0.9)
  ours = EShampooOracle(refresh_tolerance=0.0, max_qr_iterations=1, method="qr", **hp)
  soap = SoapOracle(**hp)
  pa = pb = _random_tree(rng, shapes)
  for g in _grad_seq(rng, 9, shapes):
    pa, pb = ours.step(pa, g), soap.step(pb, g)
    for k in shapes:
      for qa, qb in zip(ours.state[k]["Q"], soap.state[k]["Q"], strict=True):
        np.testing.assert_allclose(qa, qb, atol=1e-10)


@pytest.mark.parametrize(
  "oracle, kw",
  [
    (EShampooOracle, dict(method="qr", refresh_tolerance=0.01, max_qr_iterations=3)),
    (EShampooOracle, dict(method="qr", refresh_tolerance=0.0, max_qr_iterations=1)),
    (ShampooOracle, dict(lr=1e-2, method="qr", refresh_tolerance=0.0, max_qr_iterations=4)),
    (EigenAdafactorOracle, dict()),
  ],
)
def test_qr_refresh_keeps_q_orthonormal(oracle, kw):
  rng = np.random.default_rng(10)
  shapes = {"w": (6, 5), "c": (4, 3, 5), "b": (7,)}
  opt = oracle(precondition_frequency=1, precondition_1d=True, **kw)
  params = _random_tree(rng, shapes)
  for g in _grad_seq(rng, 8, shapes):
    params = opt.step(params, g)
    for st in opt.state.values():
      for q in st["Q"]:
        _check_orthonormal(q)
  assert opt.state["w"]["refresh_count"] == [7, 7]


@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_tolerance_one_never_refreshes(method):
  rng = np.random.default_rng(11)
  shapes = {"w": (5, 4), "c": (2, 3, 4)}
  opt = EShampooOracle(method=method, refresh_tolerance=1.0, precondition_frequency=2)
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  first = {k: [q.copy() for q in st["Q"]] for k, st in opt.state.items()}
  for g in _grad_seq(rng, 8, shapes):
    params = opt.step(params, g)
    for k, st in opt.state.items():
      for axis, (q, q0) in enumerate(zip(st["Q"], first[k], strict=True)):
        np.testing.assert_array_equal(q, q0)
        if st["step"] % 2 == 0:  # a skipped refresh still refreshes the estimates
          np.testing.assert_allclose(st["eig"][axis], np.diag(q.T @ st["L"][axis] @ q))
          np.testing.assert_array_equal(st["order"][axis], np.arange(q.shape[0]))
      assert st["refresh_count"] == [0] * len(st["Q"])


@pytest.mark.parametrize("method", ["qr", "eigh"])
def test_tolerance_zero_refreshes_on_schedule(method):
  rng = np.random.default_rng(12)
  shapes = {"w": (5, 4), "c": (2, 3, 4)}
  opt = EShampooOracle(method=method, refresh_tolerance=0.0, precondition_frequency=3)
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  for t in range(1, 11):
    before = {k: [q.copy() for q in st["Q"]] for k, st in opt.state.items()}
    params = opt.step(params, _random_tree(rng, shapes))
    for k, st in opt.state.items():
      for q, q0 in zip(st["Q"], before[k], strict=True):
        assert (not np.array_equal(q, q0)) == (t % 3 == 0)
      assert st["refresh_count"] == [t // 3] * len(st["Q"])
      if method == "eigh" and t % 3 == 0:
        for axis, stat in enumerate(st["L"]):
          np.testing.assert_allclose(st["eig"][axis], np.linalg.eigvalsh(stat)[::-1], atol=1e-12)


def test_refresh_factor_many_iterations_converges():
  rng = np.random.default_rng(13)
  x = rng.normal(size=(6, 6))
  stat = x @ np.diag([9.0, 5.0, 3.0, 2.0, 1.0, 0.5]) @ x.T
  q0 = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  q, lam, order, refreshed = refresh_factor(stat, q0, "qr", 1e-13, 2000)
  assert refreshed and sorted(order) == list(range(6))
  _check_orthonormal(q)
  np.testing.assert_allclose(lam, np.linalg.eigvalsh(stat)[::-1], rtol=1e-8)
  # One iteration: estimates are the old basis's diagonal, re-ordered.
  q1, lam1, order1, _ = refresh_factor(stat, q0, "qr", 0.0, 1)
  np.testing.assert_allclose(lam1, np.diag(q0.T @ stat @ q0)[order1])
  assert np.all(np.diff(lam1) <= 0)
