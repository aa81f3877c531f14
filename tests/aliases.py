"""The registry of soap_optax's optimizers (aliases), for tests parametrized over all of them.

Every alias follows the same conventions: ``learning_rate`` comes first, invalid arguments raise
``ValueError`` at construction, and the first call to ``update`` only initialises (zero update).
Aliases that the library does not export (yet) are left out, so that parametrized tests cover
each new one as soon as it lands.
"""

from __future__ import annotations

import functools
import inspect

import jax
import optax
import pytest

import soap_optax

# Every alias the library exports or will export, in the order the tests list them.
_KNOWN = ("soap", "shampoo", "eigen_adafactor", "eshampoo")

ALIASES = {name: getattr(soap_optax, name) for name in _KNOWN if hasattr(soap_optax, name)}

# The numeric hyperparameters that optax.inject_hyperparams can turn into state.
NUMERIC = ("learning_rate", "b1", "b2", "eps", "weight_decay")

# Small, valid settings shared by all aliases: a refresh every third update, so that short runs
# cross several refreshes; an axis limit that leaves some axes of the test shapes unrotated; and
# numeric hyperparameters that differ from every alias's defaults, so that a test can see whether
# they are used. Arguments an alias does not take are dropped (see `kwargs_for`).
_COMMON_SMALL = dict(
  learning_rate=1e-2,
  b1=0.9,
  b2=0.99,
  eps=1e-6,
  weight_decay=0.05,
  precondition_frequency=3,
  max_precond_dim=5,
)

# Per-alias additions to or replacements of `_COMMON_SMALL`.
_SMALL = {
  "soap": dict(),
  "shampoo": dict(),
  "eigen_adafactor": dict(),
  "eshampoo": dict(),
}


def parameters(name: str) -> tuple[str, ...]:
  """The names of the arguments of alias ``name``."""
  return tuple(inspect.signature(ALIASES[name]).parameters)


def accepts(name: str, argument: str) -> bool:
  return argument in parameters(name)


def require(name: str, *arguments: str) -> None:
  """Skips the calling test when alias ``name`` lacks one of ``arguments``."""
  missing = [a for a in arguments if not accepts(name, a)]
  if missing:
    pytest.skip(f"{name} has no argument {', '.join(missing)}")


def kwargs_for(name: str, **overrides) -> dict:
  """The small settings of alias ``name`` with ``overrides``, restricted to its arguments."""
  kwargs = {**_COMMON_SMALL, **_SMALL.get(name, {}), **overrides}
  return {k: v for k, v in kwargs.items() if accepts(name, k)}


def numeric_hyperparams(name: str) -> dict:
  """The numeric hyperparameters of alias ``name``, with their small (non-default) values."""
  return {k: v for k, v in kwargs_for(name).items() if k in NUMERIC}


def make(name: str, **overrides) -> optax.GradientTransformation:
  """Alias ``name`` built with its small settings and ``overrides``."""
  return ALIASES[name](**kwargs_for(name, **overrides))


def make_default(name: str, **kwargs) -> optax.GradientTransformation:
  """Alias ``name`` with its own defaults, but for those of ``kwargs`` that it takes."""
  return ALIASES[name](**{k: v for k, v in kwargs.items() if accepts(name, k)})


def stepper(tx: optax.GradientTransformation):
  """A jitted ``(params, state, grads) -> (params, state, updates)`` step of ``tx``."""

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


@functools.cache
def reference(name: str):
  """``(tx, step)``: alias ``name`` with its small settings and its jitted step.

  Shared by all test modules so that each alias is compiled once; call the step only with
  float32 trees of the same shapes (tests that need other shapes build their own).
  """
  tx = make(name)
  return tx, stepper(tx)


def inner_state(state):
  """The state of the optimizer inside ``apply_if_finite`` (the state itself otherwise)."""
  if isinstance(state, optax.ApplyIfFiniteState):
    return state.inner_state
  return state


def find_states(state, cls) -> list:
  """Every sub-state of type ``cls`` (e.g. ``soap_optax.EigenbasisState``) in ``state``."""
  found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, cls))
  return [s for s in found if isinstance(s, cls)]


# One pytest parameter per alias, named after it.
ALIAS_PARAMS = [pytest.param(name, id=name) for name in ALIASES]
