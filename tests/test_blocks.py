"""Specification of the public blocks on their own, each checked against NumPy in float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runner import assert_close, assert_equal

from soap_optax import (
  KroneckerUpdate,
  LayoutRule,
  _linalg,
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


def assert_orthonormal(q, atol):
  q = f64(q)
  assert_close(q.T @ q, np.eye(q.shape[0]), rtol=0, atol=atol)


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


def single(x):
  """The one block of a ``(1, …)`` working-layout array (a parameter not cut into blocks)."""
  assert x.shape[0] == 1, x.shape
  return x[0]


def per_axis(keyed, name, rank):
  """Parameter ``name``'s entries of a keyed state field (keys ``"<name>:<axis>"``): one per
  working axis, its single block, or None where that axis has no factor."""
  keys = {key for key in keyed if key.rpartition(":")[0] == name}
  assert keys <= {f"{name}:{axis}" for axis in range(rank)}, keys
  return [single(keyed[f"{name}:{a}"]) if f"{name}:{a}" in keyed else None for a in range(rank)]


def factors(keyed, names=("matrix",)):
  """``(key, parameter, axis, single block)`` for the entries of parameters ``names`` (not cut
  into blocks) in a keyed state field."""
  out = []
  for key, value in keyed.items():
    name, _, axis = key.rpartition(":")
    if name in names:
      out.append((key, name, int(axis), single(value)))
  assert out, "no factors to check"
  return out


def numpy_blocks(x, block_shape):
  """``x`` cut into blocks (the last one of each axis zero-padded), in row-major grid order, as
  ``(num_blocks, *block_shape)``: the working layout, computed independently of the library."""
  grid = [-(-n // b) for n, b in zip(x.shape, block_shape, strict=True)]
  padded = np.zeros([g * b for g, b in zip(grid, block_shape, strict=True)])
  padded[tuple(slice(0, n) for n in x.shape)] = x
  return np.stack(
    [
      padded[tuple(slice(i * b, (i + 1) * b) for i, b in zip(index, block_shape, strict=True))]
      for index in np.ndindex(*grid)
    ]
  )


# -- kronecker_stats ---------------------------------------------------------------------------

STATS_SHAPES = {"matrix": (4, 3), "tensor": (2, 3, 4), "wide": (3, 20)}
# float32 statistics against float64 NumPy: measured at most 3.5e-7 absolute (entries up to 7.6).
STATS_ATOL = 2e-6


@pytest.fixture(scope="module")
def stats_run():
  """kronecker_stats with every axis up to 16 factored, over three steps."""
  tx = kronecker_stats(BETA, layout=LayoutRule(16))
  grads = random_grads(0, STATS_SHAPES, 3)
  params = jax.tree.map(jnp.zeros_like, grads[0])
  state, update = tx.init(params), jax.jit(tx.update)
  carriers, states = [], []
  for g in grads:
    c, state = update(g, state)
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
  assert any(e is not None for e in expected), "no statistics to check"
  for a, e in zip(actual, expected, strict=True):
    if e is None:
      assert a is None
    else:
      assert_close(f64(a), e, rtol=0, atol=STATS_ATOL)


def test_kronecker_stats_keys_each_factor_by_parameter_path_and_axis(stats_run):
  _, _, states = stats_run
  shapes = {key: s.shape for key, s in states[0].stats.items()}
  assert shapes == {
    "matrix:0": (1, 4, 4),
    "matrix:1": (1, 3, 3),
    "tensor:0": (1, 2, 2),
    "tensor:1": (1, 3, 3),
    "tensor:2": (1, 4, 4),
    "wide:0": (1, 3, 3),
  }


def test_kronecker_stats_keys_nested_parameters_by_their_path():
  tx = kronecker_stats(BETA, layout=LayoutRule())
  params = {"layers": [{"kernel": jnp.ones((3, 2))}], "head": {"w": jnp.ones((2, 2))}}
  keys = sorted(tx.init(params).stats)
  assert keys == ["head/w:0", "head/w:1", "layers/0/kernel:0", "layers/0/kernel:1"]


def test_kronecker_stats_is_an_ema_of_the_gram_matrices_of_a_matrix(stats_run):
  grads, _, states = stats_run
  expected = expected_stats(grads, "matrix", (4, 3), (True, True))
  for state, want in zip(states, expected, strict=True):
    assert_stats_equal(per_axis(state.stats, "matrix", 2), want)


def test_kronecker_stats_contracts_all_other_axes_of_a_3d_tensor(stats_run):
  grads, _, states = stats_run
  expected = expected_stats(grads, "tensor", (2, 3, 4), (True, True, True))
  for state, want in zip(states, expected, strict=True):
    assert_stats_equal(per_axis(state.stats, "tensor", 3), want)


def test_kronecker_stats_keeps_no_statistic_for_an_axis_longer_than_the_limit(stats_run):
  grads, _, states = stats_run
  assert "wide:1" not in states[-1].stats
  expected = expected_stats(grads, "wide", (3, 20), (True, False))
  assert_stats_equal(per_axis(states[-1].stats, "wide", 2), expected[-1])


def test_kronecker_stats_works_on_the_merged_shape():
  rule = LayoutRule(6, merge_dims=True)  # (2, 3, 4) -> (6, 4)
  tx = kronecker_stats(BETA, layout=rule)
  grads = random_grads(1, {"tensor": (2, 3, 4)}, 3)
  state = tx.init(grads[0])
  assert {k: s.shape for k, s in state.stats.items()} == {
    "tensor:0": (1, 6, 6),
    "tensor:1": (1, 4, 4),
  }
  for g in grads:
    _, state = tx.update(g, state)
  expected = expected_stats(grads, "tensor", (6, 4), (True, True))
  assert_stats_equal(per_axis(state.stats, "tensor", 2), expected[-1])


def test_kronecker_stats_passes_on_a_carrier_per_parameter(stats_run):
  grads, carriers, states = stats_run
  carrier = carriers[1]["tensor"]
  assert isinstance(carrier, KroneckerUpdate)
  assert carrier.name == "tensor"
  assert carrier.grad.shape == (1, 2, 3, 4)
  assert_equal(single(carrier.grad), grads[1]["tensor"])
  assert carrier.layout == LayoutRule(16).layout((2, 3, 4))
  assert carrier.dtype == jnp.float32
  assert bool(carrier.finite)
  want = [f64(s) for s in per_axis(states[1].stats, "tensor", 3)]
  assert_stats_equal([single(s) for s in carrier.stats], want)


def test_kronecker_stats_counts_the_updates_before_each_one(stats_run):
  _, carriers, states = stats_run
  assert [int(c["matrix"].count) for c in carriers] == [0, 1, 2]
  assert [int(s.count) for s in states] == [1, 2, 3]
  assert [int(s.skipped) for s in states] == [0, 0, 0]


def test_kronecker_stats_carrier_holds_the_gradient_in_the_working_shape():
  tx = kronecker_stats(BETA, layout=LayoutRule(6, merge_dims=True))
  g = {"tensor": jnp.arange(24.0).reshape(2, 3, 4)}
  carrier, _ = tx.update(g, tx.init(g))
  assert carrier["tensor"].grad.shape == (1, 6, 4)
  assert_equal(single(carrier["tensor"].grad), np.arange(24.0).reshape(6, 4))
  assert_equal(carrier["tensor"].restore(carrier["tensor"].grad), g["tensor"])


def test_kronecker_stats_are_float32_for_low_precision_gradients():
  tx = kronecker_stats(BETA, layout=LayoutRule())
  g = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  state = tx.init(g)
  carrier, state = tx.update(g, state)
  assert {s.dtype for s in state.stats.values()} == {jnp.dtype(jnp.float32)}
  assert carrier["w"].grad.dtype == jnp.float32
  assert carrier["w"].dtype == jnp.bfloat16


def test_kronecker_stats_dtype_is_configurable():
  tx = kronecker_stats(BETA, layout=LayoutRule(), dtype=jnp.bfloat16)
  g = {"w": jnp.ones((3, 2), jnp.float32)}
  _, state = tx.update(g, tx.init(g))
  assert {s.dtype for s in state.stats.values()} == {jnp.dtype(jnp.bfloat16)}


# -- kronecker_stats on parameters cut into blocks ------------------------------------------------

BLOCK = 3
BLOCKED_RULE = LayoutRule(block_size=BLOCK)
# (5, 7) -> a 2 x 3 grid of 3 x 3 blocks, the last row and column ragged (2 and 1 real entries);
# (2, 4, 3) -> 2 blocks of (2, 3, 3) along the middle axis, the second ragged (1 real entry).
BLOCKED_SHAPES = {"matrix": (5, 7), "tensor": (2, 4, 3)}


def block_shape_of(shape):
  return tuple(min(n, BLOCK) for n in shape)


@pytest.fixture(scope="module")
def blocked_stats_run():
  tx = kronecker_stats(BETA, layout=BLOCKED_RULE)
  grads = random_grads(9, BLOCKED_SHAPES, 3)
  state, update = tx.init(grads[0]), jax.jit(tx.update)
  carriers, states = [], []
  for g in grads:
    c, state = update(g, state)
    carriers.append(c)
    states.append(state)
  return grads, carriers, states


def test_a_blocked_parameter_has_one_statistic_per_block_and_axis(blocked_stats_run):
  _, _, states = blocked_stats_run
  shapes = {key: s.shape for key, s in states[0].stats.items()}
  assert shapes == {
    "matrix:0": (6, 3, 3),
    "matrix:1": (6, 3, 3),
    "tensor:0": (2, 2, 2),
    "tensor:1": (2, 3, 3),
    "tensor:2": (2, 3, 3),
  }


def test_a_blocked_parameter_travels_as_zero_padded_blocks(blocked_stats_run):
  grads, carriers, _ = blocked_stats_run
  for name, shape in BLOCKED_SHAPES.items():
    carrier = carriers[-1][name]
    want = numpy_blocks(f64(grads[-1][name]), block_shape_of(shape))
    assert_equal(f64(carrier.grad), want)
    assert_equal(carrier.restore(carrier.grad), grads[-1][name])


def test_statistics_of_a_blocked_parameter_are_each_block_s_gram_matrices(blocked_stats_run):
  """Every block's factor is the EMA of that (zero-padded) block's own Gram matrix."""
  grads, _, states = blocked_stats_run
  checked = 0
  for name, shape in BLOCKED_SHAPES.items():
    block_shape = block_shape_of(shape)
    want = [0.0] * len(shape)
    for g, state in zip(grads, states, strict=True):
      blocks = numpy_blocks(f64(g[name]), block_shape)
      for axis in range(len(shape)):
        grams = np.stack([gram(b, axis) for b in blocks])
        want[axis] = BETA * want[axis] + (1 - BETA) * grams
        got = f64(state.stats[f"{name}:{axis}"])
        assert_close(got, want[axis], rtol=0, atol=STATS_ATOL)
        checked += 1
  assert checked == 3 * 5


def test_zero_padding_leaves_a_ragged_block_with_the_statistics_of_its_real_part(
  blocked_stats_run,
):
  """The last block of the (5, 7) matrix holds rows 3:5 and column 6: its factors are those of
  that 2 x 1 piece alone, and exactly zero on the padding."""
  grads, _, states = blocked_stats_run
  last = 5  # row-major in the 2 x 3 grid
  want = [np.zeros((2, 2)), np.zeros((1, 1))]
  for g, state in zip(grads, states, strict=True):
    piece = f64(g["matrix"])[3:5, 6:7]
    for axis, real in enumerate((2, 1)):
      want[axis] = BETA * want[axis] + (1 - BETA) * gram(piece, axis)
      stat = f64(state.stats[f"matrix:{axis}"][last])
      assert_close(stat[:real, :real], want[axis], rtol=0, atol=STATS_ATOL)
      assert_equal(stat[real:, :], 0)
      assert_equal(stat[:, real:], 0)


# -- eigenbasis_refresh and rotated_adam, run together -----------------------------------------

# One compiled chain, run once, serves this section and the next two. (3-D parameters are
# covered against the reference optimizer in test_soap_matches_reference.)
SHAPES = {"matrix": (5, 4), "vector": (3,)}
RANKS = {name: len(shape) for name, shape in SHAPES.items()}
# Beside them, a (7, 7) matrix cut into blocks of 5, two of them ragged (see "ragged blocks"
# below). No axis of SHAPES is longer than 5, so this rule lays them out as the default one does.
RAGGED_SHAPE, RAGGED_BLOCK = (7, 7), 5
CHAIN_RULE = LayoutRule(block_size=RAGGED_BLOCK)
CHAIN_SHAPES = {**SHAPES, "ragged": RAGGED_SHAPE}
STEPS = 35  # the init call and updates up to count 34: refreshes at 10, 20 and 30
# float32 bases against float64 NumPy, measured at most: |QᵀQ − I| 5.6e-7; eigenvalues 2.7e-7 of
# the largest; ‖B − diag B‖/‖B‖ of an eigh basis 3.0e-7; a QR refresh's columns 2.4e-7.
ORTHONORMAL_ATOL = 3e-6
EIGENVALUE_ATOL = 2e-6  # times the largest eigenvalue
DIAGONAL_RATIO = 2e-6
QR_ATOL = 2e-6


def blocks(rule=None, frequency=10, method="qr"):
  rule = rule or LayoutRule()
  return (
    kronecker_stats(BETA, layout=rule),
    eigenbasis_refresh(frequency, layout=rule, method=method),
    rotated_adam(B1, B2, EPS),
  )


def jitted_blocks(rule=None, frequency=10):
  """The three blocks' init and jitted step, returning what each passes on and keeps."""
  stats_tx, basis_tx, adam_tx = blocks(rule, frequency)

  @jax.jit
  def step(grads, states):
    stats, basis, adam = states
    carriers, stats = stats_tx.update(grads, stats)
    carriers, basis = basis_tx.update(carriers, basis)
    updates, adam = adam_tx.update(carriers, adam)
    return carriers, updates, (stats, basis, adam)

  def init(params):
    return tuple(tx.init(params) for tx in (stats_tx, basis_tx, adam_tx))

  return init, step


def history_of(init, step, grads):
  """``(carriers, updates, stats, bases, adam)`` after every call."""
  states = init(grads[0])
  history = []
  for g in grads:
    carriers, updates, states = step(g, states)
    history.append((carriers, updates, *states))
  return history


@functools.cache
def chain_blocks():
  """``(init, jitted step)`` of the three blocks with the default schedule, compiled once."""
  return jitted_blocks(CHAIN_RULE)


@pytest.fixture(scope="module")
def chain_run():
  """The three blocks with the default schedule; what each passes on and keeps, every call."""
  grads = random_grads(2, CHAIN_SHAPES, STEPS)
  return grads, history_of(*chain_blocks(), grads)


def test_only_factored_axes_get_a_basis(chain_run):
  _, history = chain_run
  basis = history[0][3].basis
  assert {key: q.shape for key, q in basis.items()} == {
    "matrix:0": (1, 5, 5),
    "matrix:1": (1, 4, 4),
    "ragged:0": (4, 5, 5),  # one per block
    "ragged:1": (4, 5, 5),
  }
  assert history[0][0]["vector"].basis == (None,)


def test_first_basis_is_orthonormal(chain_run):
  _, history = chain_run
  for *_, q in factors(history[0][3].basis):
    assert_orthonormal(q, ORTHONORMAL_ATOL)


def test_first_basis_diagonalises_the_statistic(chain_run):
  _, history = chain_run
  _, _, stats, bases, _ = history[0]
  for key, _, _, q in factors(bases.basis):
    assert relative_off_diagonal(single(stats.stats[key]), q) < DIAGONAL_RATIO


def test_first_eigenvalues_are_descending_and_match_numpy(chain_run):
  _, history = chain_run
  _, _, stats, bases, _ = history[0]
  for key, _, _, w in factors(bases.eigenvalues):
    want = np.linalg.eigvalsh(f64(single(stats.stats[key])))[::-1]
    w = f64(w)
    assert np.all(np.diff(w) <= 0)
    assert_close(w, want, rtol=0, atol=EIGENVALUE_ATOL * want[0])


def test_first_update_is_computed_in_the_identity_basis(chain_run):
  """A step's basis never contains its own gradient: the first one has no basis yet."""
  _, history = chain_run
  carriers, _, _, bases, _ = history[0]
  for _, name, axis, q in factors(bases.basis):
    assert_equal(single(carriers[name].basis[axis]), np.eye(q.shape[0]))
    assert_equal(single(carriers[name].next_basis[axis]), q)


def test_bases_are_refreshed_exactly_at_counts_10_20_30(chain_run):
  _, history = chain_run
  for count, (*_, bases, _) in enumerate(history):
    for key, *_, refreshes in factors(bases.refreshes):
      assert int(refreshes) == 1 + count // 10, (count, key)


def test_bases_do_not_change_between_refreshes(chain_run):
  _, history = chain_run
  for count in range(1, STEPS):
    old, new = history[count - 1][3], history[count][3]
    bases = [(q, single(old.basis[key])) for key, *_, q in factors(new.basis)]
    assert bases and all(np.all(np.isfinite(q)) for q, _ in bases), count  # a NaN is a change
    changed = [not np.array_equal(q, q_old) for q, q_old in bases]
    assert all(changed) if count % 10 == 0 else not any(changed), count


def test_a_refresh_is_used_from_the_next_step_on(chain_run):
  """The carrier of a refresh step holds the old basis and passes the refreshed one on."""
  _, history = chain_run
  carriers, _, _, bases, _ = history[10]
  for key, name, axis, q in factors(bases.basis):
    old = single(history[9][3].basis[key])
    assert_equal(single(carriers[name].basis[axis]), old)
    assert_equal(single(carriers[name].next_basis[axis]), q)
    assert bool(single(carriers[name].refreshed[axis]))
    assert not bool(single(history[11][0][name].refreshed[axis]))


@pytest.mark.parametrize("count", [10, 20])
def test_scheduled_refresh_is_a_sorted_power_step_followed_by_qr(count, chain_run):
  _, history = chain_run
  stats, bases = history[count][2], history[count][3]
  for key, *_, q_new in factors(bases.basis):
    stat = f64(single(stats.stats[key]))  # includes this step's gradient
    q_old = f64(single(history[count - 1][3].basis[key]))
    order = np.argsort(-np.diag(q_old.T @ stat @ q_old), kind="stable")
    want, _ = np.linalg.qr(stat @ q_old[:, order])
    q_new = f64(q_new)
    signs = np.sign(np.sum(q_new * want, axis=0))  # QR is unique up to column signs
    assert_close(q_new * signs, want, rtol=0, atol=QR_ATOL)


def test_refreshed_bases_stay_orthonormal_over_many_steps(chain_run):
  _, history = chain_run
  for *_, bases, _ in history:
    for *_, q in factors(bases.basis):
      assert_orthonormal(q, ORTHONORMAL_ATOL)


def test_a_stack_is_orthonormalized_matrix_by_matrix():
  """The refresh's QR of a (blocks, n, n) stack (looped on GPUs, batched elsewhere) is the QR of
  each matrix on its own."""
  from soap_optax import _linalg

  stack = np.random.default_rng(3).standard_normal((2, 3, 5, 5)).astype(np.float32)
  q = np.asarray(jax.jit(_linalg.orthonormalize)(stack))
  assert q.shape == stack.shape
  for index in np.ndindex(2, 3):
    want = np.linalg.qr(stack[index].astype(np.float64))[0]
    signs = np.sign(np.sum(q[index] * want, axis=0))  # QR is unique up to column signs
    assert_close(q[index] * signs, want, rtol=0, atol=1e-5)


def test_eigh_method_refreshes_to_the_exact_eigenbasis():
  stats_tx, basis_tx, _ = blocks(frequency=3, method="eigh")
  tx = optax.chain(stats_tx, basis_tx)
  grads = random_grads(3, {"matrix": (5, 4)}, 7)
  _, states = run(tx, grads[0], grads)
  for count in (0, 3, 6):
    stats, bases = states[count]
    for key, *_, q in factors(bases.basis):
      stat = single(stats.stats[key])
      assert_orthonormal(q, ORTHONORMAL_ATOL)
      assert relative_off_diagonal(stat, q) < DIAGONAL_RATIO
      want = np.linalg.eigvalsh(f64(stat))[::-1]
      w = f64(single(bases.eigenvalues[key]))
      assert_close(w, want, rtol=0, atol=EIGENVALUE_ATOL * want[0])
  assert {k: int(single(r)) for k, r in states[-1][1].refreshes.items()} == {
    "matrix:0": 3,
    "matrix:1": 3,
  }


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
    assert_equal(updates[0][name], np.zeros(shape))
    m = v = 0.0
    for t, (g, u) in enumerate(zip(grads[1:], updates[1:], strict=True), start=1):
      g = f64(g[name])
      m = B1 * m + (1 - B1) * g
      v = B2 * v + (1 - B2) * g * g
      want = -LR * np.sqrt(1 - B2**t) / (1 - B1**t) * m / (np.sqrt(v) + EPS)
      # Measured: 1.7e-6 relative (float32 rounding).
      assert_close(f64(u[name]), want, rtol=1e-5, atol=0)


def test_rotated_adam_first_call_returns_zero_and_keeps_zero_moments(chain_run):
  _, history = chain_run
  _, updates, _, _, adam = history[0]
  for name, shape in SHAPES.items():
    assert_equal(updates[name], np.zeros(shape))
    assert_equal(adam.mu[name], np.zeros(shape))
    assert_equal(adam.nu[name], np.zeros(shape))


@pytest.mark.parametrize("name", SHAPES)
def test_rotated_adam_update_is_adam_in_the_basis_of_the_step(name, chain_run):
  """Each update is Adam's bias-corrected direction computed in the step's (old) basis."""
  grads, history = chain_run
  for count in range(1, STEPS):
    old_bases, old_adam = history[count - 1][3], history[count - 1][4]
    q_old = [f64(q) for q in per_axis(old_bases.basis, name, RANKS[name])]
    rotated = rotate(f64(grads[count][name]), q_old, into=True)
    m = B1 * f64(old_adam.mu[name]) + (1 - B1) * rotated
    v = B2 * f64(old_adam.nu[name]) + (1 - B2) * rotated**2
    scale = np.sqrt(1 - B2**count) / (1 - B1**count)
    want = scale * rotate(m / (np.sqrt(v) + EPS), q_old, into=False)
    # Measured: 8.4e-7 absolute for entries up to 0.75.
    assert_close(f64(history[count][1][name]), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SHAPES)
def test_first_moment_is_rotated_exactly_into_each_new_basis(name, chain_run):
  """Held in the current basis, the first moment is the parameter-space EMA of the gradients."""
  grads, history = chain_run
  m = np.zeros(SHAPES[name])
  for g, (*_, bases, adam) in zip(grads[1:], history[1:], strict=True):
    m = B1 * m + (1 - B1) * f64(g[name])
    q = [f64(q) for q in per_axis(bases.basis, name, RANKS[name])]
    # Measured: 4.4e-7 absolute for entries up to 0.83.
    assert_close(rotate(f64(adam.mu[name]), q, into=False), m, rtol=0, atol=3e-6)


@pytest.mark.parametrize("count", [10, 20, 30])
def test_second_moment_is_permuted_with_the_refresh_order(count, chain_run):
  grads, history = chain_run
  name = "matrix"
  old_bases, old_adam = history[count - 1][3], history[count - 1][4]
  stats, new_adam = history[count][2], history[count][4]
  q_old = [f64(q) for q in per_axis(old_bases.basis, name, 2)]
  rotated = rotate(f64(grads[count][name]), q_old, into=True)
  v = B2 * f64(old_adam.nu[name]) + (1 - B2) * rotated**2
  for axis, (q, stat) in enumerate(zip(q_old, per_axis(stats.stats, name, 2), strict=True)):
    stat = f64(stat)
    v = np.take(v, np.argsort(-np.diag(q.T @ stat @ q), kind="stable"), axis=axis)
  # Measured: 6.9e-8 relative.
  assert_close(f64(new_adam.nu[name]), v, rtol=5e-7, atol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_block_is_permuted_with_its_own_order(axis):
  """``_linalg.permute`` (the refresh's reordering of columns and of the diagonal moments): block
  ``b``'s entries along ``axis`` follow ``order[b]`` exactly; an Inf moves alone, as an entry."""
  rng = np.random.default_rng(axis)
  x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
  x[1, 2, 3, 4] = np.inf
  orders = np.stack([rng.permutation(x.shape[axis + 1]) for _ in range(3)]).astype(np.int32)
  want = np.stack([np.take(b, order, axis=axis) for b, order in zip(x, orders, strict=True)])
  got = jax.jit(_linalg.permute, static_argnums=2)(jnp.asarray(x), jnp.asarray(orders), axis)
  assert np.isinf(want).sum() == 1 and not np.isnan(got).any()
  np.testing.assert_array_equal(np.asarray(got), want)  # with the Inf: not runner.assert_equal


def test_a_stack_of_stacks_is_permuted_per_matrix():
  """Leading batch axes of any rank, the axis counted from the end (the refresh's columns)."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
  orders = np.stack([[rng.permutation(5) for _ in range(3)] for _ in range(2)]).astype(np.int32)
  want = np.take_along_axis(x, orders[..., None, :], axis=-1)
  got = jax.jit(_linalg.permute, static_argnums=2)(jnp.asarray(x), jnp.asarray(orders), -1)
  assert_equal(np.asarray(got), want)


# -- ragged blocks: the padding stays out of the bases and the steps --------------------------

# The (7, 7) parameter of the chain run in blocks of 5: row-major, the blocks' real parts are
# (5, 5), (5, 2), (2, 5) and (2, 2); the rest is zero padding.
REAL = [(5, 5), (5, 2), (2, 5), (2, 2)]  # per block: real entries along each axis


def ragged_factors(keyed):
  """``(axis, block, n)`` and the block's entry, for every block of every axis of the ragged
  parameter; ``n`` is the number of real coordinates along ``axis`` (the rest is padding)."""
  out = []
  for axis in (0, 1):
    for block, (value, real) in enumerate(zip(keyed[f"ragged:{axis}"], REAL, strict=True)):
      out.append(((axis, block, real[axis]), f64(value)))
  return out


def test_a_ragged_block_s_basis_keeps_real_and_padding_coordinates_apart(chain_run):
  """Every basis of every call is block-diagonal: real coordinates ⟂ padding, exactly."""
  _, history = chain_run
  ragged = 0
  for *_, bases, _ in history:
    for (_, _, n), q in ragged_factors(bases.basis):
      assert_orthonormal(q[:n, :n], ORTHONORMAL_ATOL)
      assert_equal(q[:n, n:], 0)
      assert_equal(q[n:, :n], 0)
      ragged += n < RAGGED_BLOCK
  assert ragged == STEPS * 4  # two ragged blocks per axis


def test_a_ragged_block_s_padding_has_the_eigenvalue_minus_one(chain_run):
  _, history = chain_run
  for *_, bases, _ in history:
    for (_, _, n), w in ragged_factors(bases.eigenvalues):
      assert_equal(w[n:], -1)
      # The real part's are those of a PSD matrix: >= 0 up to rounding (measured down to
      # -8.3e-8 times the largest).
      assert np.all(w[:n] >= -1e-6 * w[0]), w


def test_a_ragged_block_s_first_basis_is_the_eigenbasis_of_its_real_part(chain_run):
  _, history = chain_run
  stats, bases = history[0][2], history[0][3]
  eigenvalues = dict(ragged_factors(bases.eigenvalues))
  for where, q in ragged_factors(bases.basis):
    n = where[2]
    stat = f64(stats.stats[f"ragged:{where[0]}"][where[1]])[:n, :n]
    want = np.linalg.eigvalsh(stat)[::-1]
    assert_close(eigenvalues[where][:n], want, rtol=0, atol=EIGENVALUE_ATOL * want[0])
    if n > 1:
      assert relative_off_diagonal(stat, q[:n, :n]) < DIAGONAL_RATIO


@pytest.mark.parametrize("count", [10, 20, 30])
def test_a_ragged_block_is_refreshed_as_its_real_part_alone(count, chain_run):
  """The sorted power step and QR of the real part alone, in NumPy, give the real block."""
  _, history = chain_run
  stats, old, new = (
    history[count][2],
    history[count - 1][3],
    dict(ragged_factors(history[count][3].basis)),
  )
  for where, q_old in ragged_factors(old.basis):
    n = where[2]
    stat = f64(stats.stats[f"ragged:{where[0]}"][where[1]])[:n, :n]
    q_old = q_old[:n, :n]
    order = np.argsort(-np.diag(q_old.T @ stat @ q_old), kind="stable")
    want, _ = np.linalg.qr(stat @ q_old[:, order])
    got = new[where][:n, :n]
    signs = np.sign(np.sum(got * want, axis=0))  # QR is unique up to column signs
    assert_close(got * signs, want, rtol=0, atol=QR_ATOL)


def test_the_step_of_a_ragged_block_is_zero_at_the_padding(chain_run):
  """Rebuilt in NumPy in the working layout from the records and moments: Adam's step rotated
  back out of a ragged block's basis is zero at every padding position, and its real part is
  the update."""
  _, history = chain_run
  block = (RAGGED_BLOCK, RAGGED_BLOCK)
  real = numpy_blocks(np.ones(RAGGED_SHAPE), block) == 1
  for count in range(1, STEPS):
    carrier, adam = history[count][0]["ragged"], history[count - 1][4]
    g = f64(carrier.grad)
    assert_equal(g[~real], 0)
    mu, nu = (numpy_blocks(f64(x["ragged"]), block) for x in (adam.mu, adam.nu))
    steps = []
    for b in range(4):
      q = [f64(carrier.basis[axis][b]) for axis in (0, 1)]
      rotated = rotate(g[b], q, into=True)
      m = B1 * mu[b] + (1 - B1) * rotated
      v = B2 * nu[b] + (1 - B2) * rotated**2
      scale = np.sqrt(1 - B2**count) / (1 - B1**count)
      steps.append(scale * rotate(m / (np.sqrt(v) + EPS), q, into=False))
    steps = np.stack(steps)
    assert_equal(steps[~real], 0)
    update = numpy_blocks(f64(history[count][1]["ragged"]), block)
    # Measured: 9.8e-7 absolute for entries up to 0.96.
    assert_close(update[real], steps[real], rtol=0, atol=5e-6)


def test_rotated_adam_gives_a_ragged_block_a_finite_update_with_eps_zero():
  """eps = 0 is a valid setting, and the padding holds no gradient: it must not produce NaN.

  The record is built by hand (identity bases, count 1) so that only rotated_adam is compiled.
  """
  layout = BLOCKED_RULE.layout((5, 5))
  grad = numpy_blocks(np.random.default_rng(11).standard_normal((5, 5)), (3, 3))
  eye = jnp.broadcast_to(jnp.eye(3), (4, 3, 3))
  record = KroneckerUpdate(
    grad=jnp.asarray(grad, jnp.float32),
    count=jnp.asarray(1, jnp.int32),
    finite=jnp.asarray(True),
    stats=(eye, eye),
    basis=(eye, eye),
    next_basis=(eye, eye),
    order=(jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (4, 3)),) * 2,
    eigenvalues=(jnp.ones((4, 3)),) * 2,
    refreshed=(jnp.zeros((4,), bool),) * 2,
    layout=layout,
    dtype=jnp.float32,
    name="matrix",
  )
  tx = rotated_adam(B1, B2, 0.0)
  updates, _ = jax.jit(tx.update)({"matrix": record}, tx.init({"matrix": jnp.zeros((5, 5))}))
  update = f64(updates["matrix"])
  assert np.all(np.isfinite(update))
  assert np.any(update != 0)


# -- composing the blocks with optax ---------------------------------------------------------

COMPOSED_CALLS = 12  # across the refresh at count 10


@pytest.fixture(scope="module")
def composed_run():
  """Params, and gradients with a large norm (so that clipping acts) for 12 calls."""
  params = random_grads(7, CHAIN_SHAPES, 1)[0]
  grads = [jax.tree.map(lambda g: 10 * g, g) for g in random_grads(8, CHAIN_SHAPES, COMPOSED_CALLS)]
  return params, grads


def bare_updates(grads):
  """The bare blocks' update of every call, one call per gradient."""
  init, step = chain_blocks()
  states, out = init(grads[0]), []
  for g in grads:
    _, updates, states = step(g, states)
    out.append(updates)
  return out


def test_users_can_chain_rotated_adam_with_standard_weight_decay_and_learning_rate(composed_run):
  params, grads = composed_run
  custom = optax.chain(
    *blocks(CHAIN_RULE), optax.add_decayed_weights(WD), optax.scale_by_learning_rate(LR)
  )
  update, state = jax.jit(custom.update), custom.init(params)
  for g, bare in zip(grads, bare_updates(grads), strict=True):
    updates, state = update(g, state, params)
    for name in CHAIN_SHAPES:
      want = -LR * (f64(bare[name]) + WD * f64(params[name]))
      # Measured: 6.9e-9 absolute, for entries up to 0.11.
      assert_close(f64(updates[name]), want, rtol=0, atol=5e-8)


def test_standard_transforms_compose_in_front_of_the_blocks(composed_run):
  params, grads = composed_run
  clipped = optax.chain(optax.clip_by_global_norm(1.0), *blocks(CHAIN_RULE))
  update, state = jax.jit(clipped.update), clipped.init(params)
  scaled = []
  for g in grads:
    norm = np.sqrt(sum(np.sum(f64(x) ** 2) for x in g.values()))
    scaled.append({k: x * np.float32(min(1.0, 1.0 / norm)) for k, x in g.items()})
  for g, bare in zip(grads, bare_updates(scaled), strict=True):
    updates, state = update(g, state, params)
    # Not "ragged": its blocks' first statistics have null spaces of dimension 3, whose basis
    # (arbitrary) the rounding of the clipping scale changes, and with it the later updates.
    for name in SHAPES:
      # Measured: 1.0e-7 absolute, for entries up to 0.25 (the clipping scale is rounded
      # differently inside the chain).
      assert_close(updates[name], bare[name], rtol=0, atol=1e-6)
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
