"""`soap` against the independent float64 NumPy oracle of the authors' PyTorch SOAP."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import SoapOracle
from runner import (
  XLA_DEFAULTS,
  assert_updates_close,
  cumulative_update_errors,
  run_optimizer,
  run_oracle,
)

import soap_optax

STEPS = 32  # the init call + 31 updates: refreshes at updates 10, 20 and 30

# Shapes whose factors are full rank from the first gradient, so the eigenbasis is unique.
SHAPES = {
  "matrix": (6, 6),
  "tensor3d": (4, 4, 16),  # merged to (16, 16) when max_precond_dim=16
  "conv": (2, 2, 4, 16),  # merged to (16, 16) with max_precond_dim=16
  "wide": (3, 10001),  # the long axis exceeds every max_precond_dim used: only axis 0 rotates
  "vector": (7,),
  "scalar": (),
}

SETTINGS = {
  "defaults": dict(),
  "small_max_dim": dict(max_precond_dim=16),
  "merged": dict(max_precond_dim=16, merge_dims=True),
  "fast_refresh": dict(
    b1=0.9, b2=0.99, shampoo_beta=0.9, precondition_frequency=3, weight_decay=0.1, eps=1e-6
  ),
  "normalized_no_bias_correction": dict(
    normalize_grads=True, correct_bias=False, weight_decay=0.0, precondition_frequency=4
  ),
}


def _params_and_grads(seed, shapes, steps):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
  return params, grads


@pytest.mark.parametrize("setting", SETTINGS)
def test_soap_matches_reference_in_float32(setting):
  params, grads = _params_and_grads(0, SHAPES, STEPS)
  hparams = SETTINGS[setting]
  ours = run_optimizer(soap_optax.soap(**hparams), params, grads, jnp.float32)
  reference = run_oracle(SoapOracle(**hparams), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("setting", SETTINGS)
def test_soap_matches_reference_in_float64(setting):
  params, grads = _params_and_grads(1, SHAPES, STEPS)
  hparams = SETTINGS[setting]
  with jax.enable_x64(True):
    ours = run_optimizer(soap_optax.soap(**hparams), params, grads, jnp.float64)
  reference = run_oracle(SoapOracle(**hparams), params, grads)
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("dtype, tol, seed", [(jnp.float32, 1e-4, 0), (jnp.float64, 1e-9, 1)])
def test_soap_compiled_with_xla_defaults_matches_reference(dtype, tol, seed):
  # The suite compiles with a cheaper code generator than users get (tests/environment.py);
  # this runs the reference comparison (the seeds of the tests above) through XLA's default one.
  params, grads = _params_and_grads(seed, SHAPES, STEPS)
  hparams = SETTINGS["fast_refresh"]
  with jax.enable_x64(dtype == jnp.float64):
    tx = soap_optax.soap(**hparams)
    ours = run_optimizer(tx, params, grads, dtype, compiler_options=XLA_DEFAULTS)
  reference = run_oracle(SoapOracle(**hparams), params, grads)
  assert_updates_close(params, ours, reference, tol)


def test_soap_with_a_learning_rate_schedule_matches_reference():
  params, grads = _params_and_grads(2, SHAPES, STEPS)
  # Dyadic end points make every float32 value of the schedule exact, so the oracle (which
  # writes the schedule out in Python floats) sees the very learning rates optax computes.
  schedule = optax.linear_schedule(2.0**-6, 2.0**-7, STEPS)
  with jax.enable_x64(True):
    ours = run_optimizer(soap_optax.soap(learning_rate=schedule), params, grads, jnp.float64)
  reference = run_oracle(
    SoapOracle(lr=lambda t: 2.0**-6 - 2.0**-7 * min(t, STEPS) / STEPS), params, grads
  )
  errors = cumulative_update_errors(params, ours, reference)
  assert max(errors.values()) < 1e-9, errors


def test_soap_preconditions_vectors_when_asked():
  # A vector's factor is rank one after the first gradient, so its eigenbasis is not unique:
  # hand the oracle the library's first basis, then both must agree from there on.
  shapes = {"vector": (5,)}
  params, grads = _params_and_grads(3, shapes, STEPS)
  hparams = dict(precondition_1d=True, precondition_frequency=3)
  with jax.enable_x64(True):
    tx = soap_optax.soap(**hparams)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(tx.update)
    oracle = SoapOracle(**hparams)
    q = dict(params)
    for i, g in enumerate(grads):
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
      q = oracle.step(q, g)
      if i == 0:
        basis = state.inner_state[1].basis["vector:0"][0]
        oracle.state["vector"]["Q"][0] = np.asarray(basis)
  errors = cumulative_update_errors(params, p, q)
  assert max(errors.values()) < 1e-9, errors
