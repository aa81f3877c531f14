"""Specification: the optimizers minimise. Only robust facts are asserted.

Each claim takes the best of a grid of learning rates, all compiled once: the learning rate is a
traced argument and the grid is a ``lax.map``. The optimizers of the family differ in their
learning-rate scale (Shampoo's grafted step is small), so the grid is wide.
"""

from __future__ import annotations

import aliases
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIAS_PARAMS

STEPS = 200
GRID = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
COMPARISON_GRID = (3e-2, 1e-1, 3e-1, 1.0)  # SOAP's and Adam's best learning rates are inside
SGD_GRID = (0.5, 1.0, 1.5, 1.9)  # SGD diverges above 2 / λ_max = 2
MLP_GRID = (3e-3, 1e-2, 3e-2, 1e-1)


def final_losses(make, loss, params, grid, cosine=False, steps=STEPS):
  """The loss after ``steps`` full-batch steps of ``make(learning_rate)``, per grid point.

  With ``cosine`` the learning rate decays from the grid point to zero over the run.
  """

  @jax.jit
  def sweep(peaks):
    def train(peak):
      tx = make(optax.cosine_decay_schedule(peak, steps) if cosine else peak)

      def body(carry, _):
        p, state = carry
        updates, state = tx.update(jax.grad(loss)(p), state, p)
        return (optax.apply_updates(p, updates), state), None

      (p, _), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
      return loss(p)

    return jax.lax.map(train, peaks)

  return np.asarray(sweep(jnp.asarray(grid, jnp.float32)))


def best(losses):
  return np.nanmin(np.where(np.isfinite(losses), losses, np.nan))


def alias_factory(name):
  # The alias's own defaults (refresh every 10 updates, every axis rotated), no weight decay.
  return lambda lr: aliases.make_default(name, learning_rate=lr, weight_decay=0.0)


# -- an ill-conditioned quadratic ------------------------------------------------------------


def spd(rng, n, condition):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  return (q * np.logspace(-np.log10(condition), 0, n)) @ q.T


@pytest.fixture(scope="module")
def quadratic():
  """``0.5·tr(Wᵀ A W B)`` for W of shape (8, 6); A and B SPD with condition number 100."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(spd(rng, 8, 100.0), jnp.float32)
  b = jnp.asarray(spd(rng, 6, 100.0), jnp.float32)
  w0 = jnp.asarray(rng.standard_normal((8, 6)), jnp.float32)
  loss = lambda w: 0.5 * jnp.trace(w.T @ a @ w @ b)  # noqa: E731
  return loss, w0, float(loss(w0))


@pytest.fixture(scope="module")
def soap_on_quadratic(quadratic):
  loss, w0, _ = quadratic
  return best(final_losses(alias_factory("soap"), loss, w0, COMPARISON_GRID, cosine=True))


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_minimises_an_ill_conditioned_quadratic(name, quadratic):
  """The best constant learning rate of a wide grid cuts the loss a thousandfold in 200 steps."""
  loss, w0, start = quadratic
  assert best(final_losses(alias_factory(name), loss, w0, GRID)) < 1e-3 * start


def test_soap_beats_tuned_sgd_on_the_quadratic_by_far(quadratic, soap_on_quadratic):
  """Both cosine-decayed from the best of four peak learning rates: SOAP ends 100x lower."""
  loss, w0, _ = quadratic
  sgd = best(final_losses(optax.sgd, loss, w0, SGD_GRID, cosine=True))
  assert soap_on_quadratic < 0.01 * sgd


def test_soap_beats_tuned_adam_on_the_quadratic(quadratic, soap_on_quadratic):
  """Same betas, same grid: the eigenbasis is what SOAP adds to Adam."""
  loss, w0, _ = quadratic
  adam_095 = lambda lr: optax.adam(lr, b1=0.95, b2=0.95)  # noqa: E731
  adam = best(final_losses(adam_095, loss, w0, COMPARISON_GRID, cosine=True))
  assert soap_on_quadratic < adam


# -- a small MLP -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression():
  """A 2-layer tanh MLP (8 -> 32 -> 1) fitting a fixed random teacher on 64 points."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
  teacher_in = rng.standard_normal((8, 16)) / np.sqrt(8)
  teacher_out = rng.standard_normal((16, 1)) / 4
  y = jnp.asarray(np.sin(np.asarray(x) @ teacher_in) @ teacher_out, jnp.float32)
  params = {
    "w1": jnp.asarray(rng.standard_normal((8, 32)) / np.sqrt(8), jnp.float32),
    "b1": jnp.zeros((32,), jnp.float32),
    "w2": jnp.asarray(rng.standard_normal((32, 1)) / np.sqrt(32), jnp.float32),
    "b2": jnp.zeros((1,), jnp.float32),
  }

  def loss(p):
    hidden = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((hidden @ p["w2"] + p["b2"] - y) ** 2)

  return loss, params, float(loss(params))


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_trains_a_small_mlp_far_below_its_initial_loss(name, regression):
  """Full-batch, 200 steps, the best of four constant learning rates: below 1% of the start."""
  loss, params, start = regression
  losses = final_losses(alias_factory(name), loss, params, MLP_GRID)
  assert best(losses) < 1e-2 * start
