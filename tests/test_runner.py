"""Specification of the comparisons in `runner.py`: none may ever pass on a NaN or an Inf."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from runner import (
  assert_close,
  assert_equal,
  assert_trees_close,
  assert_trees_equal,
  assert_updates_close,
  cumulative_update_errors,
)

TOL = 1e-6  # far looser than the exact agreement below: only a non-finite value can fail


def runs(bad_value=None, bad_parameter="second"):
  """``(start, ours, reference)`` for three parameters that agree exactly, but for one entry of
  ``bad_parameter`` in ours, which is set to ``bad_value``."""
  rng = np.random.default_rng(0)
  start = {name: rng.standard_normal((3, 2)) for name in ("first", "second", "third")}
  reference = {name: p + rng.standard_normal(p.shape) for name, p in start.items()}
  ours = {name: p.copy() for name, p in reference.items()}
  if bad_value is not None:
    ours[bad_parameter][1, 0] = bad_value
  return start, ours, reference


def test_identical_runs_have_zero_error_for_every_parameter():
  errors = cumulative_update_errors(*runs())
  assert errors == {"first": 0.0, "second": 0.0, "third": 0.0}
  assert_updates_close(*runs(), TOL)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("parameter", ["first", "second", "third"])
def test_a_non_finite_value_in_any_parameter_makes_the_comparison_fail(parameter, value):
  """Python's max() skips a NaN that is not its first argument: the errors must not be NaN."""
  start, ours, reference = runs(value, parameter)
  errors = cumulative_update_errors(start, ours, reference)
  assert errors[parameter] == np.inf
  assert not max(errors.values()) < TOL  # the callers' form of the check
  with pytest.raises(AssertionError, match=parameter):
    assert_updates_close(start, ours, reference, TOL)


def test_a_non_finite_reference_makes_the_comparison_fail():
  start, reference, ours = runs(np.nan, "second")  # the NaN on the reference's side
  assert not max(cumulative_update_errors(start, ours, reference).values()) < TOL
  with pytest.raises(AssertionError, match="second"):
    assert_updates_close(start, ours, reference, TOL)


def test_a_parameter_that_neither_run_moves_agrees():
  start, ours, reference = runs()
  reference["second"] = ours["second"] = start["second"].copy()
  assert cumulative_update_errors(start, ours, reference)["second"] == 0.0


def test_a_parameter_that_only_our_run_moves_fails():
  start, ours, reference = runs()
  reference["second"] = start["second"].copy()
  assert cumulative_update_errors(start, ours, reference)["second"] == np.inf


def test_an_error_above_the_tolerance_fails_and_is_reported():
  start, ours, reference = runs()
  ours["third"] = ours["third"] + 1e-3
  with pytest.raises(AssertionError, match="third"):
    assert_updates_close(start, ours, reference, TOL)


# -- the array and tree comparisons -----------------------------------------------------------

HELPERS = {
  "assert_close": lambda a, b: assert_close(a, b, rtol=1e-3),
  "assert_equal": assert_equal,
  "assert_trees_close": lambda a, b: assert_trees_close({"x": a}, {"x": b}, rtol=1e-3),
  "assert_trees_equal": lambda a, b: assert_trees_equal({"x": a}, {"x": b}),
}
BAD = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("helper", HELPERS)
def test_every_comparison_accepts_equal_finite_arrays(helper, dtype):
  x = jnp.asarray([1.0, -2.0, 0.5], dtype)
  HELPERS[helper](x, x)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("side", ["actual", "expected", "both"])
@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("helper", HELPERS)
def test_every_comparison_fails_on_a_non_finite_value(helper, bad, side, dtype):
  """Even where both sides hold the same NaN or Inf, which NumPy and chex count as equal."""
  good = jnp.asarray([1.0, -2.0, 0.5], dtype)
  broken = good.at[1].set(BAD[bad])
  actual = broken if side in ("actual", "both") else good
  expected = broken if side in ("expected", "both") else good
  with pytest.raises(AssertionError):
    HELPERS[helper](actual, expected)
