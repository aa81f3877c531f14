"""Shampoo, Adafactor in the eigenbasis and EShampoo against independent float64 oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import AdamOracle
from oracles_family import (
  EigenAdafactorOracle,
  EShampooOracle,
  ShampooOracle,
  idealized_claim,
)
from runner import (
  assert_close,
  assert_trees_close,
  assert_trees_equal,
  cumulative_update_errors,
  run_optimizer,
  run_oracle,
)

import soap_optax
from soap_optax import KroneckerUpdate, LayoutRule
from soap_optax._rotated import factored_axes

STEPS = 32  # the init call + 31 updates

# Factors full rank from the first gradient, so that the eigenbases are unique.
SHAPES = {
  "matrix": (6, 6),
  "tensor3d": (4, 4, 16),
  "conv": (2, 2, 4, 16),
  "wide": (3, 10001),
  "vector": (7,),
  "scalar": (),
}


def _data(seed, shapes=SHAPES, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
  return params, grads


def _first_fast(settings):
  """The settings, all but the first marked slow: the fast subset checks each alias once."""
  first, *rest = settings
  return [first, *(pytest.param(name, marks=pytest.mark.slow) for name in rest)]


SHAMPOO = {
  "power_half_adam_grafting": dict(lr=1e-2, precondition_frequency=4),
  "power_quarter_no_grafting_absolute_eps_adaptive_refresh": dict(
    lr=1e-3,
    exponent=0.25,
    grafting="none",
    eps=1e-2,  # absolute, against relative 1e-2·λ_max: they differ unless λ_max is 1
    relative_eps=False,
    refresh_tolerance=0.3,  # skips some, not all, of the scheduled refreshes
    precondition_frequency=3,
    weight_decay=0.1,
  ),
  "trace_scaled_rmsprop_grafting_own_beta": dict(
    lr=1e-2,
    trace_scaling=True,
    grafting="rmsprop",
    graft_eps=0.5,  # above √ν (ν, not bias-corrected, is about 0.03·g² after 31 steps)
    b1=0.5,
    shampoo_beta=0.8,  # b2 is 0.999
    precondition_frequency=5,
  ),
  "qr_refresh_sgd_grafting": dict(
    lr=1e-2, method="qr", grafting="sgd", precondition_frequency=3, max_precond_dim=16
  ),
}


def _library_kwargs(kwargs):
  kwargs = dict(kwargs)
  kwargs["learning_rate"] = kwargs.pop("lr")
  return kwargs


@pytest.mark.parametrize("setting", _first_fast(SHAMPOO))
def test_shampoo_matches_oracle_in_float64(setting):
  params, grads = _data(10)
  with jax.enable_x64(True):
    ours = run_optimizer(
      soap_optax.shampoo(**_library_kwargs(SHAMPOO[setting])), params, grads, jnp.float64
    )
  reference = run_oracle(ShampooOracle(**SHAMPOO[setting]), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-8, errors


def test_shampoo_matches_oracle_in_float32():
  params, grads = _data(11)
  kwargs = SHAMPOO["power_half_adam_grafting"]
  ours = run_optimizer(soap_optax.shampoo(**_library_kwargs(kwargs)), params, grads, jnp.float32)
  reference = run_oracle(ShampooOracle(**kwargs), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  # Measured 6.8e-6 on this data (up to 3.8e-5 on other seeds: float32 inverse roots).
  assert max(errors.values()) < 1e-4, errors


EIGEN_ADAFACTOR = {
  "defaults": dict(),
  "merged_fast_refresh_own_beta": dict(
    max_precond_dim=16, merge_dims=True, precondition_frequency=3, b1=0.9, b2=0.99, shampoo_beta=0.5
  ),
  "no_bias_correction_large_eps2": dict(
    correct_bias=False,
    weight_decay=0.0,
    precondition_frequency=4,
    eps2=0.1,  # the squared rotated gradients are about 1
  ),
}


@pytest.mark.parametrize("setting", _first_fast(EIGEN_ADAFACTOR))
def test_eigen_adafactor_matches_oracle_in_float64(setting):
  params, grads = _data(12)
  kwargs = EIGEN_ADAFACTOR[setting]
  with jax.enable_x64(True):
    ours = run_optimizer(soap_optax.eigen_adafactor(**kwargs), params, grads, jnp.float64)
  reference = run_oracle(EigenAdafactorOracle(**kwargs), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-9, errors


def test_eigen_adafactor_matches_oracle_in_float32():
  params, grads = _data(13)
  ours = run_optimizer(soap_optax.eigen_adafactor(), params, grads, jnp.float32)
  reference = run_oracle(EigenAdafactorOracle(), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-4, errors


ESHAMPOO = {
  "adaptive_defaults": dict(precondition_frequency=4),
  "fixed_schedule": dict(refresh_tolerance=0.0, max_qr_iterations=1, precondition_frequency=3),
  "loose_tolerance_many_iterations_own_beta": dict(
    refresh_tolerance=0.2,
    max_qr_iterations=5,
    precondition_frequency=2,
    weight_decay=0.05,
    shampoo_beta=0.5,
  ),
}


@pytest.mark.parametrize("setting", _first_fast(ESHAMPOO))
def test_eshampoo_matches_oracle_in_float64(setting):
  params, grads = _data(14)
  kwargs = ESHAMPOO[setting]
  with jax.enable_x64(True):
    ours = run_optimizer(soap_optax.eshampoo(**kwargs), params, grads, jnp.float64)
  reference = run_oracle(EShampooOracle(**kwargs), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-9, errors


def test_eshampoo_matches_oracle_in_float32():
  params, grads = _data(15)
  kwargs = ESHAMPOO["fixed_schedule"]
  ours = run_optimizer(soap_optax.eshampoo(**kwargs), params, grads, jnp.float32)
  reference = run_oracle(EShampooOracle(**kwargs), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-4, errors


# Arguments the aliases pass on to their blocks, each set in a row of the tables above to a value
# that changes the result, so that an alias that dropped one (and gave its block the default)
# would fail that row's comparison.
PASSED_ON = {
  "shampoo": (
    SHAMPOO,
    ShampooOracle,
    ("shampoo_beta", "graft_eps", "relative_eps", "refresh_tolerance"),
  ),
  "eigen_adafactor": (EIGEN_ADAFACTOR, EigenAdafactorOracle, ("shampoo_beta", "eps2")),
  "eshampoo": (ESHAMPOO, EShampooOracle, ("shampoo_beta",)),
}
SEEDS = {"shampoo": 10, "eigen_adafactor": 12, "eshampoo": 14}  # of the float64 comparisons


@pytest.mark.parametrize("name", PASSED_ON)
def test_every_argument_the_alias_passes_on_is_set_where_it_changes_the_result(name):
  """The oracle without the argument (at its default) differs from the row's: a float64 oracle
  comparison, whose tolerance is 1e-8 at most, would see the argument dropped."""
  table, oracle, arguments = PASSED_ON[name]
  params, grads = _data(SEEDS[name])
  for argument in arguments:
    rows = [kwargs for kwargs in table.values() if argument in kwargs]
    assert rows, f"no row of the {name} table sets {argument}"
    for kwargs in rows:
      reference = run_oracle(oracle(**kwargs), params, grads)
      default = {k: v for k, v in kwargs.items() if k != argument}
      errors = cumulative_update_errors(
        params, run_oracle(oracle(**default), params, grads), reference
      )
      assert max(errors.values()) > 1e-3, (argument, kwargs, errors)


# -- reductions ---------------------------------------------------------------------------------


def test_soap_with_nothing_rotated_is_adam_with_the_reference_conventions():
  params, grads = _data(16)
  with jax.enable_x64(True):
    ours = run_optimizer(soap_optax.soap(max_precond_dim=0), params, grads, jnp.float64)
  reference = run_oracle(AdamOracle(), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-12, errors


def test_adafactor_in_the_eigenbasis_with_nothing_rotated_is_optax_s_factored_rms():
  """With no axis rotated, the direction is optax's ``scale_by_factored_rms`` once both are set
  to the same algorithm. Where they differ by default, and how each is set here:

  * optax's second-moment decay follows a schedule, ``1 − (t+1)^−0.8``; ours is a constant ``b2``:
    optax gets ``decay_rate_fn`` returning ``b2``.
  * optax factors only when the second-largest axis has at least ``min_dim_size_to_factor`` (128)
    entries; we factor every parameter of two axes or more: optax gets 1.
  * optax keeps row and column *means* of ``g² + ε``, we keep *sums* (of ``g² + eps2``); the
    estimate ``V = r c / Σr`` is the same from either, so the same ``ε`` in both is the test
    that ``eps2`` sits where optax's ``epsilon`` does (inside, with the squared gradient).
  * optax's direction is ``g / √V``, without momentum, bias correction or ``eps``: ours takes
    ``b1 = 0``, ``correct_bias=False``, ``eps = 0`` (and no weight decay).
  * Our first call only initialises (zero update, statistics untouched): optax starts on the
    second gradient.
  """
  b2, lr, epsilon = 0.9, 1e-2, 1e-3
  params, grads = _data(
    17, shapes={"matrix": (5, 8), "tensor": (3, 4, 6), "vector": (4,), "scalar": ()}, steps=8
  )
  with jax.enable_x64(True):
    ours = soap_optax.eigen_adafactor(
      lr,
      b1=0.0,
      b2=b2,
      eps=0.0,
      eps2=epsilon,
      weight_decay=0.0,
      correct_bias=False,
      max_precond_dim=0,
    )
    theirs = optax.chain(
      optax.scale_by_factored_rms(
        min_dim_size_to_factor=1, epsilon=epsilon, decay_rate_fn=lambda count, rate: b2
      ),
      optax.scale_by_learning_rate(lr),
    )
    p = jax.tree.map(jnp.asarray, params)
    state, their_state = ours.init(p), theirs.init(p)
    step, their_step = jax.jit(ours.update), jax.jit(theirs.update)
    first, state = step(jax.tree.map(jnp.asarray, grads[0]), state, p)
    assert_trees_equal(first, jax.tree.map(jnp.zeros_like, p))
    for g in grads[1:]:
      g = jax.tree.map(jnp.asarray, g)
      updates, state = step(g, state, p)
      expected, their_state = their_step(g, their_state, p)
      assert_trees_close(updates, expected, rtol=1e-12)


def test_eshampoo_with_the_identity_basis_is_adam():
  """The first call initialises; from the second on, updates are optax.adam's."""
  params, grads = _data(18, shapes={"matrix": (5, 8), "vector": (4,)})
  with jax.enable_x64(True):
    tx = soap_optax.eshampoo(learning_rate=1e-2, max_precond_dim=0)
    adam = optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8)
    state, adam_state = tx.init(params), adam.init(params)
    step, adam_step = jax.jit(tx.update), jax.jit(adam.update)
    updates, state = step(grads[0], state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    for g in grads[1:]:
      ours, state = step(g, state, params)
      theirs, adam_state = adam_step(g, adam_state, params)
      for name in params:
        assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-15)


def test_shampoo_with_power_one_quarter_is_the_original_shampoo():
  """L^(−1/4) G R^(−1/4), computed directly, with the statistics of the previous call."""
  rng = np.random.default_rng(19)
  g = rng.standard_normal((6, 6))
  beta = 0.9
  with jax.enable_x64(True):
    tx = soap_optax.shampoo(
      learning_rate=1.0,
      b1=0.0,
      b2=beta,
      exponent=0.25,
      eps=0.0,
      grafting="none",
      precondition_frequency=1,
    )
    params = {"w": jnp.zeros((6, 6))}
    state = tx.init(params)
    step = jax.jit(tx.update)
    for t in range(4):
      updates, state = step({"w": jnp.asarray(g)}, state, params)
      if t == 0:
        continue
      stats = (1 - beta**t) * g @ g.T, (1 - beta**t) * g.T @ g  # after t calls
      want = _sym_power(stats[0], -0.25) @ g @ _sym_power(stats[1], -0.25)
      assert_close(-np.asarray(updates["w"]), want, rtol=1e-8)


def _sym_power(a, power):
  w, v = np.linalg.eigh(a)
  return (v * w**power) @ v.T


# -- the SOAP paper's claim -----------------------------------------------------------------------


def _idealized_carrier(claim, g, dtype):
  """A record as eigenbasis_refresh would send it, holding the dataset averages.

  Every array is in the working layout: one block, so a leading axis of length one.
  """
  layout = LayoutRule().layout(g.shape)

  def per_axis(left, right):
    return tuple(jnp.asarray(x, dtype)[None] for x in (claim[left], claim[right]))

  return KroneckerUpdate(
    grad=jnp.asarray(g, dtype)[None],
    count=jnp.asarray(5, jnp.int32),
    finite=jnp.asarray(True),
    stats=per_axis("L", "R"),
    basis=per_axis("Q_L", "Q_R"),
    next_basis=per_axis("Q_L", "Q_R"),
    order=(jnp.arange(g.shape[0])[None], jnp.arange(g.shape[1])[None]),
    eigenvalues=per_axis("lam_L", "lam_R"),
    refreshed=(jnp.zeros(1, bool), jnp.zeros(1, bool)),
    layout=layout,
    dtype=jnp.dtype(dtype),
    name="w",
  )


@pytest.mark.parametrize("shape", [(3, 5), (6, 6), (8, 4)])
def test_shampoo_half_with_trace_scaling_equals_adafactor_in_its_eigenbasis(shape):
  rng = np.random.default_rng(20)
  dataset = [rng.standard_normal(shape) for _ in range(3 * max(shape))]
  g = dataset[0]
  claim = idealized_claim(dataset, g)
  with jax.enable_x64(True):
    carrier = {"w": _idealized_carrier(claim, g, jnp.float64)}
    shampoo = soap_optax.shampoo_precondition(0.5, 0.0, trace_scaling=True, grafting="none")
    shampoo_step, _ = shampoo.update(carrier, shampoo.init({"w": g}))
    # Idealized Adafactor: its row/column averages are the dataset's (A_i = λ_i, C_j = μ_j);
    # b2 = 1 keeps them there and b1 = 0 makes the step G' / √(A Cᵀ / ΣA).
    adafactor = soap_optax.rotated_adafactor(0.0, 1.0, 0.0, eps2=0.0, correct_bias=False)
    state = adafactor.init({"w": g})
    # The factored axes are ranked by size: `row` holds the sums that keep the row axis.
    sums = {0: jnp.asarray(claim["A"])[None, :, None], 1: jnp.asarray(claim["C"])[None, None, :]}
    row_axis, col_axis = factored_axes(shape)
    state = state._replace(nu_row={"w": sums[row_axis]}, nu_col={"w": sums[col_axis]})
    adafactor_step, _ = adafactor.update(carrier, state)
  assert_close(shampoo_step["w"], adafactor_step["w"], rtol=1e-9)
  assert_close(shampoo_step["w"], claim["shampoo"], rtol=1e-9)
  assert_close(adafactor_step["w"], claim["adafactor"], rtol=1e-9)


@pytest.mark.parametrize("b1", [0.0, 0.9])
def test_shampoo_s_first_real_step_has_the_norm_of_the_grafted_adam_step(b1):
  """Distributed Shampoo debiases the filtered gradient by the number of real updates, so with
  momentum the first step is full size (the initialising call, which only sets the bases, does not
  count); at that step Adam's bias-corrected step is g / (|g| + ε), whose norm the graft gives."""
  rng = np.random.default_rng(5)
  params = {"w": rng.standard_normal((4, 3)).astype(np.float32)}
  grads = [{"w": rng.standard_normal((4, 3)).astype(np.float32)} for _ in range(2)]
  tx = soap_optax.shampoo(learning_rate=1.0, b1=b1, weight_decay=0.0)
  state = tx.init(params)
  steps = []
  for g in grads:
    updates, state = tx.update(g, state, params)
    steps.append(np.asarray(updates["w"], np.float64))
  index = next(i for i, u in enumerate(steps) if np.any(u != 0))
  first, g = steps[index], grads[index]["w"].astype(np.float64)
  graft_norm = np.linalg.norm(g / (np.abs(g) + 1e-8))
  assert_close(np.linalg.norm(first), graft_norm, rtol=1e-4)
