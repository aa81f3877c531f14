"""Reads a compiled (per-device) XLA program: decompositions, their work, and collectives.

After SPMD partitioning, the text of ``jax.jit(f).lower(...).compile().as_text()`` is the program
one device runs, so the operand shapes of its LAPACK custom calls are that device's share of the
work, and its collectives are the communication the sharding adds. Instructions keep the name
scope of the JAX code that produced them in their metadata, which is how the refresh
(``eigenbasis_refresh``) and the moment transfer (``moment_transfer``) are told apart from the
per-step arithmetic.

A decomposition inside a loop runs once per iteration: ``lax.map`` over a stack becomes a
``while`` with a known trip count, by which its work is multiplied (through nested loops and
branches). A loop whose trip count XLA does not know (the adaptive refresh's "until fresh or
``max_qr_iterations``") counts once: its work is then that of one iteration.

Used by ``bench_sharding.py`` and by the mesh tests (``tests/mesh``).
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = (
  "all-gather",
  "all-reduce",
  "all-to-all",
  "reduce-scatter",
  "collective-permute",
  "collective-broadcast",
)
# LAPACK kernels of the CPU backend (cuSOLVER/TPU names differ; CPU is what 8 simulated devices
# run): Householder QR, and the symmetric eigensolver.
QR_TARGETS = ("geqrf",)
EIGH_TARGETS = ("syevd", "heevd")

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_CALLEE = re.compile(
  r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_SHAPE = re.compile(r"^(?:\(\s*)?(?:f32|f64|bf16|f16)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


@dataclasses.dataclass
class Program:
  """What one device's compiled program contains."""

  # (kind, operand shape, op name, times it runs per execution of the program)
  decompositions: list[tuple[str, tuple[int, ...], str, int]]
  collectives: list[tuple[str, str]]  # (opcode, op name)

  def work(self, kind: str, scope: str | None = None, outside: tuple[str, ...] = ()) -> int:
    """Σ batch × n³ over the decompositions of ``kind`` ("qr" or "eigh") whose op name contains
    every "/"-separated part of ``scope`` and none of ``outside``."""
    total = 0
    for k, shape, name, runs in self.decompositions:
      if k == kind and _within(name, scope) and not any(o in name for o in outside):
        total += runs * math.prod(shape[:-2]) * shape[-1] ** 3
    return total

  def count_collectives(self, scope: str | None = None, outside: tuple[str, ...] = ()) -> int:
    """Collectives whose op name contains ``scope`` and none of ``outside``."""
    return sum(
      1
      for _, name in self.collectives
      if (scope is None or scope in name) and not any(o in name for o in outside)
    )


def _within(name: str, scope: str | None) -> bool:
  return scope is None or all(part in name for part in scope.split("/"))


def read(hlo_text: str) -> Program:
  """Parses the text of a compiled XLA module."""
  decompositions, collectives = [], []
  runs = _runs_per_computation(hlo_text)
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1].strip()
    name = (_OP_NAME.search(line) or [None, ""])[1]
    target = _TARGET.search(line)
    if target and "custom-call" in line:
      kind = _kind(target.group(1))
      shape = _result_shape(rhs)
      if kind and shape:
        decompositions.append((kind, shape, name, runs.get(computation, 1)))
      continue
    for opcode in COLLECTIVES:
      # the opcode follows the result type: "f32[8,16]{1,0} all-gather(...)"
      if re.search(rf"\}}?\s{re.escape(opcode)}(-start)?\(", rhs) or rhs.startswith(opcode):
        collectives.append((opcode, name))
        break
  return Program(decompositions, collectives)


def _runs_per_computation(hlo_text: str) -> dict[str, int]:
  """How many times each computation runs per run of the entry: loop bodies times their known
  trip counts (1 when unknown), summed over call sites, through every level of nesting."""
  calls: dict[str, list[tuple[str, int]]] = {}
  entry, computation = None, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      entry = computation if line.startswith("ENTRY") else entry
      continue
    if computation is None:
      continue
    trips = _TRIP_COUNT.search(line)
    factor = int(trips.group(1)) if trips and " while(" in line else 1
    callees = _CALLEE.findall(line)
    for branches in _BRANCHES.findall(line):
      callees += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
    calls.setdefault(computation, []).extend((c, factor) for c in callees)
  runs: dict[str, int] = {}

  def visit(name: str, times: int) -> None:
    runs[name] = runs.get(name, 0) + times
    for callee, factor in calls.get(name, ()):
      visit(callee, times * factor)

  if entry is not None:
    visit(entry, 1)
  return runs


def _kind(target: str) -> str | None:
  if any(t in target for t in QR_TARGETS):
    return "qr"
  if any(t in target for t in EIGH_TARGETS):
    return "eigh"
  return None


def _result_shape(rhs: str) -> tuple[int, ...] | None:
  """The shape of a custom call's (first) result: the matrices it decomposes, batch first."""
  match = _SHAPE.search(rhs)
  if not match or not match.group(1):
    return None
  return tuple(int(d) for d in match.group(1).split(","))
