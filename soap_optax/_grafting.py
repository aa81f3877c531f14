"""Layer-wise learning-rate grafting: Shampoo's direction with another optimizer's step size.

Grafting (Agarwal et al.; Distributed Shampoo) keeps the direction of one optimizer and takes,
per block, the norm of another one's step on the same gradient. The grafted optimizer is
diagonal: its second moment is an EMA of the *raw* gradient's square, while the vector it scales
is the filtered gradient (the EMA of the gradient, when Shampoo filters), as in Distributed
Shampoo. That split data path is why this is not simply an optax transformation run beside the
preconditioner; the moment arithmetic itself is optax's.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from soap_optax._linalg import debias, divide

Grafting = Literal["none", "sgd", "rmsprop", "adam"]
GRAFTING = ("none", "sgd", "rmsprop", "adam")


def check_grafting(grafting: str) -> None:
  if grafting not in GRAFTING:
    raise ValueError(f"grafting must be one of {GRAFTING}, got {grafting!r}.")


def needs_second_moment(grafting: Grafting) -> bool:
  return grafting in ("rmsprop", "adam")


def update_second_moment(nu: jax.Array, grad: jax.Array, b2: ArrayLike) -> jax.Array:
  """``ν ← b2 ν + (1 − b2) G²`` with the raw gradient."""
  return optax.tree.update_moment_per_elem_norm(grad, nu, b2, 2)


def grafted_step(
  grafting: Grafting, vector: jax.Array, nu: jax.Array | None, count, b2, eps
) -> jax.Array | None:
  """The grafted optimizer's step on ``vector``: the vector itself (``"sgd"``), RMSprop's
  ``v / (√ν + eps)``, or Adam's with ``ν`` bias-corrected by the update count; None for
  ``"none"``."""
  if grafting == "none":
    return None
  if grafting == "sgd":
    return vector
  assert nu is not None, "rmsprop and adam grafting keep a second moment"
  if grafting == "adam":
    nu = nu / debias(b2, count, nu.dtype)
  return divide(vector, jnp.sqrt(nu) + eps)


def _block_norm(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)), keepdims=True))


def graft(direction: jax.Array, grafted: jax.Array) -> jax.Array:
  """``direction`` rescaled, block by block, to the Frobenius norm of ``grafted``.

  Both are in the working layout ``(num_blocks, …)``; a block whose direction is zero stays zero.
  """
  norm = _block_norm(direction)
  ratio = _block_norm(grafted) / jnp.where(norm > 0, norm, 1)
  return jnp.where(norm > 0, direction * ratio, 0)
