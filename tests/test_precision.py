"""Specification of the ``precision`` argument of the statistics and the rotations."""

from __future__ import annotations

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aliases import ALIAS_PARAMS
from runner import assert_trees_equal

import soap_optax

PARAMS = {"w": jnp.ones((6, 4)), "b": jnp.zeros(4)}


def grads(step):
  rng = np.random.default_rng(step)
  return {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in PARAMS.items()}


def run(tx, steps=5):
  state = tx.init(PARAMS)
  update = jax.jit(tx.update)
  for step in range(steps):
    updates, state = update(grads(step), state, PARAMS)
  return updates


def dot_operand_dtypes(tx) -> list[tuple[str, str]]:
  """The operand dtypes of every dot_general in the jitted update (sub-jaxprs included)."""
  state = tx.init(PARAMS)
  jaxpr = jax.make_jaxpr(tx.update)(grads(0), state, PARAMS)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else [param]:
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jaxpr.jaxpr)
  assert found, "no matmul found"
  return found


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_highest_is_the_default(name):
  assert_trees_equal(run(aliases.make(name, precision="highest")), run(aliases.make(name)))


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bfloat16_rounds_the_operands_of_statistics_and_rotations_only(name):
  """The G Gᵀ products and the rotations take bfloat16 operands; the refresh (power step, QR,
  staleness) and the moment transfer keep float32 ones."""
  qr = {"method": "qr"} if name == "shampoo" else {}  # a refresh with matmuls in it
  highest = dot_operand_dtypes(aliases.make(name, **qr))
  rounded = dot_operand_dtypes(aliases.make(name, precision="bfloat16", **qr))
  assert all(dtypes == ("float32", "float32") for dtypes in highest)
  assert ("bfloat16", "bfloat16") in rounded
  assert ("float32", "float32") in rounded  # the refresh and the transfer


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_bfloat16_changes_the_step_by_about_bfloat16_rounding(name):
  exact = run(aliases.make(name))
  rounded = run(aliases.make(name, precision="bfloat16"))
  for key in exact:
    a, b = np.asarray(exact[key], np.float64), np.asarray(rounded[key], np.float64)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    relative = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert relative < 0.1, (key, relative)
  assert any(not np.array_equal(exact[k], rounded[k]) for k in exact)


def test_an_unknown_precision_raises_naming_the_argument():
  with pytest.raises(ValueError, match="precision"):
    soap_optax.soap(precision="float8")
  with pytest.raises(ValueError, match="precision"):
    soap_optax.kronecker_stats(0.9, precision="fast")
  with pytest.raises(ValueError, match="precision"):
    soap_optax.rotated_adam(precision="tf32")


def test_a_jax_precision_is_accepted():
  exact = run(soap_optax.soap(precision=jax.lax.Precision.HIGHEST, precondition_frequency=2))
  assert_trees_equal(exact, run(soap_optax.soap(precondition_frequency=2)))
