"""The registry of soap_optax's optimizers (aliases), for tests parametrized over all of them.

Every alias follows the same conventions: ``learning_rate`` comes first, invalid arguments raise
``ValueError`` at construction, and the first call to ``update`` only initialises (zero update).
"""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import optax
import pytest

import soap_optax

ALIASES = {
  "soap": soap_optax.soap,
  "shampoo": soap_optax.shampoo,
  "eigen_adafactor": soap_optax.eigen_adafactor,
  "eshampoo": soap_optax.eshampoo,
}

# The numeric hyperparameters that optax.inject_hyperparams can turn into state.
NUMERIC = ("learning_rate", "b1", "b2", "eps", "weight_decay")

# Small, valid settings shared by all aliases: a refresh every third update, so that short runs
# cross several refreshes; an axis limit that leaves some axes of the test shapes unrotated; and
# numeric hyperparameters that differ from every alias's defaults, so that a test can see whether
# they are used.
SMALL = dict(
  learning_rate=1e-2,
  b1=0.9,
  b2=0.99,
  eps=1e-6,
  weight_decay=0.05,
  precondition_frequency=3,
  max_precond_dim=5,
)
# Its numeric hyperparameters.
SMALL_NUMERIC = {k: v for k, v in SMALL.items() if k in NUMERIC}

# Where each alias keeps moments shaped like the parameters: {state type: its fields}.
PARAMETER_SHAPED = {
  soap_optax.RotatedAdamState: ("mu", "nu"),
  soap_optax.RotatedAdafactorState: ("mu",),
  soap_optax.EigenvalueCorrectedState: ("mu", "nu"),
  soap_optax.ShampooPreconditionState: ("mu", "graft_nu"),
}


def parameters(name: str) -> tuple[str, ...]:
  """The names of the arguments of alias ``name``."""
  return tuple(inspect.signature(ALIASES[name]).parameters)


def make(name: str, **overrides) -> optax.GradientTransformation:
  """Alias ``name`` built with the small settings and ``overrides``."""
  return ALIASES[name](**{**SMALL, **overrides})


def make_default(name: str, **kwargs) -> optax.GradientTransformation:
  """Alias ``name`` with its own defaults, but for ``kwargs``."""
  return ALIASES[name](**kwargs)


def stepper(tx: optax.GradientTransformation, *, traced_once_as: str | None = None):
  """A jitted ``(params, state, grads) -> (params, state, updates)`` step of ``tx``.

  With ``traced_once_as`` the step is wrapped in ``chex.assert_max_traces(n=1)`` under that
  (unique) name: a second trace, i.e. a recompilation, raises an ``AssertionError``. (chex counts
  traces per function name and definition site, so the name must be unique in the session.)
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  if traced_once_as is not None:
    step.__name__ = step.__qualname__ = traced_once_as
    step = chex.assert_max_traces(step, n=1)
  return jax.jit(step)


@functools.cache
def reference(name: str):
  """``(tx, step)``: alias ``name`` with its small settings and its jitted step.

  Shared by all test modules so that each alias is compiled once; call the step only with
  float32 trees of the same shapes (tests that need other shapes build their own): the step
  raises if it is ever traced a second time.
  """
  tx = make(name)
  return tx, stepper(tx, traced_once_as=f"reference_step_of_{name}")


def inner_state(state):
  """The state of the optimizer inside ``apply_if_finite`` (the state itself otherwise)."""
  if isinstance(state, optax.ApplyIfFiniteState):
    return state.inner_state
  return state


def sub_states(state, cls) -> list:
  """Every sub-state of NamedTuple type ``cls`` in ``state`` (found by optax's tree helper)."""
  found = [value for _, value in optax.tree.get_all_with_path(state, cls.__name__)]
  assert all(isinstance(value, cls) for value in found), found
  return found


def parameter_shaped_moments(state) -> list[tuple[str, object]]:
  """``(label, tree)`` for every moment of ``state`` that is shaped like the parameters.

  Moments a configuration does not keep (``optax.EmptyState()``) are left out.
  """
  found = []
  for cls, fields in PARAMETER_SHAPED.items():
    for sub in sub_states(state, cls):
      for field in fields:
        value = getattr(sub, field)
        if not isinstance(value, optax.EmptyState):
          found.append((f"{cls.__name__}.{field}", value))
  return found


# One pytest parameter per alias, named after it.
ALIAS_PARAMS = [pytest.param(name, id=name) for name in ALIASES]
