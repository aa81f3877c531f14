"""Shared fixtures and helpers for the soap_optax test suite."""

from __future__ import annotations

import os
import sys

import pytest

# Tests run on the CPU whatever the machine has, so that numbers are reproducible.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's CPU QR/eigh run in scipy's OpenBLAS, whose threads fight XLA's pool on few cores (a
# refresh measured up to 100x slower); one thread is both faster and reproducible.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


import environment  # noqa: E402  (tests/environment.py: the compile cache and XLA's flags)

environment.prepare()

import jax  # noqa: E402  (after the environment it reads)

if not hasattr(jax, "enable_x64"):
  # jax < 0.8 (the oldest versions pyproject.toml allows) has it only as an experimental API.
  from jax.experimental import enable_x64

  jax.enable_x64 = enable_x64

# The mesh tests need 8 simulated devices, which must be set before JAX starts: tests/test_mesh.py
# runs them in a process of their own.
collect_ignore = [] if os.environ.get("SOAP_OPTAX_MESH_TESTS") else ["mesh"]
collect_ignore.append("multiprocess")  # the workers that tests/test_multiprocess.py starts


# Tests whose work runs in processes of its own, started when collection ends (tests/background.py)
# and checked last, so that the processes run beside everything else.
_BACKGROUND = {
  "test_mesh.py::test_the_mesh_suite_passes_on_8_simulated_devices": "mesh",
  "test_docs.py::test_docs_build_without_warnings_and_notebooks_execute": "docs",
}


# The contributors' fast subset is `python -m pytest -m "not slow"` (README, "Contributing"; about
# a minute and a half on 2 cores, BUILD_NOTES.md): these files start processes, build the docs,
# train the example, compare long float64 runs, or sweep every alias over many hard cases, layout
# rules, optax combinators, orthonormalisations and grouping (the whole suite runs them all).
_SLOW_FILES = {
  "test_hard_cases.py",
  "test_factor_rules.py",
  "test_optax_ecosystem.py",
  "test_orthonormalization.py",
  "test_grouping.py",
  "test_mesh.py",
  "test_multiprocess.py",
  "test_docs.py",
  "test_train_lm_smoke.py",
  "test_example_muon.py",
  "test_convergence.py",
  "test_integrations.py",
  "test_program_size.py",
  "test_soap_matches_reference.py",
  "test_properties.py",
}


# ... but SOAP against its reference, and grouped SOAP against ungrouped, stay in it, once.
_FAST_IN_SLOW_FILES = {
  "test_soap_matches_reference.py::test_soap_matches_reference_in_float64[defaults]",
  "test_grouping.py::test_grouped_updates_equal_the_ungrouped_ones_across_refreshes[soap-unblocked]",
}


def _mark_slow(items):
  for item in items:
    if item.path.name in _SLOW_FILES and item.nodeid.split("tests/")[-1] not in _FAST_IN_SLOW_FILES:
      item.add_marker(pytest.mark.slow)


def _background_name(item):
  if item.path.name == "test_multiprocess.py" and "topologies" in item.fixturenames:
    return "multiprocess"
  return _BACKGROUND.get(item.nodeid.split("tests/")[-1])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Marks the slow files' tests (before -m deselects) and puts the tests that wait for a
  background run last."""
  _mark_slow(items)
  items.sort(key=lambda item: _background_name(item) is not None)  # stable


def pytest_collection_finish(session):
  """Starts the background runs of the selected tests (after -k, -m and the rest deselected)."""
  if session.config.option.collectonly:
    return
  import background

  starts = {
    "mesh": lambda: __import__("test_mesh").start_mesh_suite(),
    "docs": lambda: __import__("test_docs").start_docs_build(),
    "multiprocess": lambda: background.Call(__import__("test_multiprocess").run_topologies),
  }
  for item in session.items:
    name = _background_name(item)
    if name and name not in background.STARTED:
      started = starts[name]()
      if started is not None:
        background.STARTED[name] = started


def pytest_sessionfinish():
  """A background run nobody waited for (a test interrupted or failed early) is stopped."""
  import background

  for run in background.STARTED.values():
    run.stop()
  background.STARTED.clear()


def pytest_terminal_summary(terminalreporter):
  """Counts the mesh suite's reruns after a crash (tests/test_mesh.py), so that none is silent."""
  reports = terminalreporter.stats.get("warnings", [])
  reruns = sum("MeshSuiteCrashed" in report.message for report in reports)
  if reruns:
    terminalreporter.write_line(
      f"mesh suite reruns after a crash by signal: {reruns} (see the warnings summary)", yellow=True
    )
