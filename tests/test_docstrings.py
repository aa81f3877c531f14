"""Every ``Examples:`` section in the library's docstrings runs, and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import jax.numpy as jnp
import optax
import pytest

import soap_optax

MODULES = sorted(m.name for m in pkgutil.iter_modules(soap_optax.__path__))

# Every public function (the aliases, the blocks, the helpers) and the layout rule document
# themselves with an example.
DOCUMENTED = [
  name for name in soap_optax.__all__ if inspect.isfunction(getattr(soap_optax, name))
] + ["LayoutRule"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run_and_print_what_they_show(module):
  mod = importlib.import_module(f"soap_optax.{module}")
  # The blocks' examples say that they assume these imports, rather than repeat them.
  imports = {"jnp": jnp, "optax": optax, "soap_optax": soap_optax}
  result = doctest.testmod(
    mod, extraglobs=imports, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  assert result.failed == 0


@pytest.mark.parametrize("name", DOCUMENTED)
def test_every_public_function_has_an_example(name):
  docstring = getattr(soap_optax, name).__doc__
  assert "Examples:" in docstring and ">>>" in docstring
