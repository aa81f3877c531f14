"""Runs the tests of `tests/mesh` on 8 simulated CPU devices, in a process of their own.

JAX fixes the number of host devices when it starts, and the main test process has already
started it with one; the mesh tests therefore get a fresh interpreter with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import background
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


# The suite takes about 8 minutes on 2 cores; a deadlock (one was found, BUILD_NOTES) must fail
# the run rather than hang it.
TIMEOUT_S = 20 * 60


# A test running past 5 minutes gets every thread's stack printed (pytest's faulthandler).
MESH_SUITE = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--durations=5"]
MESH_SUITE += ["-o", "faulthandler_timeout=300", "mesh"]


def start_mesh_suite() -> background.Background:
  """Starts the mesh suite in the background (tests/conftest.py does, when collection ends)."""
  return background.Background(MESH_SUITE, cwd=HERE, env=background.mesh_environment())


def _run_mesh_suite(started: background.Background | None = None) -> subprocess.CompletedProcess:
  try:
    return (started or start_mesh_suite()).wait(TIMEOUT_S)
  except subprocess.TimeoutExpired as hung:
    output = str(hung.stdout or "") + str(hung.stderr or "")
    pytest.fail(f"the mesh suite ran past {TIMEOUT_S} s:\n{output[-20000:]}")


class MeshSuiteCrashed(UserWarning):
  """The mesh suite's process was killed by a signal and the suite was run again."""


def _run_with_one_rerun(run):
  """``run()``, and once more if a signal killed it; the rerun is reported as a warning.

  Once in several runs the simulated-device runtime aborted inside a plain ``jnp.asarray``
  (SIGABRT, no test failing before it; see BUILD_NOTES), so a crash is retried once; a failing
  test never is. The warning (shown in pytest's summary, even with ``-q``, and counted there by
  tests/conftest.py) names the signal and ends with the crashed run's output. Returns the last
  result.
  """
  result = run()
  if result.returncode < 0:
    try:
      name = signal.Signals(-result.returncode).name
    except ValueError:
      name = f"signal {-result.returncode}"
    tail = (result.stdout + result.stderr)[-3000:]
    warnings.warn(
      MeshSuiteCrashed(f"the mesh suite was killed by {name} and rerun once; its output:\n{tail}"),
      stacklevel=2,
    )
    result = run()
  return result


def test_the_mesh_suite_passes_on_8_simulated_devices():
  """The suite was started when collection ended (it runs beside the other tests); a rerun after
  a crash runs here."""
  started = [background.take("mesh")]
  result = _run_with_one_rerun(lambda: _run_mesh_suite(started.pop() if started else None))
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-20000:]
  assert " passed" in output and " failed" not in output, output[-5000:]


def _finished(returncode, output=""):
  return subprocess.CompletedProcess([], returncode, stdout=output, stderr="")


def test_a_suite_killed_by_a_signal_is_rerun_once_and_reported():
  results = iter([_finished(-signal.SIGABRT, "last words"), _finished(0)])
  with pytest.warns(MeshSuiteCrashed, match=r"(?s)SIGABRT.*last words"):
    assert _run_with_one_rerun(lambda: next(results)).returncode == 0
  assert next(results, None) is None  # both runs used


def test_a_suite_that_fails_is_not_rerun():
  results = iter([_finished(1), _finished(0)])
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no warning either
    assert _run_with_one_rerun(lambda: next(results)).returncode == 1


def test_a_second_crash_is_not_rerun():
  results = iter([_finished(-signal.SIGSEGV), _finished(-signal.SIGABRT), _finished(0)])
  with pytest.warns(MeshSuiteCrashed, match="SIGSEGV"):
    assert _run_with_one_rerun(lambda: next(results)).returncode == -signal.SIGABRT
