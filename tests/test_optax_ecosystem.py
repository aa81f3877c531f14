"""Specification: every alias is an ordinary optax transformation that works with the ecosystem.

Each test runs for every alias of `aliases.ALIASES`, with its small settings (a refresh every
third update, so that a few steps cross refreshes).
"""

from __future__ import annotations

import functools

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIAS_PARAMS

import soap_optax

# With max_precond_dim=5, "w" is rotated along its second axis and left alone along its first.
SHAPES = {"w": (6, 3), "b": (3,)}
ALL_PRECISIONS = [
  pytest.param(jnp.float32, id="float32"),
  pytest.param(jnp.bfloat16, id="bfloat16"),
  pytest.param(jnp.float16, id="float16"),
]


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


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    if np.issubdtype(e.dtype, np.inexact):
      np.testing.assert_allclose(a.astype(np.float64), e.astype(np.float64), rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(a, e)


def floating_dtypes(tree):
  return [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def without_stats_and_bases(state):
  """The state with the factor statistics and the eigenbases taken out."""
  blocks = (soap_optax.KroneckerStatsState, soap_optax.EigenbasisState)
  return jax.tree.map(
    lambda x: None if isinstance(x, blocks) else x, state, is_leaf=lambda x: isinstance(x, blocks)
  )


def statistics(state):
  return [s.stats for s in aliases.find_states(state, soap_optax.KroneckerStatsState)]


def bases(state):
  return [s.basis for s in aliases.find_states(state, soap_optax.EigenbasisState)]


# -- jit, scan and tracing -------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_jit_does_not_recompile_after_the_first_step(name):
  tx, step = reference(name)
  params, grads = params_and_grads(8)  # refreshes at counts 3 and 6
  params, state, _ = step(params, tx.init(params), grads[0])
  compiled = step._cache_size()
  for g in grads[1:]:
    params, state, _ = step(params, state, g)
  assert step._cache_size() == compiled


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
  p_scan, s_scan = scanned(params, stacked)
  p_loop, s_loop = run(step, tx, params, grads)
  assert_trees_close(p_scan, p_loop)
  assert_trees_close(s_scan, s_loop)


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
  """``(tx, step)``: the alias under optax.inject_hyperparams, with the reference's settings."""
  hyper = aliases.numeric_hyperparams(name)
  static = [a for a in aliases.parameters(name) if a not in hyper]
  tx = optax.inject_hyperparams(aliases.ALIASES[name], static_args=static)(
    **aliases.kwargs_for(name)
  )
  return tx, aliases.stepper(tx)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_inject_hyperparams_gives_the_same_updates_as_plain_construction(name):
  params, grads = params_and_grads(8)
  p_injected, state = run(*reversed(injected(name)), params, grads)
  p_plain, _ = run(*reversed(reference(name)), params, grads)
  assert set(aliases.numeric_hyperparams(name)) <= set(state.hyperparams)
  assert_trees_close(p_injected, p_plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_injected_learning_rate_can_be_changed_without_recompiling(name):
  tx, step = injected(name)
  params, grads = params_and_grads(6)
  params, state, _ = step(params, tx.init(params), grads[0])
  compiled = step._cache_size()
  for g in grads[1:3]:
    params, state, _ = step(params, state, g)
  state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
  for g in grads[3:]:
    _, state, updates = step(params, state, g)
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(u, np.zeros(u.shape))
  assert step._cache_size() == compiled


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
      assert_trees_close(new_p, p, rtol=0, atol=0)
    p = new_p
  averaged = [jax.tree.map(lambda a, b: (a + b) / 2, *grads[i : i + 2]) for i in range(0, 8, 2)]
  p_reference, _ = run(step, tx, params, averaged)
  assert_trees_close(p, p_reference)


def alias_updates(name, params, grads):
  """The alias's update of every call, on the whole tree."""
  tx, step = reference(name)
  state, out = tx.init(params), []
  for g in grads:
    params, state, updates = step(params, state, g)
    out.append(updates)
  return out


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_masked_applies_the_alias_to_the_masked_parameters_only(name):
  masked = optax.masked(aliases.make(name), {"w": True, "b": False})
  step = aliases.stepper(masked)
  params, grads = params_and_grads(6)
  expected = alias_updates(name, params, grads)  # the alias treats each parameter on its own
  p, state = params, masked.init(params)
  for g, want in zip(grads, expected, strict=True):
    p, state, updates = step(p, state, g)
    np.testing.assert_array_equal(updates["b"], g["b"])  # passed through unchanged
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_multi_transform_runs_the_alias_beside_sgd(name):
  tx = optax.multi_transform(
    {"kron": aliases.make(name), "sgd": optax.sgd(0.1)}, {"w": "kron", "b": "sgd"}
  )
  step = aliases.stepper(tx)
  params, grads = params_and_grads(6)
  expected = alias_updates(name, params, grads)  # the alias treats each parameter on its own
  p, state = params, tx.init(params)
  for g, want in zip(grads, expected, strict=True):
    p, state, updates = step(p, state, g)
    np.testing.assert_allclose(updates["b"], -0.1 * np.asarray(g["b"]), rtol=1e-6)
    np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-5, atol=1e-7)


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
  assert set(jax.tree.leaves(opt_specs)) <= set(specs.values())
  for moments in aliases.find_states(opt_specs, soap_optax.RotatedAdamState):
    assert moments.mu == specs
    assert moments.nu == specs
  # Statistics and bases are not parameter-shaped, so they are not mapped.
  assert jax.tree.leaves((statistics(opt_specs), bases(opt_specs))) == []


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_map_params_with_the_init_function_maps_only_parameter_shaped_state(name):
  tx = aliases.make(name)
  params, _ = params_and_grads(0)
  state = tx.init(params)
  cast = optax.tree.map_params(tx.init, lambda p: p.astype(jnp.bfloat16), state)
  assert jax.tree.structure(cast) == jax.tree.structure(state)
  for moments in aliases.find_states(cast, soap_optax.RotatedAdamState):
    assert set(floating_dtypes(moments)) == {jnp.dtype(jnp.bfloat16)}
  assert set(floating_dtypes((statistics(cast), bases(cast)))) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_apply_if_finite_around_the_alias_skips_the_bad_step(name):
  tx, step = reference(name)
  wrapped = optax.apply_if_finite(aliases.make(name), max_consecutive_errors=3)
  params, grads = params_and_grads(6)
  bad = {**grads[0], "w": grads[0]["w"].at[0, 0].set(jnp.nan)}
  p, state = run(aliases.stepper(wrapped), wrapped, params, [*grads[:3], bad, *grads[3:]])
  p_reference, _ = run(step, tx, params, grads)
  assert int(state.total_notfinite) == 1
  assert_trees_close(p, p_reference)


# -- dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_PRECISIONS)
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_updates_come_back_in_the_parameter_dtype(name, dtype):
  tx = aliases.make(name)
  params, grads = params_and_grads(1, dtype=dtype)
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(tx.update, grads[0], state, params)
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(dtype)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bfloat16_and_float16_parameters_train_with_finite_updates(name):
  tx = aliases.make(name)
  (p16, g16), (pbf, gbf) = (params_and_grads(5, dtype=d) for d in (jnp.float16, jnp.bfloat16))
  params = {"half": p16["w"], "bfloat": pbf["w"]}
  step, state = aliases.stepper(tx), tx.init(params)
  for a, b in zip(g16, gbf, strict=True):
    params, state, updates = step(params, state, {"half": a["w"], "bfloat": b["w"]})
  assert updates["half"].dtype == jnp.float16
  assert updates["bfloat"].dtype == jnp.bfloat16
  for u in jax.tree.leaves(updates):
    u = np.asarray(u, np.float32)
    assert np.all(np.isfinite(u))
    assert np.any(u != 0)


@pytest.mark.parametrize("dtype", ALL_PRECISIONS)
@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_state_is_float32_by_default(name, dtype):
  tx = aliases.make(name)
  params, _ = params_and_grads(0, dtype=dtype)
  assert set(floating_dtypes(jax.eval_shape(tx.init, params))) == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_stats_dtype_sets_the_dtype_of_the_statistics(name):
  aliases.require(name, "stats_dtype")
  with jax.enable_x64(True):
    tx = aliases.make(name, stats_dtype=jnp.float64)
    params, grads = params_and_grads(1)
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, grads[0], state, params)
  assert set(floating_dtypes(statistics(state))) == {jnp.dtype(jnp.float64)}
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bases_follow_the_dtype_of_the_statistics_by_default(name):
  aliases.require(name, "stats_dtype", "basis_dtype")
  with jax.enable_x64(True):
    tx = aliases.make(name, stats_dtype=jnp.float64)
    state = jax.eval_shape(tx.init, params_and_grads(0)[0])
  assert set(floating_dtypes(bases(state))) == {jnp.dtype(jnp.float64)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_basis_dtype_sets_the_dtype_of_the_bases(name):
  aliases.require(name, "basis_dtype")
  with jax.enable_x64(True):
    tx = aliases.make(name, basis_dtype=jnp.float64)
    params, grads = params_and_grads(1)
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, grads[0], state, params)
  assert set(floating_dtypes(bases(state))) == {jnp.dtype(jnp.float64)}
  assert set(floating_dtypes(statistics(state))) == {jnp.dtype(jnp.float32)}
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_moment_dtype_sets_the_dtype_of_the_optimizer_moments(name):
  aliases.require(name, "moment_dtype")
  tx = aliases.make(name, moment_dtype=jnp.bfloat16)
  params, grads = params_and_grads(1)
  state = jax.eval_shape(tx.init, params)
  updates, _ = jax.eval_shape(tx.update, grads[0], state, params)
  assert set(floating_dtypes(without_stats_and_bases(state))) == {jnp.dtype(jnp.bfloat16)}
  assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}


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
