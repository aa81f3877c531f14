"""Reads a compiled (per-device) XLA program: decompositions, their work, and collectives.

After SPMD partitioning, the text of ``jax.jit(f).lower(...).compile().as_text()`` is the program
one device runs, so the operand shapes of its LAPACK custom calls are that device's share of the
work, and its collectives are the communication the sharding adds. Instructions keep the name
scope of the JAX code that produced them in their metadata, which is how the refresh
(``eigenbasis_refresh``) and the moment transfer (``moment_transfer``) are told apart from the
per-step arithmetic.

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

_SHAPE = re.compile(r"^(?:\(\s*)?(?:f32|f64|bf16|f16)\[([0-9,]*)\]")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


@dataclasses.dataclass
class Program:
  """What one device's compiled program contains."""

  decompositions: list[tuple[str, tuple[int, ...], str]]  # (kind, operand shape, op name)
  collectives: list[tuple[str, str]]  # (opcode, op name)

  def work(self, kind: str, scope: str | None = None, outside: tuple[str, ...] = ()) -> int:
    """Σ batch × n³ over the decompositions of ``kind`` ("qr" or "eigh") whose op name contains
    every "/"-separated part of ``scope`` and none of ``outside``."""
    total = 0
    for k, shape, name in self.decompositions:
      if k == kind and _within(name, scope) and not any(o in name for o in outside):
        total += math.prod(shape[:-2]) * shape[-1] ** 3
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
  for line in hlo_text.splitlines():
    if "=" not in line:
      continue
    rhs = line.split("=", 1)[1].strip()
    name = (_OP_NAME.search(line) or [None, ""])[1]
    target = _TARGET.search(line)
    if target and "custom-call" in line:
      kind = _kind(target.group(1))
      shape = _result_shape(rhs)
      if kind and shape:
        decompositions.append((kind, shape, name))
      continue
    for opcode in COLLECTIVES:
      # the opcode follows the result type: "f32[8,16]{1,0} all-gather(...)"
      if re.search(rf"\}}?\s{re.escape(opcode)}(-start)?\(", rhs) or rhs.startswith(opcode):
        collectives.append((opcode, name))
        break
  return Program(decompositions, collectives)


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
