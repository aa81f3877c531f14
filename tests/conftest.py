"""Shared fixtures and helpers for the soap_optax test suite."""

from __future__ import annotations

import os
import sys

# Tests run on the CPU whatever the machine has, so that numbers are reproducible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's CPU QR/eigh run in scipy's OpenBLAS, whose threads fight XLA's pool on few cores (a
# refresh measured up to 100x slower); one thread is both faster and reproducible.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

# The mesh tests need 8 simulated devices, which must be set before JAX starts: tests/test_mesh.py
# runs them in a process of their own.
collect_ignore = [] if os.environ.get("SOAP_OPTAX_MESH_TESTS") else ["mesh"]
collect_ignore.append("multiprocess")  # the workers that tests/test_multiprocess.py starts
