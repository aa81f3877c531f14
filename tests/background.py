"""Work in processes of its own, started early so that it overlaps the in-process tests.

The mesh suite (8 simulated devices, tests/test_mesh.py) needs a fresh interpreter and takes
minutes; the docs build (tests/test_docs.py) is a Sphinx process that executes the notebooks; the
multi-process topologies (tests/test_multiprocess.py) are four worker processes. Started when
collection ends (tests/conftest.py), they run beside the in-process tests, which use one of the
2 cores, and the tests that check them run last and only collect their results: the suite's wall
time becomes about the larger of the parts rather than their sum.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time

import environment


class Background:
  """A command started now, whose result :meth:`wait` collects (as ``subprocess.run`` would)."""

  def __init__(self, command, *, cwd, env):
    self.command = command
    self._out = tempfile.TemporaryFile(mode="w+")
    self._err = tempfile.TemporaryFile(mode="w+")
    self._started = time.monotonic()
    self._process = subprocess.Popen(
      command, cwd=cwd, env=env, stdout=self._out, stderr=self._err, text=True
    )

  def wait(self, timeout: float) -> subprocess.CompletedProcess:
    """The finished process; raises ``subprocess.TimeoutExpired`` (after killing it) when it runs
    past ``timeout`` seconds from its start, with the output so far."""
    remaining = max(timeout - (time.monotonic() - self._started), 0)
    try:
      returncode = self._process.wait(remaining)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()
      stdout, stderr = self._read()
      raise subprocess.TimeoutExpired(self.command, timeout, stdout, stderr) from None
    stdout, stderr = self._read()
    return subprocess.CompletedProcess(self.command, returncode, stdout, stderr)

  def stop(self) -> None:
    """Kills the process if it still runs, and releases its output files."""
    if self._process.poll() is None:
      self._process.kill()
    self._process.wait()
    self._read()

  def _read(self) -> tuple[str, str]:
    texts = []
    for f in (self._out, self._err):
      if f.closed:
        texts.append("")
        continue
      f.seek(0)
      texts.append(f.read())
      f.close()
    return texts[0], texts[1]


class Call:
  """``fn()`` started now in a thread (work that waits on processes of its own); :meth:`wait`
  returns its result or raises what it raised."""

  def __init__(self, fn):
    self._result: list = []
    self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
    self._thread.start()

  def _run(self, fn):
    try:
      self._result.append((True, fn()))
    except BaseException as error:  # re-raised in the test that waits (pytest.fail included)
      self._result.append((False, error))

  def wait(self, timeout: float):
    self._thread.join(timeout)
    if not self._result:
      raise TimeoutError(f"background work still running after {timeout} s")
    ok, value = self._result[0]
    if not ok:
      raise value
    return value

  def stop(self) -> None:
    """Nothing to stop: the work bounds its processes' time itself."""


# name -> its run, started by tests/conftest.py for the selected tests that need one.
STARTED: dict[str, Background | Call] = {}


def take(name: str) -> Background | Call | None:
  """The background run of ``name`` if one was started (each is used once), else None."""
  return STARTED.pop(name, None)


def mesh_environment() -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = environment.xla_flags("--xla_force_host_platform_device_count=8")
  env["SOAP_OPTAX_MESH_TESTS"] = "1"
  return env
