"""Specification: every alias is an ordinary optax transformation that works with the ecosystem.

Each test runs for every alias of `aliases.ALIASES`, with its small settings (a refresh every
third update, so that a few steps cross refreshes). Steps that several tests run are compiled
once (module-level caches), and the shared steps raise if they are ever traced twice.
"""

from __future__ import annotations

import collections
import functools

import aliases
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIAS_PARAMS
from runner import assert_equal, assert_trees_close, assert_trees_equal, assert_updates_close

# With max_precond_dim=5, "w" is rotated along its second axis and left alone along its first.
SHAPES = {"w": (6, 3), "b": (3,)}
F32, BF16, F16 = (jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def params_and_grads(steps, seed=0, dtype=jnp.float32, shapes=SHAPES):
  rng = np.random.default_rng(seed)

  def tree():
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}

  return tree(), [tree() for _ in range(steps)]


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


reference = aliases.reference


def run(step, tx, params, grads):
  state = tx.init(params)
  for g in grads:
    params, state, _ = step(params, state, g)
  return params, state


def reference_run(name, params, grads):
  """``(final params, updates of every call)`` of the shared reference step."""
  tx, step = reference(name)
  state, out = tx.init(params), []
  for g in grads:
    params, state, updates = step(params, state, g)
    out.append(updates)
  return params, out


def run_with_updates(tx, params, grads):
  """``(final params, final state, updates of every call)`` of a freshly compiled step."""
  step, state, out = aliases.stepper(tx), tx.init(params), []
  for g in grads:
    params, state, updates = step(params, state, g)
    out.append(updates)
  return params, state, out


def floating_dtypes(tree) -> collections.Counter:
  """How many floating leaves of each dtype ``tree`` has."""
  return collections.Counter(
    jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
  )


def statistics(state):
  """The factor statistics (a dict keyed by factor) of the one kronecker_stats in ``state``."""
  return optax.tree.get(state, "stats")


def bases(state):
  """The eigenbases (a dict keyed by factor) of the one eigenbasis_refresh in ``state``."""
  return optax.tree.get(state, "basis")


def moments(state) -> list:
  """The trees of every moment shaped like the parameters; asserts there is at least one."""
  found = aliases.parameter_shaped_moments(state)
  assert found, "no parameter-shaped moments found"
  return found


# -- jit, scan and tracing -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_whole_run_of_jitted_steps_is_compiled_once(name):
  """The shared step is wrapped in chex.assert_max_traces(n=1): a retrace would raise."""
  tx, step = reference(name)
  params, grads = params_and_grads(8)  # from the initial state, across refreshes at 3 and 6
  state = tx.init(params)
  for g in grads:
    params, state, _ = step(params, state, g)
  # The guard is live: arguments of another shape must retrace, and that raises.
  other, _ = params_and_grads(0, shapes={"w": (6, 4), "b": (3,)})
  with pytest.raises(AssertionError, match="traced > 1 times"):
    step(other, tx.init(other), other)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_lax_scan_over_steps_equals_a_python_loop_of_jitted_steps(name):
  tx, step = reference(name)
  params, grads = params_and_grads(8)

  @jax.jit
  def scanned(params, grads):
    def body(carry, g):
      p, state = carry
      updates, state = tx.update(g, state, p)
      return (optax.apply_updates(p, updates), state), None

    (params, state), _ = jax.lax.scan(body, (params, tx.init(params)), grads)
    return params, state

  stacked = jax.tree.map(lambda *g: jnp.stack(g), *grads)
  scan_run = scanned(params, stacked)
  loop_run = run(step, tx, params, grads)
  # Measured: bit-identical; ~8 float32 ulps leave XLA room to fuse the two programs differently.
  assert_trees_close(scan_run, loop_run, rtol=1e-6)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_init_and_update_trace_with_abstract_values(name):
  """Nothing in init or update needs a concrete value, so nothing waits on the device."""
  tx = aliases.make(name)
  params, grads = params_and_grads(1)
  state = jax.eval_shape(tx.init, abstract(params))
  updates, new_state = jax.eval_shape(tx.update, abstract(grads[0]), state, abstract(params))
  assert updates == abstract(params)
  assert new_state == state


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_jitted_steps_make_no_host_transfers(name):
  tx, step = reference(name)
  params, grads = params_and_grads(8)
  state = tx.init(params)
  with jax.transfer_guard("disallow"):
    for g in grads:
      params, state, _ = step(params, state, g)
    jax.block_until_ready((params, state))


# -- hyperparameters as state ----------------------------------------------------------------


@functools.cache
def injected(name):
  """``(tx, step)``: the alias under optax.inject_hyperparams, with the small settings; the step
  raises if it is ever traced a second time."""
  static = [a for a in aliases.parameters(name) if a not in aliases.SMALL_NUMERIC]
  factory = optax.inject_hyperparams(aliases.ALIASES[name], static_args=static)
  tx = factory(**aliases.SMALL)
  return tx, aliases.stepper(tx, traced_once_as=f"injected_step_of_{name}")


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_inject_hyperparams_gives_the_same_updates_as_plain_construction(name):
  params, grads = params_and_grads(8)
  p_injected, state = run(*reversed(injected(name)), params, grads)
  p_plain, _ = run(*reversed(reference(name)), params, grads)
  assert set(state.hyperparams) == set(aliases.SMALL_NUMERIC)
  # Measured: 1.2e-7 absolute (one ulp of parameters up to 2.3).
  assert_trees_close(p_injected, p_plain, atol=1e-6)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_injected_learning_rate_of_zero_stops_the_updates_without_recompiling(name):
  tx, step = injected(name)  # a second trace of the step raises
  params, grads = params_and_grads(6)
  state = tx.init(params)
  for g in grads[:3]:
    params, state, _ = step(params, state, g)
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  for g in grads[3:]:
    _, state, updates = step(params, state, g)
    for u in jax.tree.leaves(updates):
      assert_equal(u, np.zeros(u.shape))  # a NaN is not zero


# The injected optimizer first runs with these values, then every numeric hyperparameter changes
# to the small settings, so that the shared reference step is "the optimizer built with the new
# values". Each value is far enough from the small setting to change the updates visibly (see
# the test below).
BEFORE = dict(learning_rate=3e-2, b1=0.5, b2=0.9, eps=0.1, weight_decay=0.5)
CHANGED_AT = 4  # after the initialising call and 3 updates (a refresh at count 3)
# The injected and the plainly built optimizer run the same arithmetic, with the hyperparameters
# as arguments in one and as constants in the other. Measured: 6.0e-7 absolute (updates, and
# states with entries up to 8).
INJECTED_ATOL = 5e-6


def with_hyperparams(state, **hyperparams):
  new = {k: jnp.asarray(v, state.hyperparams[k].dtype) for k, v in hyperparams.items()}
  return state._replace(hyperparams={**state.hyperparams, **new})


@functools.cache
def snapshot(name):
  """``(params, state, grads)``: the injected optimizer run with ``BEFORE``'s values for
  ``CHANGED_AT`` calls, and the gradients of the calls that follow (across a refresh at 6)."""
  tx, step = injected(name)
  params, grads = params_and_grads(CHANGED_AT + 4)
  state = with_hyperparams(tx.init(params), **BEFORE)
  for g in grads[:CHANGED_AT]:
    params, state, _ = step(params, state, g)
  return params, state, grads[CHANGED_AT:]


def continue_injected(name, **hyperparams):
  """The injected optimizer's updates from the snapshot with ``hyperparams`` changed, and its
  final state."""
  _, step = injected(name)
  params, state, grads = snapshot(name)
  state, out = with_hyperparams(state, **hyperparams), []
  for g in grads:
    params, state, updates = step(params, state, g)
    out.append(updates)
  return out, state


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_changed_injected_hyperparameters_act_as_an_optimizer_built_with_them(name):
  """From one state snapshot: the injected optimizer, with every numeric hyperparameter changed
  mid-run, and the alias built with the new values make the same updates."""
  params, state, grads = snapshot(name)
  assert set(BEFORE) == set(state.hyperparams) == set(aliases.SMALL_NUMERIC)  # all change
  injected_updates, injected_state = continue_injected(name, **aliases.SMALL_NUMERIC)
  _, built_step = reference(name)  # the alias built with the small settings
  built_state = state.inner_state
  for g, want in zip(grads, injected_updates, strict=True):
    params, built_state, updates = built_step(params, built_state, g)
    assert_trees_close(want, updates, atol=INJECTED_ATOL)
  assert_trees_close(injected_state.inner_state, built_state, atol=INJECTED_ATOL)


@pytest.mark.parametrize("hyperparameter", BEFORE)
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_each_changed_hyperparameter_changes_the_updates_beyond_the_comparison_s_tolerance(
  name, hyperparameter
):
  """So that the comparison above would see an injected value that the optimizer ignored."""
  kept, _ = continue_injected(name)
  changed, _ = continue_injected(name, **{hyperparameter: aliases.SMALL[hyperparameter]})
  kept, changed = (
    np.concatenate([np.ravel(u) for u in jax.tree.leaves(x)]) for x in (kept, changed)
  )
  # Measured at least 7.3e-4 (shampoo's eps, a relative damping), 150 times the tolerance.
  assert np.max(np.abs(changed - kept)) > 20 * INJECTED_ATOL  # fails on NaN


# -- wrappers and partitions -----------------------------------------------------------------


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_multisteps_equals_the_alias_on_averaged_gradients(name):
  tx, step = reference(name)
  multi = optax.MultiSteps(aliases.make(name), every_k_schedule=2)
  multi_step = aliases.stepper(multi)
  params, grads = params_and_grads(8)
  state, p = multi.init(params), params
  for i, g in enumerate(grads):
    new_p, state, _ = multi_step(p, state, g)
    if i % 2 == 0:  # only accumulating
      assert_trees_equal(new_p, p)
    p = new_p
  averaged = [jax.tree.map(lambda a, b: (a + b) / 2, *grads[i : i + 2]) for i in range(0, 8, 2)]
  p_reference, _ = run(step, tx, params, averaged)
  # Measured: 1.5e-8 absolute (parameters up to 2.3; the averaged gradients are rounded
  # differently).
  assert_trees_close(p, p_reference, atol=1e-7)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_masked_applies_the_alias_to_the_masked_parameters_only(name):
  masked = optax.masked(aliases.make(name), {"w": True, "b": False})
  step = aliases.stepper(masked)
  params, grads = params_and_grads(6)
  _, expected = reference_run(name, params, grads)  # the alias treats each parameter alone
  p, state = params, masked.init(params)
  for g, want in zip(grads, expected, strict=True):
    p, state, updates = step(p, state, g)
    assert_trees_equal(updates["b"], g["b"])  # passed through unchanged
    # Measured: bit-identical (room for ~8 float32 ulps).
    assert_trees_close(updates["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_multi_transform_runs_the_alias_beside_sgd(name):
  tx = optax.multi_transform(
    {"kron": aliases.make(name), "sgd": optax.sgd(0.1)}, {"w": "kron", "b": "sgd"}
  )
  step = aliases.stepper(tx)
  params, grads = params_and_grads(6)
  _, expected = reference_run(name, params, grads)  # the alias treats each parameter alone
  p, state = params, tx.init(params)
  for g, want in zip(grads, expected, strict=True):
    p, state, updates = step(p, state, g)
    # Measured: bit-identical (room for ~8 float32 ulps).
    assert_trees_close(updates["b"], -0.1 * g["b"], rtol=1e-6)
    assert_trees_close(updates["w"], want["w"], rtol=1e-6)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_map_params_follows_the_documented_usage(name):
  """optax's example: map every copy of the parameter tree in the state to the params' specs."""
  tx = aliases.make(name)
  params, _ = params_and_grads(0)
  state = tx.init(params)
  specs = {"w": "spec_w", "b": "spec_b"}
  opt_specs = optax.tree.map_params(
    tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
  )
  mapped = moments(opt_specs)
  for label, tree in mapped:
    assert tree == specs, label
  # Nothing else is mapped: statistics, bases and Adafactor's row and column sums are not
  # parameter-shaped.
  assert sorted(jax.tree.leaves(opt_specs)) == sorted(jax.tree.leaves([t for _, t in mapped]))
  assert jax.tree.leaves((statistics(opt_specs), bases(opt_specs))) == []


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_map_params_with_the_init_function_maps_only_parameter_shaped_state(name):
  tx = aliases.make(name)
  params, _ = params_and_grads(0)
  state = tx.init(params)
  cast = optax.tree.map_params(tx.init, lambda p: p.astype(jnp.bfloat16), state)
  assert jax.tree.structure(cast) == jax.tree.structure(state)
  moment_leaves = sum(len(jax.tree.leaves(tree)) for _, tree in moments(cast))
  for label, tree in moments(cast):
    assert floating_dtypes(tree).keys() == {BF16}, label
  total = sum(floating_dtypes(state).values())
  assert floating_dtypes(cast) == {BF16: moment_leaves, F32: total - moment_leaves}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_apply_if_finite_around_the_alias_skips_the_bad_step(name):
  tx, step = reference(name)
  wrapped = optax.apply_if_finite(aliases.make(name), max_consecutive_errors=3)
  params, grads = params_and_grads(6)
  bad = {**grads[0], "w": grads[0]["w"].at[0, 0].set(jnp.nan)}
  p, state = run(aliases.stepper(wrapped), wrapped, params, [*grads[:3], bad, *grads[3:]])
  p_reference, _ = run(step, tx, params, grads)
  assert int(state.total_notfinite) == 1
  # Measured: bit-identical (room for ~8 float32 ulps).
  assert_trees_close(p, p_reference, rtol=1e-6)


# -- dtypes and schedules --------------------------------------------------------------------
#
# Two compiled runs per alias serve the tests below, each beside the shared reference step on the
# same data (float32 parameters and state, constant learning rate).


def relative_error(got, want):
  got, want = (np.asarray(x, np.float64) for x in (got, want))
  return np.linalg.norm(got - want) / np.linalg.norm(want)  # NaN for a zero reference


STATS_CALLS = 20


@functools.cache
def bfloat16_statistics_run(name):
  """20 calls with the statistics stored in bfloat16 (and so, by default, the bases), and the
  reference: ``(params, final params, final state, updates, reference's final params)``."""
  params, grads = params_and_grads(STATS_CALLS)
  tx = aliases.make(name, stats_dtype=jnp.bfloat16)
  p, state, updates = run_with_updates(tx, params, grads)
  return params, p, state, updates, reference_run(name, params, grads)[0]


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_stats_dtype_sets_the_dtype_of_the_statistics(name):
  """bfloat16 after 20 calls (refreshes every third); updates stay float32."""
  params, _, state, updates, _ = bfloat16_statistics_run(name)
  assert floating_dtypes(statistics(state)).keys() == {BF16}
  for u in updates:
    chex.assert_trees_all_equal_dtypes(u, params)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bases_follow_the_dtype_of_the_statistics_by_default(name):
  _, _, state, _, _ = bfloat16_statistics_run(name)
  assert floating_dtypes(bases(state)).keys() == {BF16}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_stats_dtype_leaves_the_moments_float32(name):
  _, _, state, _, _ = bfloat16_statistics_run(name)
  chex.assert_tree_all_finite(state)
  without = optax.tree.set(state, stats=None, basis=None, eigenvalues=None)
  assert floating_dtypes(without).keys() == {F32}


# ‖Δp − Δp_f32‖ / ‖Δp_f32‖ per parameter after 20 calls: bfloat16 statistics, and the bfloat16
# bases that follow them, perturb the preconditioner by about 2⁻⁹ relative per entry (the bases
# are re-orthonormalised at every refresh). Measured at most 3.8e-3 (soap's "w"; the unrotated
# "b" is not affected).
BF16_STATISTICS_TOLERANCE = 2e-2


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bfloat16_statistics_stay_close_to_the_float32_run(name):
  start, p, _, _, p_reference = bfloat16_statistics_run(name)
  assert_updates_close(start, p, p_reference, BF16_STATISTICS_TOLERANCE)


LOW_PRECISION = {"w": BF16, "b": F16}  # the dtypes of the low-precision run's parameters
LOW_PRECISION_CALLS, RATE_OFF_AT = 8, 5


def representable(x):
  """``x`` rounded to multiples of 1/64 in [-4, 4): exact in float32, bfloat16 and float16."""
  return np.clip(np.round(np.asarray(x, np.float64) * 64), -255, 255) / 64


def on_off_rate(count):
  """The small learning rate up to count 4, then 0."""
  return jnp.where(count < RATE_OFF_AT, aliases.SMALL["learning_rate"], 0.0)


@functools.cache
def low_precision_run(name):
  """8 calls on parameters in bfloat16 ("w") and float16 ("b"), with bases stored in float16,
  moments in bfloat16, and the learning rate the schedule ``on_off_rate``; beside it, the
  reference on the same values (exact in every dtype here) in float32: ``(params, final state,
  updates of every call, the reference's updates)``."""
  tx = aliases.make(
    name, basis_dtype=jnp.float16, moment_dtype=jnp.bfloat16, learning_rate=on_off_rate
  )
  params, grads = params_and_grads(LOW_PRECISION_CALLS)
  params, grads = jax.tree.map(representable, (params, grads))

  def cast(tree):
    return {k: jnp.asarray(x, LOW_PRECISION[k]) for k, x in tree.items()}

  _, state, updates = run_with_updates(tx, cast(params), [cast(g) for g in grads])
  as_float32 = functools.partial(jax.tree.map, lambda x: jnp.asarray(x, jnp.float32))
  _, ref_updates = reference_run(name, as_float32(params), [as_float32(g) for g in grads])
  return cast(params), state, updates, ref_updates


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_updates_come_back_in_the_parameter_dtype(name):
  params, _, updates, _ = low_precision_run(name)
  assert {k: x.dtype for k, x in params.items()} == LOW_PRECISION
  for u in updates:
    chex.assert_trees_all_equal_dtypes(u, params)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_basis_dtype_sets_the_dtype_of_the_bases(name):
  """float16 after 8 calls (refreshes at 3 and 6)."""
  _, state, _, _ = low_precision_run(name)
  assert floating_dtypes(bases(state)).keys() == {F16}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_statistics_stay_float32_for_low_precision_parameters(name):
  _, state, _, _ = low_precision_run(name)
  assert floating_dtypes(statistics(state)).keys() == {F32}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_moment_dtype_sets_the_dtype_of_the_optimizer_moments(name):
  """Every moment: the parameter-shaped ones and the keyed ones (Adafactor's sums)."""
  _, state, _, _ = low_precision_run(name)
  chex.assert_tree_all_finite(state)
  without = optax.tree.set(state, stats=None, basis=None, eigenvalues=None)
  assert floating_dtypes(without).keys() == {BF16}
  assert floating_dtypes([t for _, t in moments(state)]).keys() == {BF16}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_learning_rate_schedule_is_called_with_the_update_count(name):
  """``schedule(t)`` is the rate of call ``t``, counted from 0 (the initialising call), for the
  step and the decay: updates up to count 4, none (exactly zero) from count 5 on."""
  _, _, updates, _ = low_precision_run(name)
  for count, u in enumerate(updates[1:], start=1):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(u)]
    if count < RATE_OFF_AT:
      assert all(np.all(np.isfinite(x)) and np.any(x != 0) for x in leaves), count
    else:
      assert all(np.all(x == 0) for x in leaves), count


# Per call while the rate is on, ‖u − u_f32‖ / ‖u_f32‖ per parameter, against the all-float32
# reference (whose rate is the same constant): the update rounded to the parameter's dtype
# (2⁻⁹ relative per entry for bfloat16, 2⁻¹² for float16), the parameters the decay reads rounded
# likewise, float16 bases and bfloat16 moments. Measured at most 5.6e-3 ("w", bfloat16) and
# 1.2e-3 ("b", float16).
LOW_PRECISION_TOLERANCE = {"w": 3e-2, "b": 8e-3}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_low_precision_parameters_and_state_stay_close_to_the_float32_run(name):
  _, _, updates, ref_updates = low_precision_run(name)
  checked = 0
  for u, want in zip(updates[1:RATE_OFF_AT], ref_updates[1:RATE_OFF_AT], strict=True):
    for key, tolerance in LOW_PRECISION_TOLERANCE.items():
      assert relative_error(u[key], want[key]) < tolerance, key  # fails on NaN
      checked += 1
  assert checked == 2 * (RATE_OFF_AT - 1)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_init_state_is_float32_by_default_whatever_the_parameter_dtype(name, dtype):
  tx = aliases.make(name)
  params, _ = params_and_grads(0, dtype=dtype)
  assert floating_dtypes(tx.init(params)).keys() == {F32}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_abstract_init_matches_concrete_init(name):
  tx = aliases.make(name)
  params, _ = params_and_grads(0, shapes={**SHAPES, "k": (2, 3, 4), "s": ()})
  concrete = tx.init(params)
  assert jax.eval_shape(tx.init, abstract(params)) == abstract(concrete)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_init_accepts_shape_dtype_struct_leaves(name):
  tx = aliases.make(name)
  params, _ = params_and_grads(0)
  state = tx.init(abstract(params))
  assert abstract(state) == abstract(tx.init(params))
