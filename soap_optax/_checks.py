"""Argument validation shared by every public factory: fail at construction, naming the argument.

Values that cannot be checked when the transformation is built (schedules, and the tracers that
``optax.inject_hyperparams`` passes) are accepted as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value):
  """The value as a Python float, or None when it cannot be checked (schedule or tracer)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(value))
  except (TypeError, ValueError):
    return None


def check_nonnegative(name: str, value) -> None:
  v = _concrete(value)
  if v is not None and not v >= 0:  # also rejects NaN
    raise ValueError(f"{name} must be >= 0, got {value}.")


def check_positive(name: str, value) -> None:
  v = _concrete(value)
  if v is not None and not v > 0:
    raise ValueError(f"{name} must be > 0, got {value}.")


def check_unit_interval(name: str, value, *, closed: bool = False) -> None:
  """``value`` in [0, 1) (or [0, 1] with ``closed``)."""
  v = _concrete(value)
  if v is None:
    return
  ok = 0 <= v <= 1 if closed else 0 <= v < 1
  if not ok:
    interval = "[0, 1]" if closed else "[0, 1)"
    raise ValueError(f"{name} must be in {interval}, got {value}.")


def check_positive_int(name: str, value) -> None:
  v = _concrete(value)
  if v is not None and not (v >= 1 and float(v).is_integer()):
    raise ValueError(f"{name} must be an integer >= 1, got {value}.")


def check_learning_rate(value) -> None:
  if not callable(value):
    check_nonnegative("learning_rate", value)


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_float_dtype(name: str, value) -> None:
  """``value`` is None or names a floating dtype (storage dtypes of the state)."""
  if value is None:
    return
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise ValueError(f"{name} must be a floating dtype such as jnp.bfloat16, got {value!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating dtype such as jnp.bfloat16, got {dtype}.")
