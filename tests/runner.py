"""Runs an optax optimizer and an oracle over the same gradients, and compares the results.

Every comparison here fails on any non-finite value, NaN or Inf, on either side: NumPy's
``assert_allclose`` and ``assert_array_equal`` (and chex's tree versions, built on them) count a
NaN as equal to a NaN and an Inf as equal to an Inf of the same sign, so two runs broken the same
way would agree. A test that means to compare non-finite values says so and compares them
itself.
"""

from __future__ import annotations

import chex
import environment
import jax
import jax.numpy as jnp
import numpy as np
import optax

# XLA's own defaults for one compile, whatever the suite's XLA_FLAGS say (tests/environment.py
# compiles with a cheaper CPU code generator): for the tests that check that the code users run
# gives the same numbers.
XLA_DEFAULTS = {
  "xla_backend_optimization_level": 2,
  "xla_llvm_disable_expensive_passes": False,
  **(
    {"xla_cpu_use_fusion_emitters": True} if "fusion_emitters" in environment.TEST_XLA_FLAGS else {}
  ),
}


def run_optimizer(tx, params, grads, dtype, compiler_options=None):
  """Applies ``tx`` (jitted) over the gradient sequence; returns the final params as NumPy.

  ``compiler_options`` (e.g. :data:`XLA_DEFAULTS`) compiles the step with those XLA options.
  """
  p = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  state = tx.init(p)

  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  compiled = jax.jit(step)
  for i, g in enumerate(grads):
    g = jax.tree.map(lambda x: jnp.asarray(x, dtype), g)
    if i == 0 and compiler_options:
      compiled = compiled.lower(p, state, g).compile(compiler_options)
    p, state = compiled(p, state, g)
  return jax.tree.map(np.asarray, p)


def run_oracle(oracle, params, grads):
  """Steps a NumPy oracle over the gradient sequence; returns its final params."""
  p = params
  for g in grads:
    p = oracle.step(p, g)
  return p


def cumulative_update_errors(start, ours, reference):
  """Per parameter, ‖Δours − Δreference‖ / ‖Δreference‖ of the total change from ``start``.

  An error that is not a finite number (a NaN or Inf in either run) is reported as ``inf``, so
  that ``max(errors.values()) < tol`` fails on it: Python's ``max`` would skip a NaN that is not
  its first argument. Where the reference does not move at all the error is 0 if ours does not
  either, else ``inf``.
  """
  errors = {}
  for name in start:
    want = np.asarray(reference[name], np.float64) - start[name]
    got = np.asarray(ours[name], np.float64) - start[name]
    miss, scale = np.linalg.norm(got - want), np.linalg.norm(want)
    if scale == 0 and miss == 0:
      errors[name] = 0.0
    else:
      with np.errstate(divide="ignore", invalid="ignore"):
        error = float(miss / scale)
      errors[name] = error if np.isfinite(error) else np.inf
  return errors


def assert_updates_close(start, ours, reference, tol):
  """Asserts every parameter's cumulative update error is below ``tol`` (fails on NaN/Inf)."""
  errors = cumulative_update_errors(start, ours, reference)
  assert errors, "no parameters to compare"
  bad = {name: error for name, error in errors.items() if not error < tol}
  assert not bad, f"errors above {tol}: {bad} (all: {errors})"


def _assert_finite(*arrays, err_msg=""):
  for x in arrays:
    x = np.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):  # bfloat16 too, which NumPy does not count
      assert np.all(np.isfinite(x.astype(np.float64))), f"non-finite value in {x!r} {err_msg}"


def assert_close(actual, desired, *, rtol=0.0, atol=0.0, err_msg=""):
  """``np.testing.assert_allclose`` between finite arrays: fails on any NaN or Inf."""
  actual, desired = (np.asarray(x, np.float64) for x in (actual, desired))
  assert np.all(np.isfinite(actual)) and np.all(np.isfinite(desired)), (
    f"non-finite values: {actual!r} vs {desired!r} {err_msg}"
  )
  np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, err_msg=err_msg)


def assert_equal(actual, expected, err_msg=""):
  """``np.testing.assert_array_equal`` between finite arrays: fails on any NaN or Inf."""
  _assert_finite(actual, expected, err_msg=err_msg)
  np.testing.assert_array_equal(actual, expected, err_msg=err_msg)


def assert_trees_close(actual, expected, *, rtol=0.0, atol=0.0):
  """``chex.assert_trees_all_close`` between trees of finite values (fails on NaN or Inf)."""
  chex.assert_tree_all_finite((actual, expected))
  chex.assert_trees_all_close(actual, expected, rtol=rtol, atol=atol)


def assert_trees_equal(actual, expected):
  """``chex.assert_trees_all_equal`` between trees of finite values: fails on any NaN or Inf."""
  for x in jax.tree.leaves((actual, expected)):
    _assert_finite(x)
  chex.assert_trees_all_equal(actual, expected)


def orbax_round_trip(directory, tree):
  """``tree`` saved with orbax into ``directory`` and restored against its own shapes."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    return checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
