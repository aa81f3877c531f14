"""The size of the compiled update: what keeps compile time in check as models grow.

A scanned model's stacked layers (``stacked_axes``) must compile to the same program whatever
their number, and a model of separate parameters to a program that grows in proportion to their
number, not faster (XLA copying a computation over all parameters into each parameter's fusion
once made it grow with the square).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from aliases import ALIASES

import soap_optax


def _lowered_operations(name, layers):
  """Operations in the lowered update of alias ``name`` on a stack of ``layers`` layers."""
  params = {"kernel": jnp.zeros((layers, 4, 6)), "bias": jnp.zeros((layers, 6))}
  tx = getattr(soap_optax, name)(stacked_axes=1, block_size=4)
  text = jax.jit(tx.update).lower(params, tx.init(params), params).as_text()
  return sum("stablehlo." in line for line in text.splitlines())


@pytest.mark.parametrize("name", ALIASES)
def test_the_update_program_does_not_grow_with_the_number_of_stacked_layers(name):
  two, five = _lowered_operations(name, 2), _lowered_operations(name, 5)
  assert two > 100  # the count reads the program (a few hundred operations)
  assert two == five


def _compiled_lines(count):
  """Lines of SOAP's compiled update on ``count`` separate 4 × 4 parameters."""
  params = {f"w{i}": jnp.zeros((4, 4)) for i in range(count)}
  tx = soap_optax.soap()
  return len(
    jax.jit(tx.update).lower(params, tx.init(params), params).compile().as_text().split("\n")
  )


def test_the_compiled_update_grows_in_proportion_to_the_number_of_parameters():
  # Measured 8743 -> 16171 lines (1.85x) from 16 to 32 parameters; 11077 -> 25945 (2.34x) when
  # the all-finite flag's chain of ANDs was copied into every parameter's fusion.
  sixteen, thirty_two = _compiled_lines(16), _compiled_lines(32)
  assert sixteen > 1000
  assert thirty_two / sixteen < 2.1
