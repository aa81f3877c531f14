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


# -- operation counts by block ------------------------------------------------------------------

# What the arithmetic of a program is made of: matrix products, decompositions and other library
# calls, reductions, and the control flow around them.
ARITHMETIC = {
  "dot": ("dot", "dot_general", "convolution"),
  "custom_call": ("custom-call", "custom_call"),
  "reduce": ("reduce", "reduce-window", "reduce_window"),
  "control": ("while", "conditional", "case", "if", "call"),
}

_HLO_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(.*)$")
_HLO_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_MLIR_OP = re.compile(r'^\s*(?:%[\w#:, ]+\s*=\s*)?"?(stablehlo|chlo|func)\.([a-z_]+)"?')
_MLIR_LOC_USE = re.compile(r"loc\((#loc\d+)\)\s*$")
_MLIR_LOC_DEF = re.compile(r"^(#loc\d+)\s*=\s*loc\((.*)\)\s*$")


@dataclasses.dataclass
class OpCounts:
  """Operations of a program, by block (the first of ``scopes`` found in the op's name)."""

  total: int
  by_block: dict[str, int]
  arithmetic: dict[str, int]  # ARITHMETIC kind -> count, whole program
  arithmetic_by_block: dict[str, dict[str, int]]

  def arithmetic_total(self) -> int:
    return sum(self.arithmetic[k] for k in ("dot", "custom_call", "reduce"))


def _kind_of(opcode: str) -> str | None:
  for kind, names in ARITHMETIC.items():
    if opcode in names:
      return kind
  return None


def _block_of(name: str, scopes) -> str:
  parts = name.split("/")
  for label, scope in scopes:
    if all(s in parts for s in scope.split("/")):
      return label
  return "other"


def _tally(ops, scopes) -> OpCounts:
  by_block: dict[str, int] = {}
  arithmetic = dict.fromkeys(ARITHMETIC, 0)
  per_block: dict[str, dict[str, int]] = {}
  for opcode, name in ops:
    block = _block_of(name, scopes)
    by_block[block] = by_block.get(block, 0) + 1
    kind = _kind_of(opcode)
    if kind:
      arithmetic[kind] += 1
      counts = per_block.setdefault(block, dict.fromkeys(ARITHMETIC, 0))
      counts[kind] += 1
  return OpCounts(len(ops), by_block, arithmetic, per_block)


def count_compiled(hlo_text: str, scopes=()) -> OpCounts:
  """Instructions of a compiled XLA module (fused computations included, parameters, constants
  and tuple plumbing left out), each attributed to the first ``(label, scope)`` of ``scopes``
  whose "/"-separated names all occur in the instruction's op name. An instruction XLA created
  (no op name of its own) inside a fused or called computation takes its caller's."""
  skip = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast"}
  inherited: dict[str, str] = {}
  lines = []
  computation = None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      computation = header.group(1)
      continue
    match = _HLO_INSTRUCTION.match(line)
    if not match:
      continue
    name = (_OP_NAME.search(line) or [None, ""])[1]
    lines.append((computation, match.group(1), name))
    if name:
      for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
        inherited.setdefault(callee, name)
  ops = []
  for computation, rhs, name in lines:
    opcode = _HLO_OPCODE.search(" " + rhs)
    if opcode is None or opcode.group(1) in skip:
      continue
    ops.append((opcode.group(1), name or inherited.get(computation, "")))
  return _tally(ops, scopes)


def count_lowered(mlir_text: str, scopes=()) -> OpCounts:
  """StableHLO operations of ``lowered.as_text(debug_info=True)``, attributed like
  :func:`count_compiled` (constants and returns left out)."""
  locs: dict[str, str] = {}
  for line in mlir_text.splitlines():
    definition = _MLIR_LOC_DEF.match(line)
    if definition:
      locs[definition.group(1)] = definition.group(2)

  def resolve(ref: str, depth: int = 0) -> str:
    body = locs.get(ref, "")
    named = re.match(r'"([^"]*)"', body)
    if named:
      return named.group(1)
    inner = re.match(r"callsite\((#loc\d+)", body)
    if inner and depth < 50:
      return resolve(inner.group(1), depth + 1)
    return ""

  # A private function (jnp.where, argsort, ...) names its ops after itself only: they take the
  # name of its first call site.
  ops, open_regions, function, callers = [], [], "main", {}
  for line in mlir_text.splitlines():
    use = _MLIR_LOC_USE.search(line)
    header = re.match(r"\s*func\.func (?:public|private) @([\w.\-]+)", line)
    if header:
      function = header.group(1)
      continue
    call = re.search(r"call @([\w.\-]+)\(", line)
    if call and use:
      callers.setdefault(call.group(1), (function, resolve(use.group(1))))
    if line.lstrip().startswith("}") and use and open_regions:
      # An op with regions (case, while) states its location on its closing line.
      i = open_regions.pop()
      ops[i] = (ops[i][0], function, resolve(use.group(1)))
      continue
    match = _MLIR_OP.match(line)
    if not match or match.group(1) == "func" or match.group(2) in ("constant", "return"):
      continue
    if use is None:
      open_regions.append(len(ops))
    ops.append((match.group(2), function, resolve(use.group(1)) if use else ""))

  def full_name(function: str, name: str, depth: int = 0) -> str:
    if function not in callers or depth > 50:
      return name
    caller, call_name = callers[function]
    return full_name(caller, f"{call_name}/{name}", depth + 1)

  return _tally([(op, full_name(f, name)) for op, f, name in ops], scopes)


def count_kernels(lowered, scopes=()) -> tuple[dict[str, int], dict[str, int]]:
  """The kernels XLA's CPU backend generates for ``lowered`` (a ``jax.stages.Lowered``), by
  block: ``({block: kernels}, {block: lines of optimised LLVM IR})``.

  On CPU, compile time follows the code generated: every fusion not identical to another
  becomes its own LLVM module, compiled separately. Compiles ``lowered`` once more with XLA's
  dump switched on (into a temporary directory) and reads the kernels' names from it; each
  kernel is attributed like :func:`count_compiled`, by the op name of its HLO instruction.
  """
  import os
  import tempfile

  kernels: dict[str, int] = {}
  lines: dict[str, int] = {}
  with tempfile.TemporaryDirectory() as directory:
    # jax's persistent compilation cache leaves the dump flags out of its key, so a program it
    # holds would come back compiled with nothing dumped; `xla_dump_large_constants` (which only
    # changes what a dump prints) is in the key, and makes this a compile of its own.
    options = {"xla_dump_to": directory, "xla_dump_hlo_as_text": True}
    # The kernels of XLA's default CPU code generator (its fusion emitters), even where XLA_FLAGS
    # turns them off (the test suite does, to compile faster): the older emitter puts several
    # fusions into one module (54 kernels instead of 165 for the same SOAP update).
    if "xla_cpu_use_fusion_emitters" in os.environ.get("XLA_FLAGS", ""):
      options["xla_cpu_use_fusion_emitters"] = True
    lowered.compile({**options, "xla_dump_large_constants": True})
    files = os.listdir(directory)
    programs = [f for f in files if f.endswith(".cpu_after_optimizations.txt")]
    if len(programs) != 1:
      raise RuntimeError(
        f"XLA dumped {len(programs)} optimised programs (expected 1): was the executable taken "
        "from a compilation cache? Count kernels with jax's persistent cache off."
      )
    (program,) = programs
    prefix = program.removesuffix("cpu_after_optimizations.txt")
    names = {}
    for line in open(os.path.join(directory, program)).read().splitlines():
      match = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+)\s*=", line)
      if match:
        names[match.group(1)] = (_OP_NAME.search(line) or [None, ""])[1]
    for f in files:
      if not (f.startswith(prefix) and f.endswith(".ir-with-opt.ll")):
        continue
      kernel = f.removeprefix(prefix).removesuffix(".ir-with-opt.ll")
      kernel = kernel.removeprefix("__compute_module_").removesuffix("_kernel_module")
      block = _block_of(names.get(kernel, ""), scopes)
      kernels[block] = kernels.get(block, 0) + 1
      with open(os.path.join(directory, f)) as ir:
        lines[block] = lines.get(block, 0) + sum(1 for _ in ir)
  return kernels, lines
