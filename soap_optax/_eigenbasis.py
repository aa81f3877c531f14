"""Eigenbases of the Kronecker factors, refreshed on a schedule or when they go stale.

The refresh works on *stacks*: all factors of the same side, dtype and schedule phase, from
every parameter and block, are concatenated into one ``(K, n, n)`` array and decomposed in one
batched call. That keeps the compiled program's size (and its compile time) independent of the
number of parameters, and on a device mesh the stack's leading axis is divided over the devices,
so each device decomposes about ``K / devices`` factors (``BUILD_NOTES.md``, "Sharded state").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike, DTypeLike

from soap_optax import _checks, _linalg, _sharding
from soap_optax._carrier import (
  KroneckerUpdate,
  check_layout,
  expect_carriers,
  factor_key,
  is_carrier,
  keyed_groups,
  storage_dtype,
)
from soap_optax._layout import LayoutRule
from soap_optax._linalg import Eigenbasis
from soap_optax._stats import factor_shapes

Method = Literal["qr", "eigh"]
_METHODS = ("qr", "eigh")
_KEEP, _RECOMPUTE = 0, 1


class EigenbasisState(NamedTuple):
  """State of :func:`eigenbasis_refresh`.

  Each field is a dict keyed like the statistics (``"<parameter path>:<working axis>"``, or the
  group's name with ``LayoutRule(group_equal_layouts=True)``), with one entry per block of the
  parameter (of every member of the group, one after another).

  Attributes:
    basis: the orthonormal bases ``Q_k``, ``(num_blocks, n, n)`` (identity before the first
      step).
    eigenvalues: the eigenvalue estimates matching the columns of ``basis``, ``(num_blocks, n)``
      (−1 on the zero padding of ragged blocks).
    refreshes: how many times each basis was recomputed (the first decomposition included).
    qr_iterations: QR iterations spent at each factor's last refresh (0 when it was skipped).
  """

  basis: dict[str, jax.Array]
  eigenvalues: dict[str, jax.Array]
  refreshes: dict[str, jax.Array]
  qr_iterations: dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RefreshConfig:
  """How and when :func:`eigenbasis_refresh` recomputes a basis (validated on construction).

  Attributes:
    precondition_frequency: refresh every this many updates.
    method: ``"qr"``, warm-started power iteration + QR (SOAP), or ``"eigh"``.
    first_basis: ``"eigh"`` (the references) or ``"qr"``: QR iterations from the identity, for
      accelerators whose ``eigh`` is slow.
    refresh_tolerance: τ of the adaptive skip test; 0 refreshes on every schedule.
    max_qr_iterations: the most power/QR steps per refresh.
    stagger: give each factor its own phase within the window.
    orthonormalization: how the power steps are orthonormalised: ``"qr"`` (Householder) or a
      Cholesky-QR with a Householder fallback (``"cholesky_qr2"``, ``"shifted_cholesky_qr3"``).
  """

  precondition_frequency: ArrayLike = 10
  method: Method = "qr"
  first_basis: Method = "eigh"
  refresh_tolerance: ArrayLike = 0.0
  max_qr_iterations: ArrayLike = 1
  stagger: bool = False
  orthonormalization: _linalg.Orthonormalization = "qr"

  def __post_init__(self):
    for name in ("method", "first_basis"):
      _checks.check_choice(name, getattr(self, name), _METHODS)
    _checks.check_choice("orthonormalization", self.orthonormalization, _linalg.ORTHONORMALIZATIONS)
    if self.stagger and not isinstance(self.precondition_frequency, int):
      raise ValueError(
        "stagger=True needs a static (Python int) precondition_frequency; with "
        "optax.inject_hyperparams, list precondition_frequency in static_args."
      )
    iterations = self.max_qr_iterations
    if isinstance(iterations, (int, float)) and not (
      iterations >= 1 and iterations == int(iterations)
    ):
      raise ValueError(f"max_qr_iterations must be an int >= 1, got {iterations!r}.")

  @property
  def adaptive(self) -> bool:
    """Whether a scheduled refresh first tests each factor (τ not statically zero)."""
    return not isinstance(self.refresh_tolerance, (int, float)) or self.refresh_tolerance > 0

  @property
  def single_iteration(self) -> bool:
    return isinstance(self.max_qr_iterations, int) and self.max_qr_iterations == 1


# -- the decompositions, on stacks ``(K, n, n)`` or single matrices ---------------------------


def _refresh(stats, basis, estimates, product, padding, config: RefreshConfig) -> Eigenbasis:
  """Recomputes a basis: sorted power step + QR (+ warm iterations), or ``eigh``."""
  if config.method == "eigh":
    return _linalg.eigh_basis(stats)
  new_basis, order = _linalg.sorted_power_step(product, estimates, config.orthonormalization)
  if config.single_iteration:
    eigenvalues = _linalg.permute(estimates, order, axis=-1)
    iterations = jnp.ones(order.shape[:-1], jnp.int32)
  else:
    new_basis, eigenvalues, iterations = _linalg.warm_qr_iterations(
      stats,
      new_basis,
      config.refresh_tolerance,
      config.max_qr_iterations,
      padding,
      config.orthonormalization,
    )
  return Eigenbasis(new_basis, order, eigenvalues, jnp.ones(order.shape[:-1], bool), iterations)


def _kept(basis, estimates) -> Eigenbasis:
  batch, n = estimates.shape[:-1], estimates.shape[-1]
  order = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (*batch, n))
  return Eigenbasis(basis, order, estimates, jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32))


def _scheduled(stats, basis, padding, config: RefreshConfig) -> Eigenbasis:
  """A scheduled refresh of one factor: skip it when fresh enough (τ > 0), else recompute."""
  if config.method == "eigh" and not config.adaptive:
    return _linalg.eigh_basis(stats)
  product = stats @ basis
  estimates = _linalg.diagonal_estimates(basis, product)
  if not config.adaptive:
    return _refresh(stats, basis, estimates, product, padding, config)
  stale = _linalg.is_stale(stats, basis, product, estimates, config.refresh_tolerance, padding)
  return lax.cond(
    stale,
    lambda: _refresh(stats, basis, estimates, product, padding, config),
    lambda: _kept(basis, estimates),
  )


def _first(stats, basis, padding, config: RefreshConfig) -> Eigenbasis:
  """The first basis: ``eigh``, or the QR refresh started from the identity."""
  if config.first_basis == "eigh":
    return _linalg.eigh_basis(stats)
  return _scheduled(
    stats,
    jnp.broadcast_to(jnp.eye(stats.shape[-1], dtype=stats.dtype), stats.shape),
    padding,
    dataclasses.replace(config, method="qr"),
  )


def _decomposed(decompose, stats, basis, padding, config, on_mesh) -> Eigenbasis:
  """``decompose`` over a stack: in one batched call, or one factor at a time."""

  def one_at_a_time(operands):
    return lax.map(lambda a: decompose(*a, config), operands)

  def batched(operands):
    return decompose(*operands, config)

  operands = (stats, basis, padding)
  if config.adaptive and not (decompose is _first and config.first_basis == "eigh"):
    # One factor at a time, so that each factor's skip test is a real branch.
    return one_at_a_time(operands)
  elif on_mesh:
    # On CPU every simulated device runs on a thread of XLA's intra-op pool, and jaxlib 0.10's
    # batched LAPACK kernels split a batch over that same pool and block until it is done: with
    # several devices doing so at once, all pool threads can wait and the step never finishes
    # (seen with 16 factors per device on 8 devices). Single matrices are not split.
    return lax.platform_dependent(operands, cpu=one_at_a_time, default=batched)
  return batched(operands)


def _guarded(result: Eigenbasis, basis, estimates) -> Eigenbasis:
  """``result``, but the old basis (and estimates) kept where it is not finite.

  Reads the eigenvalues only: they are non-finite wherever the basis is. ``eigh`` fails with
  NaN in both. A QR refresh's basis is non-finite only if ``L Q`` is, and then so is every
  estimate ``Σᵢ Qᵢⱼ (LQ)ᵢⱼ`` of a column holding an Inf or NaN (``0·∞`` is NaN too); the warm
  iterations re-estimate from their own ``L Q`` the same way. Testing the ``n × n`` bases as well
  cost a reduction per factor size, in the compiled program and at every refresh.
  """
  ok = _linalg.finite(result.eigenvalues, axis=-1)
  kept = _kept(basis, estimates)
  return jax.tree.map(
    lambda new, old: jnp.where(ok.reshape(ok.shape + (1,) * (new.ndim - 1)), new, old),
    result._replace(refreshed=result.refreshed & ok),
    kept,
  )


# -- schedule: phases and stacks ----------------------------------------------------------------


class _Unit(NamedTuple):
  """One factor of one record, or of one member of a group: what is refreshed together.

  The state is keyed by ``key`` (the record's factor); the unit holds its blocks
  ``start : start + size``: all of them, or (a group with ``stagger``) one member's, so that each
  parameter keeps the phase it would have alone.
  """

  key: str
  carrier: KroneckerUpdate
  axis: int
  start: int
  size: int
  rank: int  # position in the order of the parameters' factors (the stagger's tie-break)

  @property
  def whole(self) -> bool:
    return self.size == self.carrier.layout.num_blocks

  def part(self, x):
    """The unit's blocks of one of its record's per-block arrays."""
    return x if self.whole else x[self.start : self.start + self.size]


def _units(carriers: Sequence[KroneckerUpdate], config: RefreshConfig) -> list[_Unit]:
  """Every factor's unit, in the order of the parameters' factors (tree order, then axis)."""
  units: list[_Unit] = []
  for c in carriers:
    split = config.stagger and len(c.members) > 1
    starts = np.cumsum([0] + [m.layout.num_blocks for m in c.members])
    for axis, n in enumerate(c.layout.factor_sizes):
      if n is None:
        continue
      key = factor_key(c.name, axis)
      if not split:
        first = c.members[0].index if c.members else len(units)
        units.append(_Unit(key, c, axis, 0, c.layout.num_blocks, first))
        continue
      for i, m in enumerate(c.members):
        units.append(_Unit(key, c, axis, int(starts[i]), m.layout.num_blocks, m.index))
  # Grouped records list their members' factors group by group; the stagger balances them in
  # the order the parameters' factors have without grouping, so that each gets the same phase.
  return sorted(units, key=lambda u: (u.rank, u.axis)) if config.stagger else units


def _phases(units: Sequence[_Unit], config: RefreshConfig) -> list[int]:
  """Each unit's refresh phase: 0 for all, or a greedy balance of the ``blocks · n³`` costs."""
  if not config.stagger:
    return [0] * len(units)
  frequency = config.precondition_frequency
  assert isinstance(frequency, int), "stagger needs a static frequency (RefreshConfig checks)"
  load, phases = [0] * frequency, [0] * len(units)
  costs = [u.size * u.carrier.layout.block_shape[u.axis] ** 3 for u in units]
  for i in sorted(range(len(units)), key=lambda i: -costs[i]):  # stable: ties in tree order
    phase = min(range(frequency), key=load.__getitem__)
    phases[i] = phase
    load[phase] += costs[i]
  return phases


def _padding(unit: _Unit, dtype) -> np.ndarray:
  """``(size, n)``: 1 on the zero padding of the unit's ragged blocks, else 0."""
  layout = unit.carrier.layout
  padding = layout.padding(unit.axis)
  if padding is None:
    return np.zeros((unit.size, layout.block_shape[unit.axis]), dtype)
  return unit.part(padding).astype(dtype)


def _decompose_stack(is_first, units, stats, bases, estimates, starts, config, mesh):
  """The first bases (``is_first``) or a scheduled refresh of the stack of the units' factors.

  The factors are concatenated along their block axis, padded with identities to a multiple of
  the device count, and the stack's leading axis is divided over the devices: each device
  decomposes its own slice (inside ``shard_map``, so QR and the per-factor skip branches stay
  local). The results are split back per unit, at ``starts`` (see :func:`_split_points`) or,
  on a mesh, at static offsets.
  """
  sizes = [s.shape[0] for s in stats]
  n, dtype = stats[0].shape[-1], stats[0].dtype
  padding = np.concatenate([_padding(u, np.dtype(dtype)) for u in units])
  stats = jnp.concatenate(stats)
  if padding.any():  # known when tracing: a stack without ragged blocks compiles no sentinel
    stats = _linalg.sentinel_padding(stats, padding)
  basis, estimate = jnp.concatenate(bases), jnp.concatenate(estimates)
  count = _sharding.device_count(mesh)
  extra = -len(padding) % count
  if extra:  # identity factors fill the stack up to a multiple of the device count
    eye = jnp.broadcast_to(jnp.eye(n, dtype=dtype), (extra, n, n))
    stats, basis = jnp.concatenate([stats, eye]), jnp.concatenate([basis, eye])
    estimate = jnp.concatenate([estimate, jnp.ones((extra, n), dtype)])
    padding = np.concatenate([padding, np.zeros((extra, n), padding.dtype)])
  counts = jnp.asarray(padding.sum(-1))

  def local(stats, basis, estimate, counts, is_first):
    def decompose(branch):
      with jax.named_scope(branch.__name__.strip("_")):  # "first" or "scheduled" in profiles
        return _decomposed(branch, stats, basis, counts, config, mesh is not None)

    # One runtime branch for both, so that the program assembles and splits the stack once:
    # with a branch each, compile time grew twice as fast with the number of parameters. The
    # test of the result follows the branch, so that it is compiled once too.
    result = lax.cond(is_first, lambda: decompose(_first), lambda: decompose(_scheduled))
    with jax.named_scope("guard"):
      return _guarded(result, basis, estimate)

  if mesh is not None:
    spec = _sharding.stack_spec(mesh, 3)
    vector, scalar = _sharding.stack_spec(mesh, 2), _sharding.stack_spec(mesh, 1)
    stats, basis = (_sharding.constrain(x, spec, mesh) for x in (stats, basis))
    estimate = _sharding.constrain(estimate, vector, mesh)
    counts = _sharding.constrain(counts, scalar, mesh)
    replicated = jax.sharding.PartitionSpec()
    local = jax.shard_map(
      local,
      mesh=jax.sharding.get_abstract_mesh(),
      in_specs=(spec, spec, vector, scalar, replicated),
      out_specs=Eigenbasis._make([spec, vector, vector, scalar, scalar]),  # a tree of specs
      check_vma=False,
    )
  result = local(stats, basis, estimate, counts, is_first)
  if starts is None:
    starts = [int(i) for i in np.cumsum(sizes) - sizes]
    cut = lambda x, i, s: x[i : i + s]  # noqa: E731
  else:
    cut = _linalg.slice_at
  return [
    jax.tree.map(lambda x, i=i, s=s: cut(x, i, s), result)
    for i, s in zip(starts, sizes, strict=True)
  ]


def _split_points(group: Sequence[_Unit], mesh) -> list | None:
  """Where each unit's factors start in its stack, as values XLA cannot see through.

  Split at constant offsets, every unit's slice of every result is a kernel of its own, the
  largest part of the compiled program (16 GPT layers: 651 of 874 kernels). At offsets that are
  run-time values, the slices of equal shape are one kernel. On a mesh the static offsets stay:
  a slice at a run-time offset of a divided axis would gather the whole stack.
  """
  if mesh is not None:
    return None
  return _linalg.run_time_offsets([u.size for u in group])


def _group(units: Sequence[_Unit], phases: Sequence[int]) -> dict[tuple, list[int]]:
  """Units of equal factor size, compute dtype and phase share one stack (in tree order)."""
  groups: dict[tuple, list[int]] = {}
  for i, (unit, phase) in enumerate(zip(units, phases, strict=True)):
    layout = unit.carrier.layout
    key = (layout.block_shape[unit.axis], jnp.dtype(unit.carrier.grad.dtype).name, phase)
    groups.setdefault(key, []).append(i)
  return groups


def eigenbasis_refresh(
  precondition_frequency: int = 10,
  *,
  layout: LayoutRule | None = None,
  refresh_tolerance: float = 0.0,
  max_qr_iterations: int = 1,
  method: Method = "qr",
  first_basis: Method = "eigh",
  stagger: bool = False,
  dtype: DTypeLike | None = None,
  orthonormalization: _linalg.Orthonormalization = "qr",
) -> optax.GradientTransformation:
  """Keeps an orthonormal eigenbasis ``Q_k`` of every Kronecker factor ``L_k``.

  On the first update the bases come from ``eigh`` (eigenvalues in descending order). After
  that, every ``precondition_frequency`` updates (at updates 10, 20, … by default), each factor
  is refreshed. With ``method="qr"`` (SOAP's choice) a refresh re-orders the old basis by its
  estimated eigenvalues ``diag(QᵀLQ)``, takes one power-iteration step ``L Q`` and
  re-orthonormalises it with QR; with ``max_qr_iterations > 1`` further warm-started steps follow
  until the basis passes the staleness test below. ``method="eigh"`` recomputes the exact
  eigendecomposition instead. ``first_basis="qr"`` replaces the first ``eigh`` too, by the QR
  refresh started from the identity: no ``eigh`` anywhere, the choice for accelerators whose
  batched ``eigh`` is slow (on TPU, measured ~30× slower than QR); its first basis is only an
  approximation of the reference's, improving with ``max_qr_iterations`` and with every refresh.

  With ``refresh_tolerance`` τ > 0 (the adaptive rule of *Purifying Shampoo*) a scheduled refresh
  first measures, per factor, ``B = QᵀLQ`` and skips the factor when
  ``‖B − diag(B)‖_F ≤ τ‖B‖_F``; ``diag(B)`` then serves as the eigenvalue estimate. τ = 0 refreshes
  every factor at every scheduled step; τ = 1 never refreshes after the first basis. A skipped
  factor costs only its test, and a step that is not scheduled costs nothing: the refresh is a
  runtime branch.

  Factors of the same size are refreshed together, as one batched decomposition; on a device
  mesh each device decomposes its share of them. A refresh whose result is not finite keeps the
  previous basis. The basis used by this step's update (``basis`` of the
  :class:`~soap_optax.KroneckerUpdate`) is the one from *before* the refresh, so it never
  contains the current gradient; the refreshed one travels as ``next_basis`` together with the
  column ``order`` for the rotated optimizers' moments.

  Args:
    precondition_frequency: refresh every this many updates (>= 1).
    layout: the :class:`~soap_optax.LayoutRule` shared by all blocks of the composition.
    refresh_tolerance: τ in ``[0, 1]`` for the adaptive skip test; 0 keeps the fixed schedule.
    max_qr_iterations: the most warm-started power/QR steps per refresh (>= 1).
    method: ``"qr"`` (warm-started power iteration + QR) or ``"eigh"``.
    first_basis: ``"eigh"`` (the references' first step) or ``"qr"`` (no ``eigh`` at all).
    stagger: spread the factors' refreshes over the ``precondition_frequency`` steps of a window
      (each factor gets a fixed phase, balanced by its ``blocks · n³`` cost) instead of
      refreshing all of them at steps 10, 20, …: the same work per window without one slow step.
      It changes when each basis is refreshed, so it is off by default (SOAP's schedule).
    dtype: storage dtype of the bases and eigenvalue estimates (the decompositions run in
      float32 whatever it is); by default float32, or float64 for float64 parameters.
    orthonormalization: how a refresh orthonormalises its power steps (``method="qr"`` and
      ``first_basis="qr"``): ``"qr"``, Householder QR (the references); ``"cholesky_qr2"``,
      two Cholesky-QR passes (products, a Cholesky and a triangular solve each: matmul work,
      for accelerators); ``"shifted_cholesky_qr3"``, a shifted pass first, which passes
      condition numbers about ten to a hundred times larger. The Cholesky forms square the
      power step's condition number, so every matrix is tested and recomputed by Householder
      QR where they fail: rank-deficient statistics (early in training, or batch × sequence
      below the axis length) always fall back and then cost both. They give the same bases up
      to the columns' signs (which do not change the updates) and rounding; on CPU the default
      is the faster one (``docs/benchmarks.md``).

  Returns:
    An ``optax.GradientTransformation`` to be placed after :func:`~soap_optax.kronecker_stats`.

  Examples:
    >>> rule = soap_optax.LayoutRule()
    >>> tx = optax.chain(
    ...   soap_optax.kronecker_stats(0.95, layout=rule),
    ...   soap_optax.eigenbasis_refresh(10, layout=rule),
    ... )
    >>> grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> records, state = tx.update(grads, tx.init(grads))
    >>> state[1].basis["w:0"][0]  # the eigenbasis of G Gᵀ, eigenvalues descending
    Array([[1., 0.],
           [0., 1.]], dtype=float32)

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024 (Algorithm 4).
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  _checks.check_positive_int("precondition_frequency", precondition_frequency)
  _checks.check_unit_interval("refresh_tolerance", refresh_tolerance, closed=True)
  _checks.check_positive_int("max_qr_iterations", max_qr_iterations)
  _checks.check_float_dtype("dtype", dtype)
  rule = layout or LayoutRule()
  config = RefreshConfig(
    precondition_frequency,
    method,
    first_basis,
    refresh_tolerance,
    max_qr_iterations,
    stagger,
    orthonormalization=orthonormalization,
  )

  def init_fn(params):
    mesh = _sharding.find_mesh(params)

    def per_factor(make):
      def build(group):
        dt = storage_dtype(group.dtype, dtype)
        out = {}
        for axis, shape in factor_shapes(group.layout).items():
          x = make(shape, dt)
          out[factor_key(group.name, axis)] = _sharding.constrain(
            x, _sharding.spread(x.shape, mesh), mesh
          )
        return out

      return keyed_groups(params, rule, build)

    with _sharding.using(mesh):
      return EigenbasisState(
        basis=per_factor(lambda s, dt: jnp.broadcast_to(jnp.eye(s[-1], dtype=dt), s)),
        eigenvalues=per_factor(lambda s, dt: jnp.zeros(s[:2], dt)),
        refreshes=per_factor(lambda s, dt: jnp.zeros(s[:1], jnp.int32)),
        qr_iterations=per_factor(lambda s, dt: jnp.zeros(s[:1], jnp.int32)),
      )

  def update_fn(updates, state, params=None):
    del params
    expect_carriers(updates, "eigenbasis_refresh", "stats", "kronecker_stats")
    mesh = _sharding.find_mesh(updates)
    carriers = jax.tree.leaves(updates, is_leaf=is_carrier)
    for carrier in carriers:
      check_layout(carrier, rule, "eigenbasis_refresh")
    units = _units(carriers, config)
    if not units:  # nothing factored: the records get empty per-axis fields
      structure: Any = jax.tree.structure(updates, is_leaf=is_carrier)  # PyTreeDef: no stubs
      return structure.unflatten([_fill(carrier, {}) for carrier in carriers]), state
    phases = _phases(units, config)
    results = {}
    with _sharding.using(mesh), jax.default_matmul_precision("float32"):
      # Full float32 products on accelerators too: the power steps and the staleness test decide
      # the basis, and TF32/bf16 passes would blur small eigenvalues.
      by_phase: dict[int, list[list[_Unit]]] = {}
      for (_, _, phase), members in _group(units, phases).items():
        by_phase.setdefault(phase, []).append([units[i] for i in members])
      for phase, stacks in by_phase.items():
        results.update(_refresh_phase(stacks, phase, state, config, mesh))
    with jax.named_scope("refresh_state"):
      return _assemble(updates, carriers, units, results, state)

  return optax.GradientTransformation(init_fn, update_fn)


def _refresh_phase(stacks: Sequence[Sequence[_Unit]], phase: int, state, config, mesh) -> dict:
  """One runtime branch for the stacks of one phase (all of them, without ``stagger``): keep
  them, or recompute them (the first bases or a scheduled refresh).

  One branch for every stack, not one per stack: each branch is a computation XLA compiles on
  its own, with its own copies of what it returns.
  """
  count, finite = stacks[0][0].carrier.count, stacks[0][0].carrier.finite

  def read(group):
    cdt = group[0].carrier.grad.dtype
    return (
      [u.part(u.carrier.stats[u.axis]) for u in group],
      [u.part(state.basis[u.key]).astype(cdt) for u in group],
      [u.part(state.eigenvalues[u.key]).astype(cdt) for u in group],
      [u.part(state.qr_iterations[u.key]) for u in group],
    )

  stats, bases, estimates, iterations = (list(x) for x in zip(*map(read, stacks), strict=True))

  @jax.named_scope("keep")
  def keep(stats, bases, estimates, iterations, is_first, starts):
    del stats, is_first, starts
    return [
      [_kept(b, e)._replace(iterations=i) for b, e, i in zip(*stack, strict=True)]
      for stack in zip(bases, estimates, iterations, strict=True)
    ]

  def recompute(stats, bases, estimates, iterations, is_first, starts):
    del iterations
    return [
      _decompose_stack(is_first, group, s, b, e, at, config, mesh)
      for group, s, b, e, at in zip(stacks, stats, bases, estimates, starts, strict=True)
    ]

  specs = [[_result_specs(b.shape, mesh) for b in stack] for stack in bases]
  # The operands stay where the state keeps them until a branch moves them: no communication
  # outside the refresh, so a step that does not refresh pays nothing for it on a mesh either.
  in_specs = (
    [[s.basis for s in stack] for stack in specs],
    [[s.basis for s in stack] for stack in specs],
    [[s.eigenvalues for s in stack] for stack in specs],
    [[s.iterations for s in stack] for stack in specs],
    None if mesh is None else jax.sharding.PartitionSpec(),
    None,
  )
  branches = [_sharding.relayout(fn, specs, mesh, in_specs) for fn in (keep, recompute)]
  on_schedule = count % config.precondition_frequency == phase
  index = jnp.where((count == 0) | on_schedule, _RECOMPUTE, _KEEP)
  with jax.named_scope("eigenbasis_refresh"):  # names the refresh's ops in profiles and HLO
    index = jnp.where(finite, index, _KEEP)
    # Every operand enters the branches as an argument: under explicit sharding they run in
    # automatic regions, which must not close over explicitly typed values.
    starts = [_split_points(group, mesh) for group in stacks]
    out = lax.switch(index, branches, stats, bases, estimates, iterations, count == 0, starts)
  return {
    (u.key, u.start): r
    for group, results in zip(stacks, out, strict=True)
    for u, r in zip(group, results, strict=True)
  }


def _joined(units: Sequence[_Unit], results: dict) -> dict[str, Eigenbasis]:
  """Per factor key, its units' results in block order (joined when a group was split)."""
  parts: dict[str, list] = {}
  for unit in sorted(units, key=lambda u: (u.key, u.start)):
    parts.setdefault(unit.key, []).append(results[(unit.key, unit.start)])
  return {
    key: p[0] if len(p) == 1 else jax.tree.map(lambda *x: jnp.concatenate(x), *p)
    for key, p in parts.items()
  }


def _assemble(updates, carriers, units, results, state):
  """The new state, and each record with this step's bases and the refreshed ones."""
  fields = [dict(_as_dict(f)) for f in state]
  basis, eigenvalues, refreshes, iterations = fields
  per_carrier: dict[str, dict] = {}
  joined = _joined(units, results)
  for unit in {u.key: u for u in units}.values():
    r, old = joined[unit.key], state.basis[unit.key]
    basis[unit.key] = r.basis.astype(old.dtype)
    eigenvalues[unit.key] = r.eigenvalues.astype(state.eigenvalues[unit.key].dtype)
    refreshes[unit.key] = state.refreshes[unit.key] + r.refreshed.astype(jnp.int32)
    iterations[unit.key] = r.iterations
    cdt = unit.carrier.grad.dtype
    # The moments move into the basis the next step will read: the stored one.
    per_carrier.setdefault(unit.carrier.name, {})[unit.axis] = (
      old.astype(cdt),
      basis[unit.key].astype(cdt),
      r.order,
      state.eigenvalues[unit.key].astype(cdt),
      r.refreshed,
    )
  carriers = [_fill(carrier, per_carrier.get(carrier.name, {})) for carrier in carriers]
  structure: Any = jax.tree.structure(updates, is_leaf=is_carrier)  # PyTreeDef: no stubs
  new_updates = structure.unflatten(carriers)
  return new_updates, EigenbasisState(basis, eigenvalues, refreshes, iterations)


def _fill(carrier: KroneckerUpdate, axes: dict) -> KroneckerUpdate:
  """``carrier`` with its per-axis basis fields from ``{axis: (basis, next, order, λ, flag)}``."""
  rank = len(carrier.layout.working_shape)
  per_axis = [tuple(axes[a][i] if a in axes else None for a in range(rank)) for i in range(5)]
  names = ("basis", "next_basis", "order", "eigenvalues", "refreshed")
  return carrier.replace(**dict(zip(names, per_axis, strict=True)))


def _result_specs(basis_shape, mesh) -> Eigenbasis:
  """Where a refresh's results live: spread like the state, but the refreshed flags replicated,
  so that the rotated optimizers' "was anything refreshed?" test needs no communication."""
  blocks, n = basis_shape[0], basis_shape[-1]
  spread = functools.partial(_sharding.spread, mesh=mesh)
  flags = None if mesh is None else jax.sharding.PartitionSpec()
  return Eigenbasis._make(  # a tree of specs
    [spread((blocks, n, n)), spread((blocks, n)), spread((blocks, n)), flags, spread((blocks,))]
  )


def _as_dict(field):
  return field if isinstance(field, dict) else dict(field)
