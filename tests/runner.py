"""Runs an optax optimizer and an oracle over the same gradients, and compares the results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax


def run_optimizer(tx, params, grads, dtype):
  """Applies ``tx`` (jitted) over the gradient sequence; returns the final params as NumPy."""
  p = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  state = tx.init(p)

  @jax.jit
  def step(p, state, g):
    updates, state = tx.update(g, state, p)
    return optax.apply_updates(p, updates), state

  for g in grads:
    p, state = step(p, state, jax.tree.map(lambda x: jnp.asarray(x, dtype), g))
  return jax.tree.map(np.asarray, p)


def run_oracle(oracle, params, grads):
  """Steps a NumPy oracle over the gradient sequence; returns its final params."""
  p = params
  for g in grads:
    p = oracle.step(p, g)
  return p


def cumulative_update_errors(start, ours, reference):
  """Per parameter, ‖Δours − Δreference‖ / ‖Δreference‖ of the total change from ``start``."""
  errors = {}
  for name in start:
    want = reference[name] - start[name]
    got = np.asarray(ours[name], np.float64) - start[name]
    errors[name] = np.linalg.norm(got - want) / np.linalg.norm(want)
  return errors
