"""Specification: soap_optax trains in several processes on JAX's own distributed runtime.

Two processes of 4 CPU devices each (``jax.distributed.initialize`` on loopback, gloo for the
collectives) form one ``(fsdp=4, tp=2)`` mesh; every alias, with ``block_size`` on and off, runs
three updates across a refresh there, in one process with 8 devices on the same mesh, and on one
device. The 2-process run's orbax checkpoints restore into the same processes, onto another mesh
shape and onto one device; and a process killed mid-run, or mid-checkpoint, loses nothing.

The processes are in ``tests/multiprocess/worker.py`` (not collected); the comparisons are here.
Every group of processes runs in parallel under a timeout that turns a hang into a failure showing
every process's output.
"""

from __future__ import annotations

import atexit
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import background
import environment
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multiprocess", "worker.py")
sys.path.insert(0, os.path.join(HERE, "multiprocess"))

# A group of processes that has not finished by then hangs: the largest group needs about 2
# CPU-minutes, and took 5 to 6.5 minutes on 2 cores shared with a load average of 10 to 25.
GROUP_TIMEOUT_S = 900
# The distributed runtime's heartbeat and shutdown timeouts in the workers (100 s and 300 s by
# default): a survivor learns of a lost partner within about this.
RUNTIME_TIMEOUT_S = 5
# A survivor must exit on its own within this of its partner's death.
SURVIVOR_BOUND_S = 60


def free_port() -> int:
  """A loopback port that was free a moment ago (a collision is retried, see `run_group`)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Process:
  """A worker started in the background, its output in a file."""

  def __init__(self, name, role, devices, directory, *args):
    self.name = name
    self.out = os.path.join(directory, f"{name}.pkl")
    self.log = os.path.join(directory, f"{name}.log")
    env = dict(os.environ)
    env["XLA_FLAGS"] = environment.xla_flags(f"--xla_force_host_platform_device_count={devices}")
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, WORKER, role, "--out", self.out, *map(str, args)]
    with open(self.log, "w") as log:
      self.popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    self.ended_at = None

  def poll(self):
    code = self.popen.poll()
    if code is not None and self.ended_at is None:
      self.ended_at = time.monotonic()
    return code

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def result(self) -> dict:
    with open(self.out, "rb") as f:
      return pickle.load(f)


def report(processes, limit=6000) -> str:
  # Only the end of each log: XLA's partitioner warns at length about every sharded step.
  return "\n".join(f"--- {p.name} (exit {p.poll()}):\n{p.output()[-limit:]}" for p in processes)


def wait_all(processes, timeout_s=GROUP_TIMEOUT_S) -> None:
  """Waits for every process; past ``timeout_s`` kills them (each by its own id) and fails."""
  deadline = time.monotonic() + timeout_s
  # Every process is polled at every turn, so that each one's end is timed (`Process.ended_at`).
  while any([p.poll() is None for p in processes]):
    if time.monotonic() > deadline:
      for p in processes:
        if p.poll() is None:
          p.popen.kill()
          p.popen.wait()
      pytest.fail(f"processes still running after {timeout_s} s:\n{report(processes)}")
    time.sleep(0.1)


def port_collision(processes) -> bool:
  return any(
    re.search(r"address already in use|failed to bind", p.output(), re.I) for p in processes
  )


def run_group(start, attempts=3):
  """``start(port)`` starts a group of processes; waits for them. Starts again on a fresh port
  when the coordinator's port was taken between `free_port` and its bind."""
  for _ in range(attempts):
    processes = start(free_port())
    wait_all(processes)
    if not port_collision(processes):
      return processes
  pytest.fail(f"no free port in {attempts} attempts:\n{report(processes)}")


def pair(role, directory, port, *args, kill=None, prefix=None):
  """The two processes of one distributed run; ``kill = (process_id, when)`` injects a death."""
  processes = []
  for i in range(2):
    extra = ["--kill", kill[1]] if kill and kill[0] == i else []
    flags = ["--num_processes", 2, "--process_id", i, "--port", port]
    flags += ["--runtime_timeout_s", RUNTIME_TIMEOUT_S, *args, *extra]
    processes.append(Process(f"{prefix or role}{i}", role, 4, directory, *flags))
  return processes


def assert_succeeded(processes) -> None:
  for p in processes:
    assert p.poll() == 0 and os.path.exists(p.out), report(processes)


# -- assembling what the processes hold ----------------------------------------------------------


def assemble(*holdings) -> dict[str, np.ndarray]:
  """The global arrays from the shards the processes hold, ``{key: [(index, values)]}`` each.

  Every element must be held by some process, and where several hold it (a replicated leaf,
  or a leaf replicated over part of the mesh), bit for bit the same.
  """
  out = {}
  for key in holdings[0]:
    pieces = [piece for held in holdings for piece in held[key]]
    shape = tuple(
      max((index[d][0] or 0) + values.shape[d] for index, values in pieces)
      for d in range(pieces[0][1].ndim)
    )
    full = np.full(shape, np.nan, np.float64)
    for index, values in pieces:
      region = tuple(slice(start, stop) for start, stop in index)
      already = full[region]
      held = ~np.isnan(already)
      assert np.array_equal(already[held], values.astype(np.float64)[held]), (
        f"{key}: processes disagree at {index}"
      )
      full[region] = values
    assert not np.any(np.isnan(full)), f"{key}: not every element is held by a process"
    out[key] = full
  assert out
  return out


def relative_difference(actual, expected, start) -> dict[str, float]:
  """Per leaf, ‖actual − expected‖ / ‖expected − start‖: the error as a fraction of the change."""
  assert actual.keys() == expected.keys() == start.keys() and actual
  out = {}
  for key in actual:
    change = np.linalg.norm(expected[key] - start[key])
    assert np.isfinite(change) and change > 0, key
    out[key] = float(np.linalg.norm(actual[key] - expected[key]) / change)
  return out


def run_topologies(directory: str | None = None) -> dict:
  """The 2-process pair, one process with 8 devices and one with 1, run in parallel, in
  ``directory`` (a temporary one, removed at exit, if None); their results by process name."""
  if directory is None:
    directory = tempfile.mkdtemp(prefix="soap_optax_multiprocess_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
  checkpoints = os.path.join(directory, "checkpoints")

  def start(port):
    processes = pair("pair", directory, port, "--checkpoints", checkpoints)
    done = ["--checkpoints", checkpoints, "--pair_done", processes[0].out]
    done += ["--wait_s", GROUP_TIMEOUT_S]
    processes.append(Process("mesh8", "mesh8", 8, directory, *done))
    processes.append(Process("single", "single", 1, directory, *done))
    return processes

  processes = run_group(start)
  assert_succeeded(processes)
  results = {p.name: p.result() for p in processes}
  assert results["pair0"]["process_count"] == 2
  return results


@pytest.fixture(scope="module")
def topologies(tmp_path_factory):
  """The topologies' results: from the run tests/conftest.py started when collection ended
  (tests/background.py), or run now."""
  started = background.take("multiprocess")
  if started is not None:
    return started.wait(3 * GROUP_TIMEOUT_S)
  return run_topologies(str(tmp_path_factory.mktemp("topologies")))


def start_values():
  import worker

  return {f"['{k}']": v.astype(np.float64) for k, v in worker.values(1)[0].items()}


def case_ids():
  import worker

  return [worker.case_id(name, block) for name, block in worker.CASES]


# The well-conditioned case of the mesh tests (`tests/mesh/test_sharded_state.py`): a
# distributed or sharded contraction adds in another order than one device, and the runs must
# still agree within float32's noise.
TOLERANCE = 1e-5


def test_the_two_processes_agree_wherever_they_hold_the_same_elements(topologies):
  for case in case_ids():
    assemble(*(topologies[f"pair{i}"]["cases"][case]["params"] for i in range(2)))


@pytest.mark.parametrize("case", case_ids())
def test_two_processes_equal_one_process_on_the_same_mesh_and_one_device(topologies, case):
  two = assemble(*(topologies[f"pair{i}"]["cases"][case]["params"] for i in range(2)))
  one = assemble(topologies["mesh8"]["cases"][case]["params"])
  single = assemble(topologies["single"]["cases"][case]["params"])
  start = start_values()
  for other in (one, single):
    errors = relative_difference(two, other, start)
    assert max(errors.values()) < TOLERANCE, errors


def test_each_process_holds_about_half_of_the_state(topologies):
  for case in case_ids():
    for i in range(2):
      held = topologies[f"pair{i}"]["cases"][case]["bytes"]
      share = held["process"] / (held["total"] / 2)
      assert 1 <= share <= 1.25, (case, i, share)


def test_the_state_has_the_same_structure_shapes_and_dtypes_on_every_topology(topologies):
  for case in case_ids():
    expected = topologies["pair0"]["cases"][case]["structure"]
    assert expected
    assert topologies["pair1"]["cases"][case]["structure"] == expected
    assert topologies["mesh8"]["cases"][case]["structure"] == expected
    assert topologies["mesh8"]["restored"][case]["structure"] == expected
    assert topologies["single"]["cases"][case]["structure"] == expected


def test_abstract_state_has_the_shapes_and_shardings_of_the_state(topologies):
  """Of an eager init on both of JAX's sharding modes, and of the 2 processes' trained state."""
  checks = topologies["mesh8"]["abstract_state"] + topologies["pair0"]["abstract_state"]
  checks += topologies["pair1"]["abstract_state"]
  kinds = {label.split("-")[0] for label, _, _ in checks}
  assert kinds == {"AxisType.Explicit", "AxisType.Auto", "2"}, kinds
  wrong = [label for label, same_type, same_sharding in checks if not (same_type and same_sharding)]
  assert not wrong, wrong


# -- elastic restarts: the pair's checkpoint halfway, restored and finished ------------------------


def test_restored_into_the_same_processes_the_run_continues_bit_identically(topologies):
  for case in case_ids():
    uninterrupted = [topologies[f"pair{i}"]["cases"][case]["params"] for i in range(2)]
    resumed = [topologies[f"pair{i}"]["cases"][case]["resumed"] for i in range(2)]
    for a, b in zip(uninterrupted, resumed, strict=True):
      assert a.keys() == b.keys() and a
      for key in a:
        for (ia, va), (ib, vb) in zip(a[key], b[key], strict=True):
          assert ia == ib and np.array_equal(va, vb), (case, key, ia)


@pytest.mark.parametrize("restored_on", ["mesh8", "single"], ids=["fsdp2-tp4", "one-device"])
@pytest.mark.parametrize("case", case_ids())
def test_restored_on_another_topology_the_run_continues_as_uninterrupted(
  topologies, case, restored_on
):
  uninterrupted = assemble(*(topologies[f"pair{i}"]["cases"][case]["params"] for i in range(2)))
  resumed = assemble(topologies[restored_on]["restored"][case]["params"])
  errors = relative_difference(resumed, uninterrupted, start_values())
  assert max(errors.values()) < TOLERANCE, errors


# -- a killed process loses nothing ---------------------------------------------------------------

# (victim, injection, the checkpoint the restart must find, what the survivor must say)
KILLS = {
  # The partner of the coordinator dies between checkpoints 4 and 6; the coordinator's runtime
  # sees its heartbeats stop.
  "after-update-5": (1, "after:5", 4, r"stopped sending heartbeats\):\s*1\b"),
  # The coordinator, which finalises checkpoints, dies when every process has written checkpoint
  # 4 and before it is renamed into place; its partner loses the coordination service.
  "while-finalising-4": (0, "commit:4", 2, r"leader task was preempted/died"),
}


def kill_and_restart(name, directory):
  """A run killed by ``KILLS[name]``, then both processes restarted from its latest checkpoint
  (they also run the uninterrupted reference): (the killed pair, the checkpoint directory's
  entries after it, the restarted processes' results)."""
  victim, injection, _, _ = KILLS[name]
  checkpoints = os.path.join(directory, "checkpoints")
  train = run_group(
    lambda port: pair(
      "train", directory, port, "--checkpoints", checkpoints, kill=(victim, injection)
    )
  )
  leftovers = sorted(os.listdir(checkpoints))
  resume = run_group(lambda port: pair("resume", directory, port, "--checkpoints", checkpoints))
  assert_succeeded(resume)
  return train, leftovers, [p.result() for p in resume]


@pytest.fixture(scope="module")
def killed_between_checkpoints(tmp_path_factory):
  return kill_and_restart("after-update-5", str(tmp_path_factory.mktemp("between")))


@pytest.fixture(scope="module")
def killed_while_finalising(tmp_path_factory):
  return kill_and_restart("while-finalising-4", str(tmp_path_factory.mktemp("finalising")))


FIXTURES = {
  "after-update-5": "killed_between_checkpoints",
  "while-finalising-4": "killed_while_finalising",
}


@pytest.mark.parametrize("name", list(KILLS))
def test_the_survivor_of_a_killed_process_exits_on_its_own_naming_the_lost_process(request, name):
  train, _, _ = request.getfixturevalue(FIXTURES[name])
  victim, _, _, message = KILLS[name]
  dead, survivor = train[victim], train[1 - victim]
  assert "KILLED" in dead.output() and dead.poll() == -9, report(train)
  assert survivor.poll() not in (0, None), report(train)
  assert re.search(message, survivor.output()), report(train)
  waited = survivor.ended_at - dead.ended_at
  print(f"{name}: the survivor exited {waited:.1f} s after process {victim} died")
  assert waited < SURVIVOR_BOUND_S, waited


@pytest.mark.parametrize("name", list(KILLS))
def test_restarted_from_the_latest_checkpoint_the_run_ends_as_if_uninterrupted(request, name):
  _, _, resumed = request.getfixturevalue(FIXTURES[name])
  for result in resumed:
    assert result["step"] == KILLS[name][2]
    assert result["resumed"].keys() == result["uninterrupted"].keys() and result["resumed"]
    for key, pieces in result["resumed"].items():
      for (ia, va), (ib, vb) in zip(pieces, result["uninterrupted"][key], strict=True):
        assert ia == ib and np.array_equal(va, vb), (name, key, ia)


def test_a_checkpoint_interrupted_before_finalising_is_left_aside_not_restored(
  killed_while_finalising,
):
  _, leftovers, resumed = killed_while_finalising
  # Every process wrote its part of checkpoint 4 (the injection runs after orbax's write
  # barrier), into a temporary directory that was never renamed; the restart took checkpoint 2.
  assert "2" in leftovers and "4" not in leftovers, leftovers
  assert any(entry.startswith("4.") and "tmp" in entry for entry in leftovers), leftovers
  assert all(result["step"] == 2 for result in resumed)
