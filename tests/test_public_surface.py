"""Specification of the public surface: what is exported, deprecated and documented."""

from __future__ import annotations

import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import optax
import pytest
from runner import assert_trees_close

import soap_optax
from soap_optax import _alias

SCALE_BY = {
  "soap": soap_optax.scale_by_soap,
  "shampoo": soap_optax.scale_by_shampoo,
  "eigen_adafactor": soap_optax.scale_by_eigen_adafactor,
  "eshampoo": soap_optax.scale_by_eshampoo,
}
ALIASES = {name: getattr(soap_optax, name) for name in SCALE_BY}
FRAME = ("learning_rate", "weight_decay", "weight_decay_mask")


def test_every_name_in_all_is_importable():
  missing = [name for name in soap_optax.__all__ if not hasattr(soap_optax, name)]
  assert soap_optax.__all__ and not missing


@pytest.mark.parametrize("name", ["ema_momentum", "EmaMomentumState", "merge_dims"])
def test_a_deprecated_name_still_works_with_a_warning_that_says_what_to_use(name):
  with pytest.warns(DeprecationWarning, match=f"soap_optax.{name} is deprecated.*use"):
    value = getattr(soap_optax, name)
  assert value is not None and name not in soap_optax.__all__


def test_an_unknown_name_raises_attribute_error():
  with pytest.raises(AttributeError, match="no_such_name"):
    soap_optax.no_such_name  # noqa: B018


@pytest.mark.parametrize("name", list(SCALE_BY))
def test_scale_by_takes_the_alias_arguments_but_learning_rate_and_decay(name):
  alias = inspect.signature(ALIASES[name]).parameters
  scale_by = inspect.signature(SCALE_BY[name]).parameters
  assert list(scale_by) == [p for p in alias if p not in FRAME]
  for p, parameter in scale_by.items():
    assert parameter.default == alias[p].default, p
    assert parameter.kind == alias[p].kind, p


@pytest.mark.parametrize("name", list(SCALE_BY))
def test_the_alias_is_its_scale_by_then_learning_rate_and_decay(name):
  """Same updates and the same state values, step by step, as ``scale_by_*`` chained with
  optax's learning rate (no decay here, where optax's and the reference's forms agree), in
  float64, where the two programs' different fusion leaves only rounding."""
  with jax.enable_x64(True):
    params = {"w": jnp.arange(12.0).reshape(4, 3) / 10, "b": jnp.ones(3)}
    alias = ALIASES[name](learning_rate=0.1, weight_decay=0.0, precondition_frequency=2)
    composed = optax.chain(
      SCALE_BY[name](precondition_frequency=2), optax.scale_by_learning_rate(0.1)
    )
    a_state, c_state = alias.init(params), composed.init(params)
    for step in range(5):
      grads = {k: jnp.sin(v * (step + 1)) for k, v in params.items()}
      a_updates, a_state = alias.update(grads, a_state, params)
      c_updates, c_state = composed.update(grads, c_state, params)
      assert_trees_close(a_updates, c_updates, rtol=1e-10, atol=1e-14)
  a_bases = optax.tree.get(a_state, "EigenbasisState")
  c_bases = optax.tree.get(c_state, "EigenbasisState")
  assert_trees_close(a_bases, c_bases, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", list(ALIASES))
def test_the_alias_state_tree_is_the_flat_chain_of_earlier_releases(name):
  """Checkpoints written before ``scale_by_*`` existed restore: the alias's state is
  ``ApplyIfFiniteState(inner=(stats, bases, direction, lr, decay, cast))``."""
  state = ALIASES[name]().init({"w": jnp.zeros((3, 2))})
  assert isinstance(state, optax.ApplyIfFiniteState)
  inner = state.inner_state
  assert len(inner) == 6
  assert isinstance(inner[0], soap_optax.KroneckerStatsState)
  assert isinstance(inner[1], soap_optax.EigenbasisState)
  assert isinstance(inner[4], soap_optax.WeightDecayAfterStepState)
  assert sorted(inner[0].stats) == ["w:0", "w:1"]


def test_shared_arguments_are_documented_whatever_the_docstring_indentation():
  """Python 3.13 strips docstring indentation at compile time; simulated with cleandoc."""

  def alias():
    """Summary.

    Args:
      learning_rate: the rate.
      {shared_args}

    Returns:
      A transformation.
    """

  alias.__doc__ = inspect.cleandoc(alias.__doc__)
  doc = _alias._shares_args(alias).__doc__
  assert "{shared_args}" not in doc
  indent = re.search(r"^( *)learning_rate:", doc, re.MULTILINE).group(1)
  for argument in ("max_precond_dim", "block_size", "stats_dtype", "moment_dtype"):
    assert re.search(rf"^{indent}{argument}: ", doc, re.MULTILINE), argument


@pytest.mark.parametrize("name", list(ALIASES) + [f"scale_by_{n}" for n in SCALE_BY])
def test_every_argument_of_a_member_is_documented(name):
  fn = getattr(soap_optax, name)
  doc = fn.__doc__
  assert "{shared_args}" not in doc
  undocumented = [p for p in inspect.signature(fn).parameters if f"{p}: " not in doc]
  assert not undocumented


def test_the_version_has_one_source():
  from importlib import metadata

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    installed = metadata.version("soap_optax")
  assert installed == soap_optax.__version__
