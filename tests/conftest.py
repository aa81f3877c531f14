"""Shared fixtures and helpers for the soap_optax test suite."""

from __future__ import annotations

import os
import sys

# Tests run on the CPU whatever the machine has, so that numbers are reproducible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))
