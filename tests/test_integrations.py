"""Specification: the optimizers work where users put them — Flax NNX and Linen, orbax checkpoints,
optax.inject_hyperparams — called as those libraries document, with no adaptation.

Every run trains the same tiny two-layer MLP on the same regression batches (a new one each
step) for `STEPS` steps with a refresh every `PRECONDITION_FREQUENCY` updates, so that each run
crosses refreshes. Runs are cached and shared between tests: the plain-optax run on the parameter
pytree is the reference that the NNX, Linen, injected and checkpointed runs must reproduce.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import aliases
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from aliases import ALIAS_PARAMS
from flax import nnx
from flax.training import train_state
from runner import assert_close, assert_equal, orbax_round_trip

import soap_optax

LEARNING_RATE = 1e-2
PRECONDITION_FREQUENCY = 3
STEPS = 8  # refreshes at updates 3 and 6
SAVE_AT = 4  # a checkpoint between the two refreshes: the resumed run crosses one

# One batch per step. The kernels are square and each batch has more rows than they have, so that
# every factor statistic has full rank from the first step: a basis is then determined up to signs,
# and runs that differ by rounding alone (an injected hyperparameter is a float32 array, not a
# Python float) stay close. (In a rank-deficient factor, the basis of its null space is arbitrary,
# and Adam's per-coordinate step in it amplifies rounding to order-one differences.)
_rng = np.random.default_rng(0)
X = _rng.standard_normal((STEPS, 16, 4)).astype(np.float32)
Y = _rng.standard_normal((STEPS, 16, 4)).astype(np.float32)
ALL_X, ALL_Y = X.reshape(-1, 4), Y.reshape(-1, 4)

# Every factor of the MLP's kernels (the biases are 1-D and get none by default).
FACTOR_KEYS = {"hidden/kernel:0", "hidden/kernel:1", "out/kernel:0", "out/kernel:1"}


class TinyMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(4, 4, rngs=rngs)
    self.out = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def handmade_chain() -> optax.GradientTransformation:
  """SOAP assembled by hand from the public blocks, with one LayoutRule shared by all of them."""
  layout = soap_optax.LayoutRule(max_precond_dim=64, precondition_1d=True)
  return optax.chain(
    optax.clip_by_global_norm(1.0),
    soap_optax.kronecker_stats(0.95, layout=layout),
    soap_optax.eigenbasis_refresh(PRECONDITION_FREQUENCY, layout=layout),
    soap_optax.rotated_adam(0.95, 0.95, 1e-8),
    optax.scale_by_learning_rate(LEARNING_RATE),
  )


@functools.cache
def make_tx(name: str) -> optax.GradientTransformation:
  if name == "handmade_chain":
    return handmade_chain()
  return aliases.ALIASES[name](
    learning_rate=LEARNING_RATE, precondition_frequency=PRECONDITION_FREQUENCY
  )


OPTIMIZER_PARAMS = [*ALIAS_PARAMS, pytest.param("handmade_chain", id="handmade_chain")]


# -- helpers ----------------------------------------------------------------------------------


def initial_params() -> dict:
  """The MLP's parameters as a pure nested dict (what `jax.eval_shape` of it describes)."""
  return nnx.to_pure_dict(nnx.state(TinyMLP(nnx.Rngs(0)), nnx.Param))


GRAPHDEF = nnx.graphdef(TinyMLP(nnx.Rngs(0)))


def pure_loss(params, x, y):
  return mse(nnx.merge(GRAPHDEF, params), x, y)


@functools.cache
def pure_stepper(tx: optax.GradientTransformation):
  """A jitted train step; ``step.traces`` counts how often jax traced (so compiled) it."""

  @jax.jit
  def step(params, state, x, y):
    traces.append(None)  # runs while tracing only
    loss, grads = jax.value_and_grad(pure_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  traces = []
  step.traces = traces
  return step


@nnx.jit
def nnx_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(mse)(model, x, y)
  optimizer.update(model, grads)
  return loss


def flat(tree) -> dict[str, np.ndarray]:
  """``{path: array}`` for every leaf of a pure pytree."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def model_params(model) -> dict[str, np.ndarray]:
  return flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same_params(actual: dict, expected: dict, *, rtol: float = 0.0, atol: float = 0.0):
  """Equal keys, finite values, and values equal: bit for bit unless a tolerance is given."""
  assert sorted(actual) == sorted(expected)
  assert expected, "no parameters to compare"
  for key, e in expected.items():
    a = actual[key]
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(e)), key
    if rtol or atol:
      assert_close(a, e, rtol=rtol, atol=atol, err_msg=key)
    else:
      assert_equal(a, e, err_msg=key)


def factor_keys(state) -> set[str]:
  """The keys of the factor statistics in ``state`` (which holds one KroneckerStatsState)."""
  found = optax.tree.get_all_with_path(state, "KroneckerStatsState")
  assert len(found) == 1, found
  return set(found[0][1].stats)


def assert_loss_falls(initial: float, final: float):
  """The loss on all the training data (every step's batch) fell by 3% at least."""
  assert np.isfinite(initial) and np.isfinite(final)
  assert final < 0.97 * initial


# -- the runs the tests share ------------------------------------------------------------------


@functools.cache
def pure_run(name: str):
  """The optimizer applied with plain optax calls to the MLP's pure parameter dict.

  Returns ``(params after each step, state after each step, losses)``; index 0 is the start.
  """
  tx = make_tx(name)
  step = pure_stepper(tx)
  params = [initial_params()]
  states = [tx.init(params[0])]
  losses = []
  for i in range(STEPS):
    p, s, loss = step(params[-1], states[-1], X[i], Y[i])
    params.append(p)
    states.append(s)
    losses.append(float(loss))
  return params, states, losses


@functools.cache
def nnx_run(name: str):
  """The optimizer through ``nnx.Optimizer`` and an ``nnx.jit`` step.

  Returns ``(model, (model, optimizer) cloned after SAVE_AT steps)``.
  """
  model = TinyMLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(name), wrt=nnx.Param)
  saved = None
  for i in range(STEPS):
    nnx_step(model, optimizer, X[i], Y[i])
    if i + 1 == SAVE_AT:
      saved = nnx.clone(model), nnx.clone(optimizer)
  return model, saved


# -- Flax NNX ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_PARAMS)
def test_nnx_optimizer_gives_the_parameters_of_plain_optax_on_the_parameter_pytree(name):
  model, _ = nnx_run(name)
  params, _, _ = pure_run(name)
  assert_same_params(model_params(model), flat(params[-1]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", OPTIMIZER_PARAMS)
def test_nnx_optimizer_lowers_the_loss(name):
  model, _ = nnx_run(name)
  initial = TinyMLP(nnx.Rngs(0))
  assert_loss_falls(float(mse(initial, ALL_X, ALL_Y)), float(mse(model, ALL_X, ALL_Y)))


@pytest.mark.parametrize("name", OPTIMIZER_PARAMS)
def test_nnx_optimizer_state_is_keyed_like_the_state_of_the_parameter_pytree(name):
  """The factor keys name the parameter, not the `nnx.Param` wrapper it is initialised with."""
  optimizer = nnx.Optimizer(TinyMLP(nnx.Rngs(0)), make_tx(name), wrt=nnx.Param)
  _, states, _ = pure_run(name)
  assert FACTOR_KEYS <= factor_keys(states[0])
  assert factor_keys(nnx.as_pure(optimizer.opt_state)) == factor_keys(states[0])


# -- Flax Linen -------------------------------------------------------------------------------


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4)(jnp.tanh(nn.Dense(4)(x)))


@functools.cache
def linen_runs():
  """SOAP through a Linen ``TrainState`` and through plain optax calls, from the same params.

  Returns ``(TrainState params, plain params, loss on all the data before, and after)``.
  """
  model = LinenMLP()
  params = model.init(jax.random.key(0), X[0])["params"]
  tx = make_tx("soap")

  def loss_fn(params, x, y):
    return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

  @jax.jit
  def train_step(state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
    return state.apply_gradients(grads=grads), loss

  @jax.jit
  def plain_step(params, opt_state, x, y):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  opt_state = tx.init(params)
  initial = float(loss_fn(params, ALL_X, ALL_Y))
  for i in range(STEPS):
    state, _ = train_step(state, X[i], Y[i])
    params, opt_state = plain_step(params, opt_state, X[i], Y[i])
  return state.params, params, initial, float(loss_fn(state.params, ALL_X, ALL_Y))


def test_linen_train_state_gives_the_parameters_of_plain_optax():
  trained, plain, _, _ = linen_runs()
  assert_same_params(flat(trained), flat(plain), rtol=1e-6, atol=1e-7)


def test_linen_train_state_lowers_the_loss():
  _, _, initial, final = linen_runs()
  assert_loss_falls(initial, final)


# -- orbax checkpoints, restored in a fresh process --------------------------------------------


def nnx_abstract(name: str):
  """``(graphdef, abstract state)`` of the model and its optimizer, without allocating."""

  def build():
    model = TinyMLP(nnx.Rngs(0))
    return model, nnx.Optimizer(model, make_tx(name), wrt=nnx.Param)

  return nnx.split(nnx.eval_shape(build))


def resume_all(root: str, kind: str) -> None:
  """Restores every alias's checkpoint of ``kind`` under ``root``, takes the remaining steps and
  saves the final params as ``<root>/<alias>.npz``.

  Runs in a fresh process (see `save_and_resume`): the optimizer state must come back from the files
  alone, restored against abstract targets.
  """
  checkpointer = ocp.StandardCheckpointer()
  for name in aliases.ALIASES:
    path = os.path.join(root, name)
    if kind == "plain":
      tx = make_tx(name)
      params = jax.eval_shape(initial_params)
      target = {"params": params, "opt_state": jax.eval_shape(tx.init, params)}
      restored = checkpointer.restore(path, target)
      params, state = restored["params"], restored["opt_state"]
      step = pure_stepper(tx)
      for i in range(SAVE_AT, STEPS):
        params, state, _ = step(params, state, X[i], Y[i])
      final = flat(params)
    else:
      graphdef, abstract = nnx_abstract(name)
      model, optimizer = nnx.merge(graphdef, checkpointer.restore(path, abstract))
      for i in range(SAVE_AT, STEPS):
        nnx_step(model, optimizer, X[i], Y[i])
      final = model_params(model)
    np.savez(f"{path}.npz", **final)


_RESUME = """
import sys
sys.path.insert(0, sys.argv[1])
import test_integrations
test_integrations.resume_all(sys.argv[2], sys.argv[3])
"""


def save_and_resume(root, kind: str, trees: dict):
  """Saves ``{alias: tree}`` under ``root`` and resumes them all in one fresh process."""
  checkpointer = ocp.StandardCheckpointer()
  for name, tree in trees.items():
    checkpointer.save(root / name, tree)
  checkpointer.wait_until_finished()
  result = subprocess.run(
    [sys.executable, "-c", _RESUME, os.path.dirname(__file__), str(root), kind],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=root,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  return root


@pytest.fixture(scope="module")
def plain_checkpoints(tmp_path_factory):
  """Every alias's params and optax state after `SAVE_AT` steps, saved and resumed elsewhere."""
  trees = {}
  for name in aliases.ALIASES:
    params, states, _ = pure_run(name)
    trees[name] = {"params": params[SAVE_AT], "opt_state": states[SAVE_AT]}
  return save_and_resume(tmp_path_factory.mktemp("plain"), "plain", trees)


@pytest.fixture(scope="module")
def nnx_checkpoints(tmp_path_factory):
  """Every alias's NNX model and optimizer after `SAVE_AT` steps, saved and resumed elsewhere."""
  trees = {name: nnx.state(nnx_run(name)[1]) for name in aliases.ALIASES}
  return save_and_resume(tmp_path_factory.mktemp("nnx"), "nnx", trees)


def load(path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return dict(data)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_optax_state_restored_in_a_fresh_process_continues_bit_identically(
  name, plain_checkpoints
):
  params, _, _ = pure_run(name)
  assert_same_params(load(plain_checkpoints / f"{name}.npz"), flat(params[-1]))


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_nnx_optimizer_restored_in_a_fresh_process_continues_bit_identically(
  name, nnx_checkpoints
):
  model, _ = nnx_run(name)
  assert_same_params(load(nnx_checkpoints / f"{name}.npz"), model_params(model))


def dict_keys(tree) -> set[str]:
  """Every key of every dict nested in ``tree`` (dicts and lists, as orbax's metadata has)."""
  if isinstance(tree, dict):
    return set(tree) | {k for v in tree.values() for k in dict_keys(v)}
  if isinstance(tree, (list, tuple)):
    return {k for v in tree for k in dict_keys(v)}
  return set()


def checkpoint_keys(path) -> set[str]:
  return dict_keys(ocp.StandardCheckpointer().metadata(path).item_metadata.tree)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_optax_checkpoint_names_each_factor_by_its_parameter_path(name, plain_checkpoints):
  assert FACTOR_KEYS <= checkpoint_keys(plain_checkpoints / name)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_nnx_checkpoint_names_each_factor_by_its_parameter_path(name, nnx_checkpoints):
  assert FACTOR_KEYS <= checkpoint_keys(nnx_checkpoints / name)


# -- optax.inject_hyperparams without static_args ----------------------------------------------


@functools.cache
def injected_run(name: str):
  """The alias under ``optax.inject_hyperparams`` with no ``static_args``, as `pure_run` runs it.

  Returns ``(params, state, step)`` after ``STEPS`` steps.
  """
  tx = optax.inject_hyperparams(aliases.ALIASES[name])(
    learning_rate=LEARNING_RATE, precondition_frequency=PRECONDITION_FREQUENCY
  )
  step = pure_stepper(tx)
  params = initial_params()
  state = tx.init(params)
  for i in range(STEPS):
    params, state, _ = step(params, state, X[i], Y[i])
  return params, state, step


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_inject_hyperparams_without_static_args_gives_the_updates_of_the_plain_alias(name):
  injected, state, _ = injected_run(name)
  params, _, _ = pure_run(name)
  assert {"learning_rate", "precondition_frequency"} <= set(state.hyperparams)
  # Injected hyperparameters are float32 arrays: for Shampoo's b2 = 0.999, 1 - b2 is then 5e-5
  # (relative) off the Python float's, and the inverse roots amplify that a little.
  assert_same_params(flat(injected), flat(params[-1]), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_an_injected_learning_rate_changes_without_recompiling(name):
  params, state, step = injected_run(name)
  compiled = len(step.traces)
  zero = jnp.zeros_like(state.hyperparams["learning_rate"])
  state = state._replace(hyperparams={**state.hyperparams, "learning_rate": zero})
  new_params, _, _ = step(params, state, X[0], Y[0])
  assert_same_params(flat(new_params), flat(params))
  assert len(step.traces) == compiled == 1


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_shape_deciding_argument_must_be_listed_in_static_args(name):
  """Injected, it would be a traced array in `update`, where it decides array shapes."""
  tx = optax.inject_hyperparams(aliases.ALIASES[name])(learning_rate=1e-3, max_precond_dim=64)
  params = initial_params()
  with pytest.raises(ValueError, match=r"max_precond_dim.*static_args"):
    jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize("name", ALIAS_PARAMS)
def test_a_shape_deciding_argument_in_static_args_shapes_the_state(name):
  tx = optax.inject_hyperparams(aliases.ALIASES[name], static_args=("max_precond_dim",))(
    learning_rate=1e-3, max_precond_dim=4
  )
  params = {"w": jnp.ones((4, 6))}
  state = tx.init(params)
  assert factor_keys(state) == {"w:0"}  # the axis of length 6 gets no factor
  updates, _ = jax.eval_shape(tx.update, params, state, params)
  assert updates["w"].shape == (4, 6)


# -- a scanned NNX model: stacked layers with stacked_axes=1 -------------------------------------

SCANNED_LAYERS = 3


class ScannedResidualMLP(nnx.Module):
  """Residual layers created with ``nnx.vmap`` and run with ``nnx.scan``: kernels ``(3, 4, 4)``."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=SCANNED_LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_layers(rngs):
      return nnx.Linear(4, 4, rngs=rngs)

    self.layers = make_layers(rngs)
    self.head = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, layer):
      return x + jnp.tanh(layer(x))

    return self.head(forward(x, self.layers))


class UnrolledResidualMLP(nnx.Module):
  """The same network with one module, so one parameter per kernel, per layer."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs) for _ in range(SCANNED_LAYERS)])
    self.head = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = x + jnp.tanh(layer(x))
    return self.head(x)


def scanned_soap() -> optax.GradientTransformation:
  """The recipe of docs/scaling.md: the stack with ``stacked_axes=1``, the rest as usual."""
  settings = dict(learning_rate=LEARNING_RATE, precondition_frequency=PRECONDITION_FREQUENCY)

  def label(path, _):
    return "layers" if path[0].key == "layers" else "rest"

  return soap_optax.skip_nonfinite_steps(
    optax.partition(
      {"layers": soap_optax.soap(stacked_axes=1, **settings), "rest": soap_optax.soap(**settings)},
      lambda params: jax.tree.map_with_path(label, params),
    )
  )


def test_a_scanned_nnx_model_with_stacked_axes_trains_as_its_unrolled_twin_with_soap():
  scanned = ScannedResidualMLP(nnx.Rngs(0))
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  unrolled = UnrolledResidualMLP(nnx.Rngs(1))
  nnx.update(
    unrolled,
    {
      "head": stacked["head"],
      "layers": {
        i: jax.tree.map(lambda x, i=i: x[i], stacked["layers"]) for i in range(SCANNED_LAYERS)
      },
    },
  )
  runs = [
    (scanned, nnx.Optimizer(scanned, scanned_soap(), wrt=nnx.Param)),
    (unrolled, nnx.Optimizer(unrolled, make_tx("soap"), wrt=nnx.Param)),
  ]
  for model, optimizer in runs:
    for i in range(STEPS):  # refreshes every PRECONDITION_FREQUENCY steps
      nnx_step(model, optimizer, X[i], Y[i])
  partition = optax.tree.get(nnx.as_pure(runs[0][1].opt_state), "PartitionState")
  stats = optax.tree.get(partition.inner_states["layers"], "KroneckerStatsState").stats
  assert stats["layers/kernel:0"].shape == (SCANNED_LAYERS, 4, 4)
  got = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  want = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
  assert_same_params(flat(got["head"]), flat(want["head"]), rtol=1e-5, atol=1e-6)
  for i in range(SCANNED_LAYERS):
    layer = jax.tree.map(lambda x, i=i: x[i], got["layers"])
    assert_same_params(flat(layer), flat(want["layers"][i]), rtol=1e-5, atol=1e-6)


def test_the_state_of_the_scanned_recipe_survives_an_orbax_save_and_restore(tmp_path):
  params = {"layers": {"kernel": jnp.ones((3, 4, 4)), "bias": jnp.zeros((3, 4))}}
  params["head"] = jnp.ones((4, 4))
  tx = scanned_soap()
  state, step = tx.init(params), jax.jit(tx.update)
  for i in range(4):  # across the refresh at update 3
    grads = {"layers": {"kernel": jnp.asarray(X[i, :12].reshape(3, 4, 4))}}
    grads["layers"]["bias"], grads["head"] = jnp.asarray(X[i, :3]), jnp.asarray(Y[i, :4])
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  restored = orbax_round_trip(tmp_path / "state", state)
  assert_same_params(flat(restored), flat(state))
  after_restore, _ = step(grads, restored, params)
  after_save, _ = step(grads, state, params)
  assert_same_params(flat(after_restore), flat(after_save))
