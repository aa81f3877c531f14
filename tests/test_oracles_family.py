"""Self-checks of the NumPy family oracles (Shampoo, eigen-Adafactor, EShampoo); no soap_optax.

Each test states one behaviour of the oracles and checks it against a direct computation.
"""

import copy

import numpy as np
import pytest
from runner import assert_close, assert_equal

try:  # works whether or not tests/ is a package
  from tests.oracles import SoapOracle
  from tests.oracles_family import (
    EigenAdafactorOracle,
    EShampooOracle,
    ShampooOracle,
    adafactor_axes,
    adafactor_reference_step,
    axis_gram,
    block_slices,
    eigh_descending,
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
    block_slices,
    eigh_descending,
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
  assert_close(q.T @ q, np.eye(q.shape[0]), atol=atol, rtol=1e-7)


def _check_finite(tree):
  for k, v in tree.items():
    assert np.all(np.isfinite(v)), k


def _lr_at(lr, t):
  return lr(t) if callable(lr) else lr


def _random_orthogonal(rng, n):
  return np.linalg.qr(rng.normal(size=(n, n)))[0]


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
  assert_close(mode_product(x, [a.T, b.T]), a.T @ x @ b, atol=1e-13, rtol=1e-7)
  assert_close(mode_product(x, [None, b]), x @ b.T, atol=1e-13, rtol=1e-7)


def test_block_slices_are_ragged_and_in_c_order():
  def spans(index):
    return [(s.start, s.stop) for s in index]

  got = [spans(index) for index in block_slices((5, 3), 2)]
  assert got == [
    [(0, 2), (0, 2)],
    [(0, 2), (2, 3)],
    [(2, 4), (0, 2)],
    [(2, 4), (2, 3)],
    [(4, 5), (0, 2)],
    [(4, 5), (2, 3)],
  ]
  assert [spans(i) for i in block_slices((4, 6), 4)] == [[(0, 4), (0, 4)], [(0, 4), (4, 6)]]
  assert [spans(i) for i in block_slices((4, 6), None)] == [[(0, 4), (0, 6)]]
  assert block_slices((), 3) == [()]


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
    assert_close(out["adafactor"], out["shampoo"], rtol=0, atol=1e-10 * scale)
  assert_close(out["A"], np.diag(out["Q_L"].T @ out["L"] @ out["Q_L"]), rtol=1e-11)
  assert_close(out["C"], np.diag(out["Q_R"].T @ out["R"] @ out["Q_R"]), rtol=1e-11)
  assert_close(np.sum(out["A"]), np.trace(out["L"]), rtol=1e-12)
  assert np.all(np.diff(out["lam_L"]) <= 0) and np.all(np.diff(out["lam_R"]) <= 0)
  # The default direction is the first gradient's.
  assert_close(
    idealized_claim(data)["shampoo"], idealized_claim(data, data[0])["shampoo"], rtol=1e-7
  )


# -- Shampoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 5), (3, 4, 2)])
@pytest.mark.parametrize(
  "exponent, trace_scaling, relative_eps",
  [(0.25, False, True), (0.5, True, True), (0.5, False, False)],
)
def test_shampoo_fixed_gradient_is_inverse_root_of_statistics(
  shape, exponent, trace_scaling, relative_eps
):
  """b1 = 0, no grafting, a fixed gradient: the step is L^(-e) G R^(-e) from the lagged stats."""
  rng = np.random.default_rng(1)
  g = rng.normal(size=shape)
  beta = 0.9
  eps = 1e-30 if relative_eps else 1e-3
  opt = ShampooOracle(
    lr=1.0,
    b1=0.0,
    shampoo_beta=beta,
    eps=eps,
    relative_eps=relative_eps,
    exponent=exponent,
    trace_scaling=trace_scaling,
    grafting="none",
    precondition_frequency=1,
  )
  p = {"w": rng.normal(size=shape)}
  new = opt.step(p, {"w": g})
  assert_equal(new["w"], p["w"])
  p = new
  for t in range(1, 6):
    # The bases used at call t come from the statistics after t calls (basis lag).
    stats = [(1.0 - beta**t) * axis_gram(g, k) for k in range(g.ndim)]
    damping = [eps * np.linalg.eigvalsh(s).max() if relative_eps else eps for s in stats]
    want = mode_product(
      g, [_sym_power(s, -exponent, d) for s, d in zip(stats, damping, strict=True)]
    )
    if trace_scaling:
      want = want * np.trace(stats[0]) ** (exponent * (g.ndim - 1))
    new = opt.step(p, {"w": g})
    assert_close(p["w"] - new["w"], want, rtol=1e-9, atol=1e-12 * np.abs(want).max())
    for k in range(g.ndim):
      assert_close(opt.state["w"]["L"][k], (1.0 - beta ** (t + 1)) * axis_gram(g, k), rtol=1e-12)
    p = new


def test_shampoo_bias_corrected_factors_of_a_fixed_gradient_are_its_grams():
  """DS's factor bias correction: (L / (1 - beta^n)) = G G^T exactly for a fixed gradient."""
  rng = np.random.default_rng(21)
  g = rng.normal(size=(4, 4))
  opt = ShampooOracle(
    lr=1.0,
    b1=0.0,
    shampoo_beta=0.8,
    eps=1e-30,
    grafting="none",
    precondition_frequency=1,
    bias_correct_factors=True,
  )
  p = opt.step({"w": np.zeros((4, 4))}, {"w": g})
  want = _sym_power(g @ g.T, -0.5) @ g @ _sym_power(g.T @ g, -0.5)
  for _ in range(3):
    new = opt.step(p, {"w": g})
    assert_close(p["w"] - new["w"], want, rtol=1e-6)
    p = new


def _inv_root(q, lam, exponent, rel_eps):
  lam = np.maximum(lam, 0.0)
  return (q * (lam + rel_eps * lam.max()) ** -exponent) @ q.T


def _graft_reference(grafting, m_hat, nu, b2, t, geps):
  if grafting == "sgd":
    return m_hat
  v = nu / (1 - b2**t) if grafting == "adam" else nu
  return m_hat / (np.sqrt(v) + geps)


@pytest.mark.parametrize("grafting", ["sgd", "rmsprop", "adam"])
def test_shampoo_grafting_norms_and_unfactored(grafting):
  """Grafted norm of the filtered gradient per parameter; unfactored params take the graft."""
  rng = np.random.default_rng(2)
  shapes = {"w": (4, 6), "b": (5,), "s": ()}
  b1, b2, geps = 0.9, 0.99, 1e-8
  opt = ShampooOracle(lr=1.0, b1=b1, b2=b2, grafting=grafting, graft_eps=geps)
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  mu = {k: np.zeros(s) for k, s in shapes.items()}
  nu = {k: np.zeros(s) for k, s in shapes.items()}
  for t in range(1, 5):
    g = _random_tree(rng, shapes)
    new = opt.step(params, g)
    for k in shapes:
      mu[k] = b1 * mu[k] + (1 - b1) * g[k]
      nu[k] = b2 * nu[k] + (1 - b2) * g[k] ** 2  # the raw gradient, as DS
      graft = _graft_reference(grafting, mu[k] / (1 - b1**t), nu[k], b2, t, geps)
      step = params[k] - new[k]
      if k == "w":
        assert_close(np.linalg.norm(step), np.linalg.norm(graft), rtol=1e-12)
      else:  # no factored axis: the grafted optimizer itself
        assert_close(step, graft, rtol=1e-12)
    params = new


def test_shampoo_first_real_step_equals_grafted_step_with_b1():
  """Issue item 5: with b1 = 0.9 the first real update has the full grafted norm."""
  rng = np.random.default_rng(3)
  shapes = {"w": (3, 4), "b": (6,)}
  lr, geps = 0.1, 1e-8
  opt = ShampooOracle(lr=lr, b1=0.9, grafting="adam", graft_eps=geps)
  params = _random_tree(rng, shapes)
  params = opt.step(params, _random_tree(rng, shapes))
  g = _random_tree(rng, shapes)
  new = opt.step(params, g)
  for k in shapes:
    graft = g[k] / (np.abs(g[k]) + geps)  # M_hat = G, nu_hat = G^2 at t = 1
    step = (params[k] - new[k]) / lr
    assert_close(np.linalg.norm(step), np.linalg.norm(graft), rtol=1e-12)
  assert_close((params["b"] - new["b"]) / lr, g["b"] / (np.abs(g["b"]) + geps), rtol=1e-7)


def test_shampoo_preconditions_bias_corrected_filtered_gradient():
  """Between refreshes the step is lr * P(M_hat), M_hat = EMA_b1(G) / (1 - b1^t); no momentum."""
  rng = np.random.default_rng(4)
  b1 = 0.8
  lr = lambda t: 0.1 / (1 + t)  # noqa: E731
  opt = ShampooOracle(lr=lr, b1=b1, grafting="none", precondition_frequency=100)
  shape = (3, 4)
  params = opt.step({"w": rng.normal(size=shape)}, {"w": rng.normal(size=shape)})
  st = opt.state["w"]
  left, right = (_inv_root(q, lam, 0.5, 1e-6) for q, lam in zip(st["Q"], st["eig"], strict=True))
  m = np.zeros(shape)
  for t in range(1, 6):
    g = rng.normal(size=shape)
    new = opt.step(params, {"w": g})
    m = b1 * m + (1 - b1) * g
    want = params["w"] - lr(t) * left @ (m / (1 - b1**t)) @ right
    assert_close(new["w"], want, rtol=1e-12, atol=1e-14)
    params = new


@pytest.mark.parametrize("soap_weight_decay", [True, False])
def test_weight_decay_forms_and_mask(soap_weight_decay):
  """SOAP's (1 - lr wd)(p - lr u) by default, DS's p - lr (u + wd p) on request; masked params
  do not decay; the first call never decays."""
  rng = np.random.default_rng(5)
  shapes = {"w": (3, 4), "v": (4, 3)}
  lr, wd = 0.1, 0.5
  kw = dict(lr=lr, b1=0.5, grafting="adam", precondition_frequency=2)
  opt = ShampooOracle(
    weight_decay=wd,
    weight_decay_mask={"v": False},
    soap_weight_decay=soap_weight_decay,
    **kw,
  )
  params = _random_tree(rng, shapes)
  for t, g in enumerate(_grad_seq(rng, 5, shapes)):
    twin = copy.deepcopy(opt)  # same state, no decay: gives the bare direction u
    twin.weight_decay = 0.0
    bare = twin.step(params, g)
    u = {k: (params[k] - bare[k]) / lr for k in shapes}
    new = opt.step(params, g)
    if t == 0:
      for k in shapes:
        assert_equal(new[k], params[k])
    else:
      if soap_weight_decay:
        want_w = (1 - lr * wd) * (params["w"] - lr * u["w"])
      else:
        want_w = params["w"] - lr * (u["w"] + wd * params["w"])
      assert_close(new["w"], want_w, rtol=1e-12, atol=1e-14)
      assert_close(new["v"], params["v"] - lr * u["v"], rtol=1e-12, atol=1e-14)
    params = new


# -- EShampoo ----------------------------------------------------------------------------------


@pytest.mark.parametrize("merge", [False, True])
def test_eshampoo_no_rotation_is_adam(merge):
  """Identity bases (max_precond_dim = 0): optax-style Adam from the second call."""
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
      assert_close(params[k], want[k], rtol=1e-13, atol=1e-15)
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
    assert_close(st["D"], want, rtol=1e-13)


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
      assert_close(cur[k], w[k], rtol=1e-13, atol=1e-15)
      assert_close(ref[k], w[k], rtol=1e-13, atol=1e-15)
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
      assert_close(pa[k], pb[k], rtol=1e-10, atol=1e-13)


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
      assert_close(
        opt.project_back(k, opt.state[k]["m"]),
        ema[k].reshape(opt.state[k]["work_shape"]),
        atol=1e-12,
        rtol=1e-7,
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
    assert_close(st["r"], want_r, rtol=1e-13)
    assert_close(st["c"], want_c, rtol=1e-13)


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
        assert_close(qa, qb, atol=1e-10, rtol=1e-7)


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
        assert_equal(q, q0)
        if st["step"] % 2 == 0:  # a skipped refresh still refreshes the estimates
          assert_close(st["eig"][axis], np.diag(q.T @ st["L"][axis] @ q), rtol=1e-7)
          assert_equal(st["order"][axis], np.arange(q.shape[0]))
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
        assert np.all(np.isfinite(q))
        assert (not np.array_equal(q, q0)) == (t % 3 == 0)
      assert st["refresh_count"] == [t // 3] * len(st["Q"])
      if method == "eigh" and t % 3 == 0:
        for axis, stat in enumerate(st["L"]):
          assert_close(st["eig"][axis], np.linalg.eigvalsh(stat)[::-1], atol=1e-12, rtol=1e-7)


def test_refresh_factor_many_iterations_converges():
  rng = np.random.default_rng(13)
  x = rng.normal(size=(6, 6))
  stat = x @ np.diag([9.0, 5.0, 3.0, 2.0, 1.0, 0.5]) @ x.T
  q0 = np.linalg.qr(rng.normal(size=(6, 6)))[0]
  q, lam, order, refreshed = refresh_factor(stat, q0, "qr", 1e-13, 2000)
  assert refreshed and sorted(order) == list(range(6))
  _check_orthonormal(q)
  assert_close(lam, np.linalg.eigvalsh(stat)[::-1], rtol=1e-8)
  # One iteration: estimates are the old basis's diagonal, re-ordered.
  q1, lam1, order1, _ = refresh_factor(stat, q0, "qr", 0.0, 1)
  assert_close(lam1, np.diag(q0.T @ stat @ q0)[order1], rtol=1e-7)
  assert np.all(np.diff(lam1) <= 0)


# -- eigh-free first basis ---------------------------------------------------------------------


@pytest.mark.parametrize("oracle", [ShampooOracle, EShampooOracle, EigenAdafactorOracle])
def test_first_basis_qr_many_iterations_approaches_eigh(oracle):
  rng = np.random.default_rng(15)
  g = rng.normal(size=(4, 6))
  opt = oracle(
    lr=1e-2, first_basis="qr", method="qr", refresh_tolerance=1e-13, max_qr_iterations=3000
  )
  opt.step({"w": np.zeros((4, 6))}, {"w": g})
  st = opt.state["w"]
  for axis in range(2):
    stat, q = st["L"][axis], st["Q"][axis]
    _check_orthonormal(q)
    lam_true = np.linalg.eigvalsh(stat)[::-1]
    assert_close(st["eig"][axis], lam_true, atol=1e-9 * lam_true[0], rtol=1e-7)
    b = q.T @ stat @ q
    assert_close(b, np.diag(lam_true), atol=1e-9 * lam_true[0], rtol=1e-7)
  # The full-rank 4x4 factor has distinct eigenvalues: the basis is eigh's up to signs.
  _, q_eigh = eigh_descending(st["L"][0])
  assert_close(np.abs(q_eigh.T @ st["Q"][0]), np.eye(4), atol=1e-6, rtol=1e-7)


def test_first_basis_qr_one_iteration_is_sorted_power_step_from_identity():
  rng = np.random.default_rng(16)
  g = rng.normal(size=(3, 5))
  beta = 0.9
  opt = EShampooOracle(
    first_basis="qr", shampoo_beta=beta, refresh_tolerance=0.0, max_qr_iterations=1
  )
  opt.step({"w": np.zeros((3, 5))}, {"w": g})
  st = opt.state["w"]
  for axis in range(2):
    stat = (1 - beta) * axis_gram(g, axis)
    order = np.argsort(-np.diag(stat), kind="stable")
    assert_equal(st["order"][axis], order)
    assert_close(st["Q"][axis], np.linalg.qr(stat[:, order])[0], atol=1e-14, rtol=1e-7)
    assert_close(st["eig"][axis], np.diag(stat)[order], rtol=1e-14)
    assert st["refresh_count"][axis] == 0  # the first basis is not counted


def test_first_basis_qr_keeps_identity_for_diagonal_statistics():
  g = np.zeros((3, 4))
  g[0, 0], g[1, 1], g[2, 2] = 1.0, 3.0, 2.0  # G G^T and G^T G are diagonal, not sorted
  opt = EShampooOracle(first_basis="qr", refresh_tolerance=1e-3)
  opt.step({"w": np.zeros((3, 4))}, {"w": g})
  st = opt.state["w"]
  for axis, n in enumerate((3, 4)):
    assert_equal(st["Q"][axis], np.eye(n))
    assert_equal(st["order"][axis], np.arange(n))
    assert_close(st["eig"][axis], np.diag(st["L"][axis]), rtol=1e-7)


# -- rank-deficient first statistics -----------------------------------------------------------


@pytest.mark.parametrize(
  "oracle, kw",
  [
    (ShampooOracle, dict(grafting="adam")),
    (ShampooOracle, dict(grafting="none", b1=0.0)),
    (ShampooOracle, dict(grafting="rmsprop", method="qr", first_basis="qr")),
    (EShampooOracle, dict()),
    (EShampooOracle, dict(first_basis="qr")),
    (EigenAdafactorOracle, dict()),
  ],
)
def test_rectangular_parameter_stays_finite(oracle, kw):
  """(3, 10): the first 10x10 statistic has rank 3; nothing may blow up."""
  rng = np.random.default_rng(17)
  shapes = {"w": (3, 10), "t": (10, 3)}
  opt = oracle(lr=1e-2, precondition_frequency=2, **kw)
  params = _random_tree(rng, shapes)
  for g in _grad_seq(rng, 6, shapes):
    params = opt.step(params, g)
    _check_finite(params)
    for st in opt.state.values():
      for q in st["Q"]:
        _check_orthonormal(q, atol=1e-10)


# -- blocking ----------------------------------------------------------------------------------

BLOCK_CASES = {
  "divisible": (dict(w=(4, 6)), dict(block_size=2)),
  "ragged": (dict(w=(5, 7), v=(7,), s=()), dict(block_size=3, precondition_1d=True)),
  "merged": (dict(c=(2, 3, 10)), dict(block_size=4, merge_dims=True, max_precond_dim=8)),
}
BLOCK_ORACLES = {
  "shampoo_adam": (ShampooOracle, dict(b1=0.9, grafting="adam")),
  "shampoo_qr": (ShampooOracle, dict(b1=0.0, grafting="none", trace_scaling=True, method="qr")),
  "eshampoo": (EShampooOracle, dict()),
  "adafactor": (EigenAdafactorOracle, dict()),
}


def _split(tree, opt):
  """Each block of each parameter (working shape) as its own parameter ``name/i``."""
  out = {}
  for name, x in tree.items():
    work_shape, _ = opt.layout(np.shape(x))
    for i, index in enumerate(block_slices(work_shape, opt.block_size)):
      out[f"{name}/{i}"] = np.array(np.reshape(x, work_shape)[index])
  return out


@pytest.mark.parametrize("case", sorted(BLOCK_CASES))
@pytest.mark.parametrize("which", sorted(BLOCK_ORACLES))
def test_blocked_equals_independent_blocks(case, which):
  """A blocked parameter behaves as its blocks run as independent (unmerged) parameters."""
  shapes, layout_kw = BLOCK_CASES[case]
  oracle, kw = BLOCK_ORACLES[which]
  rng = np.random.default_rng(18)
  kw = dict(lr=1e-2, precondition_frequency=2, **kw)
  blocked = oracle(**kw, **layout_kw)
  ref_kw = dict(layout_kw, block_size=None, merge_dims=False)
  reference = oracle(**kw, **ref_kw)
  params = _random_tree(rng, shapes)
  ref_params = _split(params, blocked)
  for call, g in enumerate(_grad_seq(rng, 6, shapes)):
    params = blocked.step(params, g)
    ref_params = reference.step(ref_params, _split(g, blocked))
    if call == 0:  # overwrite one block's basis in both: the state is exposed per block
      name = "w" if "w" in shapes else "c"
      bs, ref_st = blocked.state[name]["blocks"][1], reference.state[f"{name}/1"]
      q = _random_orthogonal(rng, bs["Q"][0].shape[0])
      bs["Q"][0], ref_st["Q"][0] = q, q.copy()
    got = _split(params, blocked)
    for key in ref_params:
      assert_close(got[key], ref_params[key], rtol=1e-10, atol=1e-13)
    for name in shapes:
      for i, bs in enumerate(blocked.state[name]["blocks"]):
        ref_st = reference.state[f"{name}/{i}"]
        assert bs["factored"] == ref_st["factored"]
        for qa, qb in zip(bs["Q"], ref_st["Q"], strict=True):
          if qb is not None:
            assert_close(qa, qb, atol=1e-10, rtol=1e-7)


def test_blocking_factors_axes_longer_than_max_precond_dim():
  opt = EShampooOracle(block_size=4, max_precond_dim=5)
  opt.step({"w": np.zeros((3, 10))}, {"w": np.ones((3, 10))})
  st = opt.state["w"]
  assert [bs["work_shape"] for bs in st["blocks"]] == [(3, 4), (3, 4), (3, 2)]
  assert all(bs["factored"] == [True, True] for bs in st["blocks"])
  unblocked = EShampooOracle(max_precond_dim=5)
  unblocked.step({"w": np.zeros((3, 10))}, {"w": np.ones((3, 10))})
  assert unblocked.state["w"]["factored"] == [True, False]


def test_shampoo_grafting_norm_is_per_block():
  rng = np.random.default_rng(19)
  b1, b2, geps, lr = 0.9, 0.99, 1e-8, 0.1
  shape, block_size = (5, 7), 3
  opt = ShampooOracle(lr=lr, b1=b1, b2=b2, graft_eps=geps, block_size=block_size)
  params = opt.step({"w": rng.normal(size=shape)}, {"w": rng.normal(size=shape)})
  mu, nu = np.zeros(shape), np.zeros(shape)
  for t in range(1, 4):
    g = rng.normal(size=shape)
    new = opt.step(params, {"w": g})
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g**2
    graft = _graft_reference("adam", mu / (1 - b1**t), nu, b2, t, geps)
    step = (params["w"] - new["w"]) / lr
    for index in block_slices(shape, block_size):
      assert_close(np.linalg.norm(step[index]), np.linalg.norm(graft[index]), rtol=1e-12)
    params = new


# -- staggered refresh -------------------------------------------------------------------------


def test_stagger_phases_follow_greedy_rule_by_hand():
  shapes = {"b": (8,), "a": (4, 6)}
  params = {k: np.zeros(s) for k, s in shapes.items()}
  # Unblocked costs: a0 = 4^3 = 64, a1 = 6^3 = 216, b0 = 8^3 = 512. Descending: b0 -> phase 0,
  # a1 -> phase 1, a0 -> phase 2 (the emptiest).
  opt = ShampooOracle(lr=1.0, stagger=True, precondition_frequency=3, precondition_1d=True)
  opt.step(params, params)
  assert opt.phases == {"a": [2, 1], "b": [0]}
  # block_size 4 with b of length 12: a has 2 blocks, each axis costs 2 * 4^3 = 128 (the block
  # length of a1 is 4, not 6); b has 3 blocks, 3 * 4^3 = 192. b0 -> 0, then the tie a0, a1 in
  # order of appearance -> 1, 2.
  blocked = {"b": np.zeros(12), "a": np.zeros((4, 6))}
  opt = EShampooOracle(stagger=True, precondition_frequency=3, precondition_1d=True, block_size=4)
  opt.step(blocked, blocked)
  assert opt.phases == {"a": [1, 2], "b": [0]}
  # Two phases: 512 -> 0, 216 -> 1, then 64 -> 1 (280 < 512).
  opt = EigenAdafactorOracle(stagger=True, precondition_frequency=2, precondition_1d=True)
  opt.step(params, params)
  assert opt.phases == {"a": [1, 1], "b": [0]}
  # Without stagger every factor has phase 0.
  opt = ShampooOracle(lr=1.0, precondition_frequency=3, precondition_1d=True)
  opt.step(params, params)
  assert opt.phases == {"a": [0, 0], "b": [0]}


@pytest.mark.parametrize("block_size", [None, 3])
def test_stagger_refreshes_only_due_factors(block_size):
  rng = np.random.default_rng(20)
  shapes = {"a": (4, 6), "b": (5,)}
  freq = 3
  opt = ShampooOracle(
    lr=1e-2, stagger=True, precondition_frequency=freq, precondition_1d=True, block_size=block_size
  )

  def blocks(name):
    st = opt.state[name]
    return st["blocks"] if block_size else [st]

  params = opt.step(_random_tree(rng, shapes), _random_tree(rng, shapes))
  for t in range(1, 8):
    before = {k: [[q.copy() for q in bs["Q"]] for bs in blocks(k)] for k in shapes}
    counts = {k: [list(bs["refresh_count"]) for bs in blocks(k)] for k in shapes}
    params = opt.step(params, _random_tree(rng, shapes))
    for k in shapes:
      for i, bs in enumerate(blocks(k)):
        for axis, q in enumerate(bs["Q"]):
          due = t % freq == opt.phases[k][axis]
          assert bs["refresh_count"][axis] == counts[k][i][axis] + int(due)
          if not due:
            assert_equal(q, before[k][i][axis])


def test_stagger_moves_diagonal_only_along_refreshed_axes():
  rng = np.random.default_rng(22)
  b2, freq = 0.9, 2
  shape = (4, 5)
  opt = EShampooOracle(b2=b2, stagger=True, precondition_frequency=freq, refresh_tolerance=0.0)
  params = opt.step({"w": rng.normal(size=shape)}, {"w": rng.normal(size=shape)})
  st = opt.state["w"]
  assert sorted(opt.phases["w"]) == [0, 1]  # 5^3 -> phase 0, 4^3 -> phase 1
  for t in range(1, 7):
    d0, (ql, qr) = st["D"].copy(), st["Q"]
    g = rng.normal(size=shape)
    params = opt.step(params, {"w": g})
    want = b2 * d0 + (1 - b2) * (ql.T @ g @ qr) ** 2
    for axis in range(2):
      if t % freq == opt.phases["w"][axis]:
        want = np.take(want, st["order"][axis], axis=axis)
    assert_close(st["D"], want, rtol=1e-13)


def test_stagger_carries_momentum_exactly():
  rng = np.random.default_rng(23)
  shapes = {"w": (4, 6), "c": (2, 3, 4)}
  opt = EigenAdafactorOracle(stagger=True, precondition_frequency=3, block_size=3)
  params = _random_tree(rng, shapes)
  ema = {k: np.zeros(s) for k, s in shapes.items()}
  for t, g in enumerate(_grad_seq(rng, 8, shapes)):
    params = opt.step(params, g)
    if t > 0:
      ema = {k: 0.95 * ema[k] + 0.05 * g[k] for k in shapes}
    for k in shapes:
      m = np.zeros(shapes[k])
      for bs, index in zip(opt.state[k]["blocks"], opt.state[k]["slices"], strict=True):
        m[index] = bs["m"]
      assert_close(opt.project_back(k, m), ema[k], atol=1e-12, rtol=1e-7)
