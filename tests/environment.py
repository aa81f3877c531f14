"""The environment every process of the test suite runs in: one compile cache, XLA's flags.

Set before jax starts (tests/conftest.py calls :func:`prepare` first thing), and handed to every
process the suite starts (the mesh suite, the multi-process workers, the example's runs, the docs
build), which inherit the environment or build theirs with :func:`xla_flags`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Tests check numbers, not speed, and XLA's compile is most of their time: their programs are
# compiled without LLVM's optimisation passes and with XLA's older CPU kernel emitter instead of
# its MLIR fusion emitters (the per-kernel MLIR pipeline was a third of a SOAP compile's CPU time;
# one float64 SOAP update compiles in 0.35 s instead of 1.1-1.4 s). The HLO and its fusions are
# XLA's usual ones; only how each fused kernel is turned into machine code differs (BUILD_NOTES.md:
# the suite's CPU time 854 s -> ~510 s, every test passing either way; the kernel-counting tests
# ask for the fusion emitters explicitly). SOAP_OPTAX_TEST_XLA_OPTIMIZE=1 keeps XLA's default.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The older emitter is on its way out of XLA, and XLA aborts on a flag it does not know: this one
# is passed only where this jaxlib takes it.
_OLDER_EMITTER = "--xla_cpu_use_fusion_emitters=false"


def _xla_takes(flag: str) -> bool:
  """Whether this jaxlib's XLA accepts ``flag``; asked once per run (a process that starts jax
  with it), the answer handed to the processes the suite starts through the environment."""
  name = "SOAP_OPTAX_TEST_XLA_TAKES_" + flag.strip("-").split("=")[0].upper()
  if name not in os.environ:
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=False)
    os.environ[name] = "1" if done.returncode == 0 else "0"
  return os.environ[name] == "1"


def _test_xla_flags() -> str:
  if os.environ.get("SOAP_OPTAX_TEST_XLA_OPTIMIZE") == "1":
    return ""
  return f"{_FAST_COMPILE} {_OLDER_EMITTER}" if _xla_takes(_OLDER_EMITTER) else _FAST_COMPILE


TEST_XLA_FLAGS = _test_xla_flags()


def xla_flags(*flags: str) -> str:
  """``XLA_FLAGS`` for a process the suite starts: ``flags`` plus the tests' own."""
  own = TEST_XLA_FLAGS.split()
  return " ".join([f for flag in flags for f in flag.split() if f not in own] + own)


def share_compiled_programs() -> None:
  """One compilation cache for the whole run: an identical program compiles once.

  Many tests build the same optimizer on the same shapes (each oracle comparison, each
  parametrisation), and jax's persistent cache, keyed by the program and its compile options,
  hands every later request the executable compiled first. The cache is a directory made for
  this run (cold at the start, removed when the process that made it exits) and named in the
  environment, so the processes the suite starts share it. ``SOAP_OPTAX_TEST_COMPILATION_CACHE=0``
  turns it off; a cache the environment already names is used as it is.
  """
  if os.environ.get("SOAP_OPTAX_TEST_COMPILATION_CACHE", "1") == "0":
    return
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    directory = tempfile.mkdtemp(prefix="soap_optax_tests_xla_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  # Every program, however small or quick to compile (jax's defaults skip those under 1 s).
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def prepare() -> None:
  """The suite's environment, in this process (idempotent; call before jax starts)."""
  share_compiled_programs()
  os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""))
