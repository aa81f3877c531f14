"""Decoupled weight decay applied *after* the step, as the SOAP reference does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from soap_optax import _checks


class WeightDecayAfterStepState(NamedTuple):
  """State of :func:`add_decayed_weights_after_step`: the number of updates seen."""

  count: jax.Array  # type: ignore[assignment]  # optax's name for it; shadows tuple.count


def add_decayed_weights_after_step(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: float,
  mask: Any | Callable[[optax.Params], Any] | None = None,
  skip_first: bool = True,
) -> optax.GradientTransformation:
  """Decays the parameters after the step: ``p ← (1 − lr·wd)·(p + u)``.

  ``optax.add_decayed_weights`` decays the parameters from *before* the step
  (``p + u − lr·wd·p``); the SOAP reference (like PyTorch's AdamW with the decay applied last)
  decays the already-updated parameters, which differs by ``lr·wd·u``. This block, placed after
  the learning-rate scaling, returns ``u − lr·wd·(p + u)`` and so reproduces the reference
  exactly. With ``skip_first`` the first call returns ``u`` unchanged, because the reference's
  first call only initialises the preconditioner and neither steps nor decays.

  Args:
    learning_rate: the learning rate or schedule (``schedule(count)``, count starting at 0),
      the same one given to ``optax.scale_by_learning_rate`` before this block.
    weight_decay: the decay coefficient ``wd`` (>= 0).
    mask: a tree of bools (or a function of the parameters returning one) selecting the
      parameters to decay, as in ``optax.add_decayed_weights``.
    skip_first: leave the first update undecayed.

  Returns:
    An ``optax.GradientTransformation`` that needs ``params``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.add_decayed_weights_after_step(0.1, 0.5)
    >>> params, step = jnp.array([2.0]), jnp.array([-1.0])
    >>> state = tx.init(params)
    >>> _, state = tx.update(step, state, params)  # the initialising call is not decayed
    >>> updates, state = tx.update(step, state, params)
    >>> round(float((params + updates)[0]), 6)  # (1 − 0.1·0.5)·(2 − 1)
    0.95
  """

  _checks.check_learning_rate(learning_rate)
  _checks.check_nonnegative("weight_decay", weight_decay)

  def init_fn(params):
    del params
    return WeightDecayAfterStepState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("add_decayed_weights_after_step needs `params` in update().")
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    active = state.count > 0 if skip_first else jnp.ones([], bool)

    def decay(u, p):
      # Cast before multiplying, as optax.scale_by_schedule does: a float32 schedule value times
      # wd rounded in float32 would cost float64 parameters half their precision.
      factor = jnp.where(active, jnp.asarray(lr, u.dtype) * weight_decay, 0)
      return (u - factor * (p + u)).astype(u.dtype)

    new_updates = jax.tree.map(decay, updates, params)
    return new_updates, WeightDecayAfterStepState(optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  if mask is not None:
    return optax.masked(tx, mask)
  return tx
