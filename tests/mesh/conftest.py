"""The mesh tests run on 8 simulated CPU devices, in their own process (see tests/test_mesh.py).

The device count must be set before JAX starts, so these tests cannot share the main test
process; `tests/test_mesh.py` runs them with `XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.dirname(HERE))  # tests/ (aliases, runner)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks"))  # _hlo

import jax  # noqa: E402

if jax.device_count() != 8:
  raise RuntimeError(
    f"the mesh tests need 8 devices, found {jax.device_count()}: run them through "
    "tests/test_mesh.py, or set XLA_FLAGS=--xla_force_host_platform_device_count=8 before JAX "
    "starts."
  )
