"""Specification: ``group_equal_layouts`` computes parameters of equal layout as one stack.

Grouping changes where the state lives (one entry per group, keyed ``"<first path>+<more>"``)
and how much program the update compiles to, never what a parameter's update is: every test here
compares a grouped run with the ungrouped one or with the float64 oracles of the other tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from aliases import ALIASES
from flax import nnx
from oracles import SoapOracle
from oracles_family import EigenAdafactorOracle, EShampooOracle, ShampooOracle
from runner import (
  assert_close,
  assert_trees_equal,
  assert_updates_close,
  orbax_round_trip,
  run_optimizer,
  run_oracle,
)

import soap_optax

# Three (8, 6) kernels (one of them bfloat16: it computes in float32, so it joins the others), a
# transposed one, one of its own, two biases and a scalar: groups of 3, 2 and 1.
SHAPES = {
  "attn": {"q": (8, 6), "k": (8, 6), "v": (8, 6)},
  "mlp": {"up": (6, 8), "down": (10, 7)},
  "bias": {"a": (6,), "b": (6,)},
  "scale": (),
}
BFLOAT16 = ("attn", "v")
STEPS = 8  # the init call and 7 updates: refreshes at updates 3 and 6

# Blocks of 4 cut every axis of the kernels raggedly (6 = 4 + 2, 10 = 4 + 4 + 2, 7 = 4 + 3), and
# the stagger spreads the refreshes over the window, so a group's members refresh at different
# steps.
SETTINGS = {
  "unblocked": dict(),
  "ragged_blocks_staggered": dict(block_size=4, stagger_refresh=True),
}


def _arrays(rng) -> dict:
  """A tree of SHAPES filled from ``rng``, the BFLOAT16 leaf in bfloat16."""
  out = {}
  for group, entry in SHAPES.items():
    if isinstance(entry, dict):
      out[group] = {
        name: jnp.asarray(
          rng.standard_normal(shape),
          jnp.bfloat16 if (group, name) == BFLOAT16 else jnp.float32,
        )
        for name, shape in entry.items()
      }
    else:
      out[group] = jnp.asarray(rng.standard_normal(entry), jnp.float32)
  return out


def _updates(tx, seed=0) -> list:
  """The updates of ``tx`` (jitted) over STEPS random gradients, as float32 NumPy trees."""
  rng = np.random.default_rng(seed)
  params = _arrays(rng)
  state, step = tx.init(params), jax.jit(tx.update)
  out = []
  for _ in range(STEPS):
    updates, state = step(_arrays(rng), state, params)
    out.append(jax.tree.map(lambda u: np.asarray(u, np.float32), updates))
  return out


def _stats_keys(state) -> set[str]:
  return set(optax.tree.get(state, "KroneckerStatsState").stats)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", ALIASES)
def test_grouped_updates_equal_the_ungrouped_ones_across_refreshes(name, setting):
  """Each parameter's update is the one it gets alone, within float32 rounding (the batched
  products of a larger stack may round differently); the bfloat16 member's update is rounded to
  bfloat16 by the alias, so its tolerance is one bfloat16 step."""
  kwargs = dict(learning_rate=1.0, weight_decay=0.0, precondition_frequency=3, **SETTINGS[setting])
  grouped = _updates(ALIASES[name](group_equal_layouts=True, **kwargs))
  alone = _updates(ALIASES[name](**kwargs))
  compared = 0
  for step, (ours, want) in enumerate(zip(grouped, alone, strict=True)):
    for (path, u), w in zip(
      jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(want), strict=True
    ):
      bf16 = tuple(k.key for k in path) == BFLOAT16
      rtol, atol = (2**-7, 1e-6) if bf16 else (1e-5, 1e-6)
      assert_close(u, w, rtol=rtol, atol=atol, err_msg=f"{name} step {step} {path}")
      compared += int(step > 0 and np.any(w != 0))
  assert compared >= 8 * (STEPS - 2)  # every parameter moved on every real update


@pytest.mark.parametrize("name", ALIASES)
def test_grouped_state_is_keyed_by_group(name):
  params = _arrays(np.random.default_rng(1))
  state = ALIASES[name](group_equal_layouts=True, block_size=4).init(params)
  assert _stats_keys(state) == {
    "attn/k+2:0",
    "attn/k+2:1",
    "mlp/up:0",
    "mlp/up:1",
    "mlp/down:0",
    "mlp/down:1",
  }
  # Three (8, 6) kernels in 2 × 2 blocks of 4 × 4: their twelve blocks one after another.
  assert optax.tree.get(state, "KroneckerStatsState").stats["attn/k+2:0"].shape == (12, 4, 4)


# -- the float64 oracles, with grouping ---------------------------------------------------------

# Pairs of equal shapes, so that every kind of parameter is grouped (vectors and the scalar too).
ORACLE_SHAPES = {
  "a": (6, 6),
  "b": (6, 6),
  "c": (4, 4, 16),
  "d": (4, 4, 16),
  "u": (7,),
  "v": (7,),
  "s": (),
  "t": (),
}
ORACLE_STEPS = 16


def _oracle_data(seed):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in ORACLE_SHAPES.items()}
  grads = [
    {k: rng.standard_normal(s) for k, s in ORACLE_SHAPES.items()} for _ in range(ORACLE_STEPS)
  ]
  return params, grads


# (alias, its arguments, the oracle, the oracle's arguments, tolerance): each with a refresh
# every few steps; Shampoo blocked (ragged), EShampoo with the adaptive skip test (a decision per
# block), SOAP staggered (a phase per member).
ORACLES = {
  "soap": (
    dict(learning_rate=1e-2, precondition_frequency=3, stagger_refresh=True),
    SoapOracle,
    dict(lr=1e-2, precondition_frequency=3, stagger=True),
    1e-8,
  ),
  "shampoo": (
    dict(learning_rate=1e-2, precondition_frequency=4, block_size=4),
    ShampooOracle,
    dict(lr=1e-2, precondition_frequency=4, block_size=4),
    1e-8,
  ),
  "eigen_adafactor": (
    dict(precondition_frequency=3, b1=0.9, b2=0.99),
    EigenAdafactorOracle,
    dict(precondition_frequency=3, b1=0.9, b2=0.99),
    1e-9,
  ),
  "eshampoo": (
    dict(precondition_frequency=3, refresh_tolerance=0.2, max_qr_iterations=3),
    EShampooOracle,
    dict(precondition_frequency=3, refresh_tolerance=0.2, max_qr_iterations=3),
    1e-9,
  ),
}


@pytest.mark.parametrize("name", ORACLES)
def test_grouped_alias_matches_its_float64_oracle(name):
  kwargs, oracle, oracle_kwargs, tol = ORACLES[name]
  params, grads = _oracle_data(20)
  tx = ALIASES[name](group_equal_layouts=True, **kwargs)
  with jax.enable_x64(True):
    keys = _stats_keys(tx.init(jax.tree.map(jnp.asarray, params)))
    ours = run_optimizer(tx, params, grads, jnp.float64)
  assert {"a+1:0", "c+1:0"} <= keys  # the equal shapes were grouped
  assert_updates_close(params, ours, run_oracle(oracle(**oracle_kwargs), params, grads), tol)


# -- checkpoints and Flax NNX -------------------------------------------------------------------


def test_a_grouped_state_survives_an_orbax_save_and_restore(tmp_path):
  rng = np.random.default_rng(2)
  params = _arrays(rng)
  tx = soap_optax.soap(group_equal_layouts=True, precondition_frequency=3)
  state, step = tx.init(params), jax.jit(tx.update)
  for _ in range(4):  # across the refresh at update 3
    grads = _arrays(rng)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  restored = orbax_round_trip(tmp_path / "state", state)
  assert_trees_equal(restored, state)
  assert "attn/k+2:0" in _stats_keys(restored)
  assert_trees_equal(step(grads, restored, params), step(grads, state, params))


class _TwinLayers(nnx.Module):
  """Two layers of one shape and a head of another: a group of two and one of one."""

  def __init__(self, rngs: nnx.Rngs):
    self.first = nnx.Linear(4, 4, rngs=rngs)
    self.second = nnx.Linear(4, 4, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.second(jnp.tanh(self.first(x)))))


@pytest.mark.parametrize("name", ALIASES)
def test_nnx_optimizer_with_grouping_gives_the_ungrouped_parameters(name):
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((6, 16, 4)), rng.standard_normal((6, 16, 2))

  @nnx.jit
  def step(model, optimizer, x, y):
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    optimizer.update(model, nnx.grad(loss)(model))

  trained = []
  for grouped in (True, False):
    model = _TwinLayers(nnx.Rngs(0))
    tx = ALIASES[name](learning_rate=1e-2, precondition_frequency=2, group_equal_layouts=grouped)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for i in range(len(x)):
      step(model, optimizer, jnp.asarray(x[i], jnp.float32), jnp.asarray(y[i], jnp.float32))
    trained.append(nnx.state(model, nnx.Param))
    if grouped:
      keys = _stats_keys(nnx.as_pure(optimizer.opt_state))
      assert "first/kernel+1:0" in keys and "head/kernel:1" in keys, keys
  moved = 0
  for ours, want, start in zip(
    jax.tree.leaves(trained[0]),
    jax.tree.leaves(trained[1]),
    jax.tree.leaves(nnx.state(_TwinLayers(nnx.Rngs(0)), nnx.Param)),
    strict=True,
  ):
    # Float32 rounding, amplified by Shampoo's inverse roots over six steps (measured 3e-6).
    assert_close(ours, want, rtol=1e-4, atol=1e-5)
    moved += int(np.any(np.asarray(ours) != np.asarray(start)))
  assert moved == 6


def test_diagnostics_of_a_grouped_state_report_each_parameter_given_params_and_rule():
  kwargs = dict(learning_rate=1e-2, precondition_frequency=3, block_size=4)
  rule = soap_optax.LayoutRule(block_size=4, group_equal_layouts=True)
  reports = []
  for tx in (soap_optax.soap(**kwargs), soap_optax.soap(group_equal_layouts=True, **kwargs)):
    rng = np.random.default_rng(5)
    params = _arrays(rng)
    state = tx.init(params)
    for _ in range(4):
      _, state = jax.jit(tx.update)(_arrays(rng), state, params)
    reports.append(soap_optax.diagnostics(state, params, rule))
  reports.append(soap_optax.diagnostics(state))  # the grouped state, reported per group
  alone, grouped, per_group = (r.factors for r in reports)
  assert "attn/k+2:0" in per_group and "attn/k+2:0" not in grouped
  assert sorted(grouped) == sorted(alone) and "attn/v:0" in grouped
  for key, want in alone.items():
    for field, ours, expected in zip(want._fields, grouped[key], want, strict=True):
      assert ours.shape == expected.shape, (key, field)
      assert_close(ours, expected, rtol=1e-4, atol=1e-6, err_msg=f"{key} {field}")


# -- an ungrouped state read into the grouped layout -------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
def test_an_ungrouped_state_continues_identically_after_group_state(name):
  """Four ungrouped steps (a refresh at update 3), the state regrouped, then three more steps:
  the grouped chain from the regrouped state makes the ungrouped chain's updates."""
  kwargs = dict(learning_rate=1.0, weight_decay=0.0, precondition_frequency=3, block_size=4)
  if name == "shampoo":
    kwargs["b1"] = 0.9  # Shampoo keeps a first moment only when it filters the gradient
  alone, grouped = ALIASES[name](**kwargs), ALIASES[name](group_equal_layouts=True, **kwargs)
  rng = np.random.default_rng(4)
  params = _arrays(rng)
  state = alone.init(params)
  for _ in range(4):
    _, state = jax.jit(alone.update)(_arrays(rng), state, params)
  regrouped = soap_optax.group_state(
    state, params, soap_optax.LayoutRule(block_size=4, group_equal_layouts=True)
  )
  template = grouped.init(params)
  assert jax.tree.structure(regrouped) == jax.tree.structure(template)
  for ours, want in zip(jax.tree.leaves(regrouped), jax.tree.leaves(template), strict=True):
    assert (ours.shape, ours.dtype) == (want.shape, want.dtype)
  compared = 0
  for _ in range(3):
    grads = _arrays(rng)
    want, state = jax.jit(alone.update)(grads, state, params)
    ours, regrouped = jax.jit(grouped.update)(grads, regrouped, params)
    for (path, u), w in zip(
      jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(want), strict=True
    ):
      bf16 = tuple(k.key for k in path) == BFLOAT16
      rtol, atol = (2**-7, 1e-6) if bf16 else (1e-5, 1e-6)
      assert_close(u, w, rtol=rtol, atol=atol, err_msg=f"{name} {path}")
      compared += int(np.any(np.asarray(w) != 0))
  assert compared == 3 * 8


def test_group_state_needs_a_grouping_rule():
  params = {"a": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="group_equal_layouts=True"):
    soap_optax.group_state(soap_optax.soap().init(params), params, soap_optax.LayoutRule())


# -- a chain that does not share the rule -------------------------------------------------------


def test_a_block_without_the_grouping_rule_says_to_pass_it():
  grouped = soap_optax.LayoutRule(group_equal_layouts=True)
  tx = optax.chain(
    soap_optax.kronecker_stats(layout=grouped),
    soap_optax.eigenbasis_refresh(layout=grouped),
    soap_optax.rotated_adam(),  # no layout: it would keep parameter-shaped moments
  )
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="layout=rule"):
    tx.update(params, tx.init(params))


def test_a_refresh_with_another_grouping_than_the_statistics_is_an_error():
  tx = optax.chain(
    soap_optax.kronecker_stats(layout=soap_optax.LayoutRule(group_equal_layouts=True)),
    soap_optax.eigenbasis_refresh(layout=soap_optax.LayoutRule()),
  )
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones((3, 2))}
  with pytest.raises(ValueError, match="same LayoutRule"):
    tx.update(params, tx.init(params))
