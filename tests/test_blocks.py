"""Specification of the public blocks on their own, each checked against NumPy in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soap_optax import (
  KroneckerUpdate,
  LayoutRule,
  eigenbasis_refresh,
  kronecker_stats,
  rotated_adam,
)

BETA = 0.9
B1, B2 = 0.9, 0.99
# Large enough that adding eps to sqrt(v) (the reference) differs visibly from optax's placement.
EPS = 0.1
LR = 0.05
WD = 0.2


# -- NumPy helpers ---------------------------------------------------------------------------


def unfold(x, axis):
  """The mode-``axis`` unfolding ``X_(k)``: that axis first, all others flattened."""
  return np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def gram(x, axis):
  u = unfold(x, axis)
  return u @ u.T


def rotate(x, bases, *, into):
  """``x ×_k Q_kᵀ`` (into the bases) or ``x ×_k Q_k`` (out of them); ``None`` axes stay."""
  for axis, q in enumerate(bases):
    if q is None:
      continue
    mat = q.T if into else q
    x = np.moveaxis(np.tensordot(mat, x, axes=([1], [axis])), 0, axis)
  return x


def f64(x):
  return None if x is None else np.asarray(x, np.float64)


def assert_orthonormal(q, atol=1e-5):
  q = f64(q)
  np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=atol)


def relative_off_diagonal(matrix, q):
  b = f64(q).T @ f64(matrix) @ f64(q)
  return np.linalg.norm(b - np.diag(np.diag(b))) / np.linalg.norm(b)


def random_grads(seed, shapes, steps):
  rng = np.random.default_rng(seed)
  return [
    {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    for _ in range(steps)
  ]


def run(tx, params, grads):
  """Runs ``tx`` (jitted) over ``grads``; returns ``(outputs, states)`` after every call."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  outputs, states = [], []
  for g in grads:
    out, state = update(g, state, params)
    outputs.append(out)
    states.append(state)
  return outputs, states


# -- kronecker_stats ---------------------------------------------------------------------------

STATS_SHAPES = {"matrix": (4, 3), "tensor": (2, 3, 4), "wide": (3, 20)}


@pytest.fixture(scope="module")
def stats_run():
  """kronecker_stats with every axis up to 16 factored, over three steps."""
  tx = kronecker_stats(BETA, layout=LayoutRule(16))
  grads = random_grads(0, STATS_SHAPES, 3)
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state = tx.init(params)
  carriers, states = [], []
  for g in grads:
    c, state = tx.update(g, state)
    carriers.append(c)
    states.append(state)
  return grads, carriers, states


def expected_stats(grads, name, working_shape, factored):
  stats = [np.zeros((n, n)) if f else None for n, f in zip(working_shape, factored, strict=True)]
  history = []
  for g in grads:
    x = f64(g[name]).reshape(working_shape)
    stats = [None if s is None else BETA * s + (1 - BETA) * gram(x, k) for k, s in enumerate(stats)]
    history.append(stats)
  return history


def assert_stats_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected, strict=True):
    if e is None:
      assert a is None
    else:
      np.testing.assert_allclose(f64(a), e, rtol=1e-5, atol=1e-6)


def test_kronecker_stats_is_an_ema_of_the_gram_matrices_of_a_matrix(stats_run):
  grads, _, states = stats_run
  expected = expected_stats(grads, "matrix", (4, 3), (True, True))
  for state, want in zip(states, expected, strict=True):
    assert_stats_equal(state.stats["matrix"], want)


def test_kronecker_stats_contracts_all_other_axes_of_a_3d_tensor(stats_run):
  grads, _, states = stats_run
  expected = expected_stats(grads, "tensor", (2, 3, 4), (True, True, True))
  for state, want in zip(states, expected, strict=True):
    assert_stats_equal(state.stats["tensor"], want)


def test_kronecker_stats_keeps_no_statistic_for_an_axis_longer_than_the_limit(stats_run):
  grads, _, states = stats_run
  assert states[-1].stats["wide"][1] is None
  expected = expected_stats(grads, "wide", (3, 20), (True, False))
  assert_stats_equal(states[-1].stats["wide"], expected[-1])


def test_kronecker_stats_works_on_the_merged_shape():
  rule = LayoutRule(6, merge_dims=True)  # (2, 3, 4) -> (6, 4)
  tx = kronecker_stats(BETA, layout=rule)
  grads = random_grads(1, {"tensor": (2, 3, 4)}, 3)
  state = tx.init(grads[0])
  assert [s.shape for s in state.stats["tensor"]] == [(6, 6), (4, 4)]
  for g in grads:
    _, state = tx.update(g, state)
  expected = expected_stats(grads, "tensor", (6, 4), (True, True))
  assert_stats_equal(state.stats["tensor"], expected[-1])


def test_kronecker_stats_passes_on_a_carrier_per_parameter(stats_run):
  grads, carriers, states = stats_run
  carrier = carriers[1]["tensor"]
  assert isinstance(carrier, KroneckerUpdate)
  np.testing.assert_array_equal(carrier.grad, grads[1]["tensor"])
  assert carrier.layout == LayoutRule(16).layout((2, 3, 4))
  assert carrier.dtype == jnp.float32
  assert bool(carrier.finite)
  assert_stats_equal(carrier.stats, [f64(s) for s in states[1].stats["tensor"]])


def test_kronecker_stats_counts_the_updates_before_each_one(stats_run):
  _, carriers, states = stats_run
  assert [int(c["matrix"].count) for c in carriers] == [0, 1, 2]
  assert [int(s.count) for s in states] == [1, 2, 3]


def test_kronecker_stats_carrier_holds_the_gradient_in_the_working_shape():
  tx = kronecker_stats(BETA, layout=LayoutRule(6, merge_dims=True))
  g = {"tensor": jnp.arange(24.0).reshape(2, 3, 4)}
  carrier, _ = tx.update(g, tx.init(g))
  np.testing.assert_array_equal(carrier["tensor"].grad, np.arange(24.0).reshape(6, 4))
  np.testing.assert_array_equal(carrier["tensor"].restore(carrier["tensor"].grad), g["tensor"])


def test_kronecker_stats_are_float32_for_low_precision_gradients():
  tx = kronecker_stats(BETA, layout=LayoutRule())
  g = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  state = tx.init(g)
  carrier, state = tx.update(g, state)
  assert all(s.dtype == jnp.float32 for s in state.stats["w"])
  assert carrier["w"].grad.dtype == jnp.float32
  assert carrier["w"].dtype == jnp.bfloat16


def test_kronecker_stats_dtype_is_configurable():
  tx = kronecker_stats(BETA, layout=LayoutRule(), dtype=jnp.bfloat16)
  g = {"w": jnp.ones((3, 2), jnp.float32)}
  _, state = tx.update(g, tx.init(g))
  assert all(s.dtype == jnp.bfloat16 for s in state.stats["w"])


# -- eigenbasis_refresh and rotated_adam, run together -----------------------------------------

# (3-D parameters are covered against the reference optimizer in test_soap_matches_reference.)
SHAPES = {"matrix": (5, 4), "vector": (3,)}
STEPS = 35  # the init call and updates up to count 34: refreshes at 10, 20 and 30


def blocks(rule=None, frequency=10, method="qr"):
  rule = rule or LayoutRule()
  return (
    kronecker_stats(BETA, layout=rule),
    eigenbasis_refresh(frequency, layout=rule, method=method),
    rotated_adam(B1, B2, EPS),
  )


@pytest.fixture(scope="module")
def chain_run():
  """The three blocks with the default schedule; what each passes on and keeps, every call."""
  stats_tx, basis_tx, adam_tx = blocks()

  @jax.jit
  def step(grads, states):
    stats, basis, adam = states
    carriers, stats = stats_tx.update(grads, stats)
    carriers, basis = basis_tx.update(carriers, basis)
    updates, adam = adam_tx.update(carriers, adam)
    return carriers, updates, (stats, basis, adam)

  grads = random_grads(2, SHAPES, STEPS)
  states = tuple(tx.init(grads[0]) for tx in (stats_tx, basis_tx, adam_tx))
  history = []
  for g in grads:
    carriers, updates, states = step(g, states)
    history.append((carriers, updates, *states))
  return grads, history


def factors(tree):
  """(parameter, axis, value) for every factored axis."""
  return [
    (k, i, v) for k, per_axis in tree.items() for i, v in enumerate(per_axis) if v is not None
  ]


def test_only_factored_axes_get_a_basis(chain_run):
  _, history = chain_run
  basis = history[0][3].basis
  assert [q.shape for q in basis["matrix"]] == [(5, 5), (4, 4)]
  assert basis["vector"] == (None,)


def test_first_basis_is_orthonormal(chain_run):
  _, history = chain_run
  for _, _, q in factors(history[0][3].basis):
    assert_orthonormal(q)


def test_first_basis_diagonalises_the_statistic(chain_run):
  _, history = chain_run
  _, _, stats, bases, _ = history[0]
  for name, axis, q in factors(bases.basis):
    assert relative_off_diagonal(stats.stats[name][axis], q) < 1e-5


def test_first_eigenvalues_are_descending_and_match_numpy(chain_run):
  _, history = chain_run
  _, _, stats, bases, _ = history[0]
  for name, axis, w in factors(bases.eigenvalues):
    want = np.linalg.eigvalsh(f64(stats.stats[name][axis]))[::-1]
    w = f64(w)
    assert np.all(np.diff(w) <= 0)
    np.testing.assert_allclose(w, want, atol=1e-5 * want[0])


def test_first_update_is_computed_in_the_identity_basis(chain_run):
  """A step's basis never contains its own gradient: the first one has no basis yet."""
  _, history = chain_run
  carriers, _, _, bases, _ = history[0]
  for name, axis, q in factors(bases.basis):
    np.testing.assert_array_equal(carriers[name].basis[axis], np.eye(q.shape[0]))
    np.testing.assert_array_equal(carriers[name].next_basis[axis], q)


def test_bases_are_refreshed_exactly_at_counts_10_20_30(chain_run):
  _, history = chain_run
  for count, (*_, bases, _) in enumerate(history):
    for name, axis, refreshes in factors(bases.refreshes):
      assert int(refreshes) == 1 + count // 10, (count, name, axis)


def test_bases_do_not_change_between_refreshes(chain_run):
  _, history = chain_run
  for count in range(1, STEPS):
    old, new = history[count - 1][3], history[count][3]
    changed = [not np.array_equal(q, old.basis[name][axis]) for name, axis, q in factors(new.basis)]
    assert all(changed) if count % 10 == 0 else not any(changed), count


def test_a_refresh_is_used_from_the_next_step_on(chain_run):
  """The carrier of a refresh step holds the old basis and passes the refreshed one on."""
  _, history = chain_run
  carriers, _, _, bases, _ = history[10]
  for name, axis, q in factors(bases.basis):
    np.testing.assert_array_equal(carriers[name].basis[axis], history[9][3].basis[name][axis])
    np.testing.assert_array_equal(carriers[name].next_basis[axis], q)
    assert bool(carriers[name].refreshed[axis])
    assert not bool(history[11][0][name].refreshed[axis])


@pytest.mark.parametrize("count", [10, 20])
def test_scheduled_refresh_is_a_sorted_power_step_followed_by_qr(count, chain_run):
  _, history = chain_run
  stats, bases = history[count][2], history[count][3]
  for name, axis, q_new in factors(bases.basis):
    stat = f64(stats.stats[name][axis])  # includes this step's gradient
    q_old = f64(history[count - 1][3].basis[name][axis])
    order = np.argsort(-np.diag(q_old.T @ stat @ q_old), kind="stable")
    want, _ = np.linalg.qr(stat @ q_old[:, order])
    q_new = f64(q_new)
    signs = np.sign(np.sum(q_new * want, axis=0))  # QR is unique up to column signs
    np.testing.assert_allclose(q_new * signs, want, atol=1e-4)


def test_refreshed_bases_stay_orthonormal_over_many_steps(chain_run):
  _, history = chain_run
  for *_, bases, _ in history:
    for _, _, q in factors(bases.basis):
      assert_orthonormal(q)


def test_eigh_method_refreshes_to_the_exact_eigenbasis():
  stats_tx, basis_tx, _ = blocks(frequency=3, method="eigh")
  tx = optax.chain(stats_tx, basis_tx)
  grads = random_grads(3, {"matrix": (5, 4)}, 7)
  _, states = run(tx, grads[0], grads)
  for count in (0, 3, 6):
    stats, bases = states[count]
    for name, axis, q in factors(bases.basis):
      stat = stats.stats[name][axis]
      assert_orthonormal(q)
      assert relative_off_diagonal(stat, q) < 1e-5
      want = np.linalg.eigvalsh(f64(stat))[::-1]
      np.testing.assert_allclose(f64(bases.eigenvalues[name][axis]), want, atol=1e-5 * want[0])
  assert [int(r) for r in states[-1][1].refreshes["matrix"]] == [3, 3]


def test_an_unknown_refresh_method_is_rejected():
  with pytest.raises(ValueError, match="method"):
    eigenbasis_refresh(method="svd")


def test_rotated_adam_with_nothing_factored_is_adam_with_the_reference_conventions():
  """First call zero; then ``-lr·√(1−b2ᵗ)/(1−b1ᵗ)·m/(√v + eps)`` with ``t`` the update number."""
  shapes = {"matrix": (3, 4), "vector": (5,), "scalar": ()}
  tx = optax.chain(*blocks(LayoutRule(0)), optax.scale_by_learning_rate(LR))
  grads = random_grads(5, shapes, 6)
  updates, _ = run(tx, grads[0], grads)
  for name, shape in shapes.items():
    np.testing.assert_array_equal(updates[0][name], np.zeros(shape))
    m = v = 0.0
    for t, (g, u) in enumerate(zip(grads[1:], updates[1:], strict=True), start=1):
      g = f64(g[name])
      m = B1 * m + (1 - B1) * g
      v = B2 * v + (1 - B2) * g * g
      want = -LR * np.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + EPS)
      np.testing.assert_allclose(f64(u[name]), want, rtol=1e-5, atol=1e-7)


def test_rotated_adam_first_call_returns_zero_and_keeps_zero_moments(chain_run):
  _, history = chain_run
  _, updates, _, _, adam = history[0]
  for name, shape in SHAPES.items():
    np.testing.assert_array_equal(updates[name], np.zeros(shape))
    np.testing.assert_array_equal(adam.mu[name], np.zeros(shape))
    np.testing.assert_array_equal(adam.nu[name], np.zeros(shape))


@pytest.mark.parametrize("name", SHAPES)
def test_rotated_adam_update_is_adam_in_the_basis_of_the_step(name, chain_run):
  """Each update is Adam's bias-corrected direction computed in the step's (old) basis."""
  grads, history = chain_run
  for count in range(1, STEPS):
    old_bases, old_adam = history[count - 1][3], history[count - 1][4]
    q_old = [f64(q) for q in old_bases.basis[name]]
    rotated = rotate(f64(grads[count][name]), q_old, into=True)
    m = B1 * f64(old_adam.mu[name]) + (1 - B1) * rotated
    v = B2 * f64(old_adam.nu[name]) + (1 - B2) * rotated**2
    scale = np.sqrt(1 - B2**count) / (1 - B1**count)
    want = scale * rotate(m / (np.sqrt(v) + EPS), q_old, into=False)
    np.testing.assert_allclose(f64(history[count][1][name]), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", SHAPES)
def test_first_moment_is_rotated_exactly_into_each_new_basis(name, chain_run):
  """Held in the current basis, the first moment is the parameter-space EMA of the gradients."""
  grads, history = chain_run
  m = np.zeros(SHAPES[name])
  for g, (*_, bases, adam) in zip(grads[1:], history[1:], strict=True):
    m = B1 * m + (1 - B1) * f64(g[name])
    q = [f64(q) for q in bases.basis[name]]
    np.testing.assert_allclose(rotate(f64(adam.mu[name]), q, into=False), m, atol=1e-5)


@pytest.mark.parametrize("count", [10, 20, 30])
def test_second_moment_is_permuted_with_the_refresh_order(count, chain_run):
  grads, history = chain_run
  name = "matrix"
  old_bases, old_adam = history[count - 1][3], history[count - 1][4]
  stats, new_adam = history[count][2], history[count][4]
  q_old = [f64(q) for q in old_bases.basis[name]]
  rotated = rotate(f64(grads[count][name]), q_old, into=True)
  v = B2 * f64(old_adam.nu[name]) + (1 - B2) * rotated**2
  for axis, q in enumerate(q_old):
    stat = f64(stats.stats[name][axis])
    v = np.take(v, np.argsort(-np.diag(q.T @ stat @ q), kind="stable"), axis=axis)
  np.testing.assert_allclose(f64(new_adam.nu[name]), v, rtol=1e-4, atol=1e-7)


# -- composing the blocks with optax ---------------------------------------------------------

SMALL = {"matrix": (3, 2)}


@pytest.fixture(scope="module")
def small_run():
  """Params, gradients with a large norm, and the bare blocks' update function."""
  params = random_grads(7, SMALL, 1)[0]
  grads = [jax.tree.map(lambda g: 10 * g, g) for g in random_grads(8, SMALL, 5)]
  bare = optax.chain(*blocks(frequency=2))
  return params, grads, bare, jax.jit(bare.update)


def test_users_can_chain_rotated_adam_with_standard_weight_decay_and_learning_rate(small_run):
  params, grads, bare, bare_update = small_run
  custom = optax.chain(
    *blocks(frequency=2), optax.add_decayed_weights(WD), optax.scale_by_learning_rate(LR)
  )
  custom_update = jax.jit(custom.update)
  state, bare_state = custom.init(params), bare.init(params)
  for g in grads:
    updates, state = custom_update(g, state, params)
    bare_updates, bare_state = bare_update(g, bare_state, params)
    want = -LR * (f64(bare_updates["matrix"]) + WD * f64(params["matrix"]))
    np.testing.assert_allclose(f64(updates["matrix"]), want, rtol=1e-5, atol=1e-7)


def test_standard_transforms_compose_in_front_of_the_blocks(small_run):
  params, grads, bare, bare_update = small_run
  clipped = optax.chain(optax.clip_by_global_norm(1.0), *blocks(frequency=2))
  clipped_update = jax.jit(clipped.update)
  state, bare_state = clipped.init(params), bare.init(params)
  for g in grads:
    norm = np.linalg.norm(f64(g["matrix"]))
    updates, state = clipped_update(g, state, params)
    g_clipped = {"matrix": g["matrix"] * np.float32(min(1.0, 1.0 / norm))}
    bare_updates, bare_state = bare_update(g_clipped, bare_state, params)
    np.testing.assert_allclose(updates["matrix"], bare_updates["matrix"], rtol=1e-4, atol=1e-6)
  assert np.max(np.abs(f64(updates["matrix"]))) > 0


# -- placing the blocks in the wrong order -------------------------------------------------------

WRONG = {"matrix": jnp.ones((3, 2)), "vector": jnp.ones((2,))}


def _update_once(tx):
  """Traces one update (abstractly: the error must come before any computation)."""
  jax.eval_shape(lambda: tx.update(WRONG, tx.init(WRONG), WRONG))


def test_rotated_adam_without_eigenbasis_refresh_raises_a_clear_type_error():
  rule = LayoutRule()
  tx = optax.chain(kronecker_stats(layout=rule), rotated_adam())
  with pytest.raises(TypeError, match="eigenbasis_refresh"):
    _update_once(tx)


def test_rotated_adam_on_plain_gradients_raises_a_clear_type_error():
  with pytest.raises(TypeError, match="eigenbasis_refresh"):
    _update_once(rotated_adam())


def test_eigenbasis_refresh_on_plain_gradients_raises_a_clear_type_error():
  with pytest.raises(TypeError, match="kronecker_stats"):
    _update_once(eigenbasis_refresh())


def test_a_standard_transform_between_kronecker_stats_and_eigenbasis_refresh_raises_a_clear_error():
  """A transform that maps over the record (e.g. a scaling) is caught by the next block."""
  rule = LayoutRule()
  tx = optax.chain(
    kronecker_stats(layout=rule), optax.scale(0.5), eigenbasis_refresh(layout=rule), rotated_adam()
  )
  with pytest.raises(TypeError, match="kronecker_stats") as error:
    _update_once(tx)
  assert "eigenbasis_refresh" in str(error.value)


def test_a_transform_that_cannot_handle_the_record_fails_loudly():
  """clip_by_global_norm fails inside optax, before our next block can explain; it must still
  fail rather than corrupt the record's integer fields silently."""
  rule = LayoutRule()
  tx = optax.chain(
    kronecker_stats(layout=rule),
    optax.clip_by_global_norm(1.0),
    eigenbasis_refresh(layout=rule),
    rotated_adam(),
  )
  with pytest.raises(TypeError):
    _update_once(tx)


def test_a_standard_transform_between_eigenbasis_refresh_and_rotated_adam_raises_a_clear_error():
  rule = LayoutRule()
  tx = optax.chain(
    kronecker_stats(layout=rule), eigenbasis_refresh(layout=rule), optax.scale(0.5), rotated_adam()
  )
  with pytest.raises(TypeError, match="eigenbasis_refresh") as error:
    _update_once(tx)
  assert "rotated_adam" in str(error.value)


def test_blocks_built_with_different_layout_rules_raise_a_clear_error():
  tx = optax.chain(
    kronecker_stats(layout=LayoutRule(2)), eigenbasis_refresh(layout=LayoutRule()), rotated_adam()
  )
  with pytest.raises(ValueError, match="LayoutRule"):
    _update_once(tx)
