"""Float64 NumPy oracles for the Kronecker-factored family: Shampoo, eigen-Adafactor, EShampoo.

Independent of ``soap_optax``. Shampoo and EShampoo follow the behaviour of Distributed Shampoo
(DS: github.com/facebookresearch/optimizers, ``distributed_shampoo/``) and the papers (SOAP,
arXiv 2409.11321; Purifying Shampoo, arXiv 2506.03595), except for the library's *declared*
deviations listed below. Every class has the interface of :class:`oracles.SoapOracle`:
constructor keyword arguments, ``step(params, grads) -> new params`` (float64, original shapes;
inputs are not modified), ``self.count`` (number of completed calls) and ``self.state[name]``.

Layout and blocking
-------------------
* Working shape and factored axes as SOAP (``max_precond_dim``, ``merge_dims``,
  ``precondition_1d``) via :func:`family_layout`; a 0-D parameter is never factored.
* ``block_size`` (DS's ``max_preconditioner_dim`` blocking, see :func:`block_slices`): the
  working shape is cut along every axis longer than ``block_size`` into consecutive blocks of
  ``block_size`` (the last one ragged); blocks are listed in C order over the block grid. Each
  block is then an independent parameter of its own shape (no further merging): its own
  statistics, bases, eigenvalue estimates, moments and grafting norm. A block axis has a factor
  iff its length is ``<= max_precond_dim``; a 1-D parameter's blocks only with
  ``precondition_1d``; 0-D never (:func:`block_factored`).

Schedule (shared by the family)
-------------------------------
* Statistics ``L_k <- beta L_k + (1 - beta) G_(k) G_(k)^T`` from 0, ``beta = shampoo_beta`` or
  ``b2``, with the current gradient on every call including the first.
* First call: statistics, then first bases (``first_basis="eigh"``: ``eigh`` descending;
  ``"qr"``: :func:`refresh_factor` from ``Q = I``). Params come back unchanged, no moment moves,
  no weight decay.
* Call ``t >= 1`` (``t`` = number of earlier calls): the update uses the bases and eigenvalue
  estimates from before this call's refresh; ``p <- p - lr_t u``, then ``p <- p - lr_t wd p``
  (SOAP's decay; ``weight_decay_mask`` maps names to whether they decay, default all); the
  statistics take this call's gradient; every factor whose phase is due
  (``t % precondition_frequency == phase``; phase 0 unless ``stagger``) is refreshed with
  :func:`refresh_factor`, and eigenbasis moments follow along the refreshed axes only
  (first-moment-like arrays rotated exactly by ``Q_new^T Q_old``, diagonal arrays permuted with
  the refresh's order).
* ``stagger``: see :func:`oracles.assign_phases`; a unit is one working axis of a parameter
  (all its blocks), cost ``num_blocks * (block length)^3``, listed by sorted parameter name then
  ascending axis. Phases are fixed at the first call (``self.phases[name][axis]``; a parameter
  first seen later gets phase 0).

Declared deviations from DS
---------------------------
The ``DEVIATION_*`` constants below document deviations that are the only behaviour
implemented. Keywords whose default is the declared deviation and whose alternative is DS's
form: ``relative_eps`` (False: DS's absolute damping), ``bias_correct_factors`` (True: DS's
bias-corrected factors), ``soap_weight_decay`` (False: DS's decoupled decay). Extras that DS
lacks: ``trace_scaling`` (SOAP paper's form), ``first_basis``, ``stagger``.

State
-----
Unblocked parameter (``block_size=None``): ``oracle.state[name]`` is a dict with ``step`` (``t``
of the last call, 0 after the first), ``work_shape``, ``factored`` (per working axis), ``L``,
``Q``, ``eig``, ``order``, ``refresh_count`` (per axis, ``None`` where not factored; the first
call's basis is not counted), ``stat_count`` (number of gradients in ``L``), ``eig_count`` (per
axis: ``stat_count`` when ``eig`` was last set) and the oracle's moments. Blocked parameter:
``state[name]`` has ``step``, ``work_shape`` (the whole working shape), ``slices`` and
``blocks``; ``blocks[i]`` is a dict with the unblocked keys for block ``i`` (its ``work_shape`` is
the block's shape).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence

import numpy as np

try:  # works whether or not tests/ is a package
  from tests.oracles import assign_phases, factor_layout
except ModuleNotFoundError:
  from oracles import assign_phases, factor_layout

_METHODS = ("qr", "eigh")
_FIRST_BASES = ("eigh", "qr")
_GRAFTINGS = ("none", "sgd", "rmsprop", "adam")

# -- declared deviations from Distributed Shampoo ---------------------------------------------

# (a) SOAP's convention for the whole family: the first call only accumulates the statistics and
# computes the first bases; real updates (and every bias correction) count t = 1, 2, ... from
# the second call. DS updates on its first step (step 1) and, by default, computes no basis
# before ``start_preconditioning_step`` (= precondition_frequency): it runs the grafting method
# alone (or identity-basis preconditioning without grafting) until then.
DEVIATION_FIRST_CALL_ONLY_INITIALISES = True

# (b) Basis lag: the update of call t uses the bases from before this call's refresh; the new
# statistics and the refresh come after the update. DS (``DistributedShampoo.
# _compute_search_directions``) updates the factors and does the amortized computation first and
# preconditions with the fresh result in the same step.
DEVIATION_BASIS_LAG = True

# (f) SOAP's sorted QR refresh: sort the basis by descending ``diag(Q^T L Q)`` *before* the power
# step, keep the eigenvalue estimates and eigenbasis diagonals (EShampoo's D, SOAP's v, the
# Adafactor factors) permuted with that order. DS (``matrix_functions.matrix_eigendecomposition``
# / ``qr_algorithm``) iterates first and then sorts the final estimates *ascending* and permutes
# only the eigenvectors; the corrected eigenvalues are never permuted or rotated.
DEVIATION_SOAP_SORTED_QR_REFRESH = True


# -- helpers -----------------------------------------------------------------------------------


def family_layout(
  shape: Sequence[int], max_precond_dim: int, merge: bool, precondition_1d: bool
) -> tuple[tuple[int, ...], list[bool]]:
  """SOAP's :func:`oracles.factor_layout`, except that 0-D is never factored (shape ``()``)."""
  shape = tuple(int(s) for s in shape)
  if not shape:
    return (), []
  return factor_layout(shape, max_precond_dim, merge, precondition_1d)


def block_slices(work_shape: Sequence[int], block_size: int | None) -> list[tuple[slice, ...]]:
  """The blocks of a working shape, as index tuples, in C order over the block grid.

  Like DS's ``shampoo_utils.multi_dim_split`` (``torch.split`` along every axis in turn): an
  axis longer than ``block_size`` is cut at multiples of ``block_size`` (the last piece is
  shorter); shorter axes are not cut. ``block_size=None`` gives one block, the whole shape.
  """
  per_axis = []
  for size in work_shape:
    size = int(size)
    if block_size is None or size <= block_size:
      per_axis.append([slice(0, size)])
    else:
      per_axis.append(
        [slice(start, min(start + block_size, size)) for start in range(0, size, block_size)]
      )
  return [tuple(index) for index in itertools.product(*per_axis)]


def block_factored(
  block_shape: Sequence[int], param_ndim: int, max_precond_dim: int, precondition_1d: bool
) -> list[bool]:
  """Which axes of a block get a factor: length ``<= max_precond_dim``.

  The blocks of a 1-D parameter only with ``precondition_1d``; a 0-D block never. The 1-D rule
  looks at the parameter (as :func:`oracles.factor_layout` does), so a parameter merged to one
  working axis is factored without ``precondition_1d`` whether or not it is blocked.
  """
  if not block_shape:
    return []
  if param_ndim == 1:
    return [bool(precondition_1d) and int(block_shape[0]) <= max_precond_dim]
  return [int(n) <= max_precond_dim for n in block_shape]


def mode_product(x: np.ndarray, mats: Sequence[np.ndarray | None]) -> np.ndarray:
  """``x ×_k mats[k]`` for every axis: ``y[.., i, ..] = sum_j mats[k][i, j] x[.., j, ..]``.

  ``None`` entries leave their axis alone. ``G ×_k Q_k^T`` goes into the eigenbasis (for a
  matrix: ``Q_0^T G Q_1``) and ``×_k Q_k`` comes back.
  """
  for axis, mat in enumerate(mats):
    if mat is None:
      continue
    x = np.moveaxis(np.tensordot(mat, x, axes=([1], [axis])), 0, axis)
  return x


def axis_gram(x: np.ndarray, axis: int) -> np.ndarray:
  """``X_(k) X_(k)^T``: contract ``x`` with itself over every axis except ``axis``."""
  unfolded = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  return unfolded @ unfolded.T


def eigh_descending(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``eigh`` with eigenvalues (and eigenvector columns) in descending order."""
  vals, vecs = np.linalg.eigh(a)
  return np.ascontiguousarray(vals[::-1]), np.ascontiguousarray(vecs[:, ::-1])


def _offdiag_small(b: np.ndarray, tol: float) -> bool:
  """``||B - diag(B)||_F <= tol ||B||_F`` (Purifying Shampoo's criterion, as in DS)."""
  off = b - np.diag(np.diag(b))
  return bool(np.linalg.norm(off) <= tol * np.linalg.norm(b))


def refresh_factor(
  stat: np.ndarray,
  q: np.ndarray,
  method: str = "qr",
  tol: float = 0.0,
  max_qr_iterations: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
  """One factor's refresh. Returns ``(Q_new, lam, order, refreshed)``.

  * ``tol > 0`` and ``B = Q^T L Q`` nearly diagonal (``||B - diag B||_F <= tol ||B||_F``): skip,
    ``Q`` kept, ``lam = diag(B)``, ``order`` = identity, ``refreshed = False``.
  * ``"eigh"``: ``Q, lam = eigh(L)`` descending, ``order`` = identity.
  * ``"qr"``: ``order`` = stable argsort of ``-diag(B)``; ``Q <- qr(L Q[:, order]).Q``;
    with one iteration ``lam = diag(B)[order]``; otherwise repeat ``B' = Q^T L Q``,
    ``lam = diag(B')`` and stop after ``max_qr_iterations`` QRs or when ``B'`` is nearly
    diagonal, else ``Q <- qr(L Q).Q``. With ``tol = 0`` and one iteration this is SOAP's refresh.

  DS's ``qr_algorithm`` differs (see ``DEVIATION_SOAP_SORTED_QR_REFRESH``): no sort before the
  first step, ascending sort of ``diag(Q^T L Q)`` of the final ``Q`` afterwards, and with
  ``tol = 0`` it also skips an exactly diagonal ``B``.
  """
  if method not in _METHODS:
    raise ValueError(f"unknown method {method!r}")
  if max_qr_iterations < 1:
    raise ValueError("max_qr_iterations must be >= 1")
  n = stat.shape[0]
  identity = np.arange(n)
  b = q.T @ stat @ q
  if tol > 0.0 and _offdiag_small(b, tol):
    return q, np.diag(b).copy(), identity, False
  if method == "eigh":
    lam, basis = eigh_descending(stat)
    return basis, lam, identity, True
  order = np.argsort(-np.diag(b), kind="stable")
  basis = np.linalg.qr(stat @ q[:, order])[0]
  if max_qr_iterations == 1:
    return basis, np.diag(b)[order].copy(), order, True
  i = 1
  while True:
    b_new = basis.T @ stat @ basis
    lam = np.diag(b_new).copy()
    if i >= max_qr_iterations or _offdiag_small(b_new, tol):
      break
    basis = np.linalg.qr(stat @ basis)[0]
    i += 1
  return basis, lam, order, True


def _permute(x: np.ndarray | None, orders: Sequence[np.ndarray | None], skip: int | None = None):
  """Permute ``x`` along every axis with an order (except ``skip`` and size-1 axes)."""
  if x is None:
    return None
  for axis, order in enumerate(orders):
    if order is None or axis == skip or x.shape[axis] == 1:
      continue
    x = np.take(x, order, axis=axis)
  return x


# -- shared machinery --------------------------------------------------------------------------


def _family_args(values: Mapping[str, object]) -> dict:
  """The arguments of ``_FamilyOracle`` picked by name out of a subclass's ``locals()``.

  Each subclass spells out its whole signature, with its own defaults (as the aliases do), and
  hands the shared part on with this.
  """
  names = inspect.signature(_FamilyOracle.__init__).parameters
  return {name: values[name] for name in names if name != "self"}


class _FamilyOracle:
  """Layout, blocking, statistics, first bases, schedule and refresh; subclasses add moments."""

  def __init__(
    self,
    *,
    lr,
    b2,
    shampoo_beta,
    weight_decay,
    precondition_frequency,
    max_precond_dim,
    merge_dims,
    precondition_1d,
    method,
    refresh_tolerance,
    max_qr_iterations,
    block_size=None,
    stagger=False,
    first_basis="eigh",
    weight_decay_mask=None,
    soap_weight_decay=True,
  ):
    if method not in _METHODS:
      raise ValueError(f"unknown method {method!r}")
    if first_basis not in _FIRST_BASES:
      raise ValueError(f"unknown first_basis {first_basis!r}")
    if block_size is not None and int(block_size) < 1:
      raise ValueError("block_size must be >= 1 or None")
    self.lr = lr
    self.b2 = float(b2)
    self.shampoo_beta = self.b2 if shampoo_beta is None else float(shampoo_beta)
    self.weight_decay = float(weight_decay)
    self.precondition_frequency = int(precondition_frequency)
    self.max_precond_dim = int(max_precond_dim)
    self.merge_dims = bool(merge_dims)
    self.precondition_1d = bool(precondition_1d)
    self.method = method
    self.refresh_tolerance = float(refresh_tolerance)
    self.max_qr_iterations = int(max_qr_iterations)
    self.block_size = None if block_size is None else int(block_size)
    self.stagger = bool(stagger)
    self.first_basis = first_basis
    self.weight_decay_mask = dict(weight_decay_mask) if weight_decay_mask is not None else None
    # Declared deviation (e): SOAP's decay after the step, p <- (1 - lr wd)(p - lr u). DS's
    # decoupled decay (``DistributedShampoo._apply_weight_decay``) adds wd * p to the search
    # direction before the lr multiply, p <- p - lr (u + wd p), on every step including its
    # first. ``soap_weight_decay=False`` gives DS's form (still skipped on the first call).
    self.soap_weight_decay = bool(soap_weight_decay)
    self.count = 0  # number of completed calls to ``step``
    self.state: dict[str, dict] = {}
    self.phases: dict[str, list[int | None]] = {}

  # hooks -----------------------------------------------------------------------------------

  def _init_moments(self, bs: dict, shape: tuple[int, ...]) -> None:
    raise NotImplementedError

  def _direction(self, bs: dict, g: np.ndarray, t: int) -> np.ndarray:
    """The update ``u`` of one block (block shape) at call ``t >= 1``; may update moments."""
    raise NotImplementedError

  def _move_moments(self, bs: dict, rotations: list, orders: list) -> None:
    """Carry eigenbasis moments over a refresh.

    ``rotations[k] = Q_new^T Q_old`` and ``orders[k]`` for every refreshed axis, ``None`` for
    the others. Default: nothing is held in the eigenbasis.
    """

  # layout ----------------------------------------------------------------------------------

  def _lr_at(self, count: int) -> float:
    return float(self.lr(count)) if callable(self.lr) else float(self.lr)

  def layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], list[bool]]:
    """Working shape of a parameter and its factored axes when unblocked."""
    return family_layout(shape, self.max_precond_dim, self.merge_dims, self.precondition_1d)

  def _blocks(self, name: str) -> list[tuple[dict, tuple[slice, ...]]]:
    """``(block state, index into the working shape)`` for every block of ``name``."""
    st = self.state[name]
    if "blocks" in st:
      return list(zip(st["blocks"], st["slices"], strict=True))
    return [(st, tuple(slice(None) for _ in st["work_shape"]))]

  def _plan_phases(self, params: Mapping[str, np.ndarray]) -> None:
    """Fix the refresh phase of every factor unit (all 0 without ``stagger``)."""
    units, costs = [], []
    for name in sorted(params):
      shape = np.shape(params[name])
      work_shape, _ = self.layout(shape)
      slices = block_slices(work_shape, self.block_size)
      factored_any = [False] * len(work_shape)
      for index in slices:
        block_shape = tuple(s.stop - s.start for s in index)
        flags = block_factored(block_shape, len(shape), self.max_precond_dim, self.precondition_1d)
        factored_any = [a or b for a, b in zip(factored_any, flags, strict=True)]
      self.phases[name] = [0 if f else None for f in factored_any]
      for axis, (size, f) in enumerate(zip(work_shape, factored_any, strict=True)):
        if f:
          length = size if self.block_size is None else min(size, self.block_size)
          units.append((name, axis))
          costs.append(float(len(slices)) * float(length) ** 3)
    if self.stagger:
      phases = assign_phases(costs, self.precondition_frequency)
      for (name, axis), phase in zip(units, phases, strict=True):
        self.phases[name][axis] = phase

  # projections -----------------------------------------------------------------------------

  def _rotate(self, name: str, x: np.ndarray, into: bool) -> np.ndarray:
    st = self.state[name]
    work = np.array(np.reshape(x, st["work_shape"]), dtype=np.float64)
    for bs, index in self._blocks(name):
      mats = [None if q is None else (q.T if into else q) for q in bs["Q"]]
      work[index] = mode_product(work[index], mats)
    return work.reshape(np.shape(x))

  def project(self, name: str, x: np.ndarray) -> np.ndarray:
    """Parameter basis -> eigenbasis (``×_k Q_k^T`` in every block); keeps ``x``'s shape."""
    return self._rotate(name, x, into=True)

  def project_back(self, name: str, x: np.ndarray) -> np.ndarray:
    """Eigenbasis -> parameter basis (``×_k Q_k`` in every block); keeps ``x``'s shape."""
    return self._rotate(name, x, into=False)

  # statistics and bases --------------------------------------------------------------------

  def _accumulate_stats(self, bs: dict, g: np.ndarray) -> None:
    # Declared deviation (c): no bias correction of the statistics (SOAP's convention). DS
    # divides L by 1 - beta^step before its amortized computation. That only rescales each
    # factor: eigenvectors and the tolerance test do not change, and for Shampoo with relative
    # damping the direction is rescaled by a constant that grafting removes (DS's form:
    # ``ShampooOracle(bias_correct_factors=True)``).
    beta = self.shampoo_beta
    for axis, stat in enumerate(bs["L"]):
      if stat is not None:
        bs["L"][axis] = beta * stat + (1.0 - beta) * axis_gram(g, axis)
    bs["stat_count"] += 1

  def _new_block(self, shape: tuple[int, ...], param_ndim: int) -> dict:
    factored = block_factored(shape, param_ndim, self.max_precond_dim, self.precondition_1d)
    bs = {
      "step": 0,
      "work_shape": shape,
      "factored": factored,
      "L": [np.zeros((n, n)) if f else None for n, f in zip(shape, factored, strict=True)],
      "Q": [None] * len(shape),
      "eig": [None] * len(shape),
      "order": [None] * len(shape),
      "refresh_count": [0 if f else None for f in factored],
      "eig_count": [None] * len(shape),
      "stat_count": 0,
    }
    self._init_moments(bs, shape)
    return bs

  def _first_bases(self, bs: dict) -> None:
    for axis, stat in enumerate(bs["L"]):
      if stat is None:
        continue
      if self.first_basis == "eigh":
        lam, basis = eigh_descending(stat)
        order = np.arange(stat.shape[0])
      else:  # eigh-free: the scheduled QR refresh, warm-started from the identity
        basis, lam, order, _ = refresh_factor(
          stat, np.eye(stat.shape[0]), "qr", self.refresh_tolerance, self.max_qr_iterations
        )
      bs["Q"][axis], bs["eig"][axis], bs["order"][axis] = basis, lam, order
      bs["eig_count"][axis] = bs["stat_count"]

  def _refresh(self, bs: dict, axes: Sequence[int]) -> None:
    """Refresh the factors in ``axes`` and carry the eigenbasis moments along them."""
    rotations: list[np.ndarray | None] = [None] * len(bs["Q"])
    orders: list[np.ndarray | None] = [None] * len(bs["Q"])
    for axis in axes:
      q_old = bs["Q"][axis]
      basis, lam, order, refreshed = refresh_factor(
        bs["L"][axis], q_old, self.method, self.refresh_tolerance, self.max_qr_iterations
      )
      bs["Q"][axis], bs["eig"][axis], bs["order"][axis] = basis, lam, order
      bs["eig_count"][axis] = bs["stat_count"]
      if refreshed:
        bs["refresh_count"][axis] += 1
        rotations[axis], orders[axis] = basis.T @ q_old, order
    if any(r is not None for r in rotations):
      self._move_moments(bs, rotations, orders)

  # per-parameter steps ---------------------------------------------------------------------

  def _init_param(self, name: str, g: np.ndarray) -> None:
    work_shape, _ = self.layout(g.shape)
    g_work = g.reshape(work_shape)
    if self.block_size is None:
      bs = self._new_block(work_shape, g.ndim)
      self.state[name] = bs
      blocks = [(bs, tuple(slice(None) for _ in work_shape))]
    else:
      slices = block_slices(work_shape, self.block_size)
      shapes = [tuple(s.stop - s.start for s in index) for index in slices]
      st = {
        "step": 0,
        "work_shape": work_shape,
        "slices": slices,
        "blocks": [self._new_block(shape, g.ndim) for shape in shapes],
      }
      self.state[name] = st
      blocks = list(zip(st["blocks"], slices, strict=True))
    for bs, index in blocks:
      self._accumulate_stats(bs, np.asarray(g_work[index]))
      self._first_bases(bs)

  def _decays(self, name: str) -> bool:
    if self.weight_decay <= 0.0:
      return False
    return True if self.weight_decay_mask is None else bool(self.weight_decay_mask.get(name, True))

  def _update_param(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
    st = self.state[name]
    st["step"] += 1
    t = st["step"]
    g_work = g.reshape(st["work_shape"])
    u = np.zeros(st["work_shape"])
    blocks = self._blocks(name)
    for bs, index in blocks:  # DEVIATION_BASIS_LAG: directions use the current bases
      bs["step"] = t
      u[index] = self._direction(bs, np.array(g_work[index]), t)
    u = u.reshape(p.shape)
    if not self._decays(name):
      p = p - lr * u
    elif self.soap_weight_decay:
      p = p - lr * u
      p = p - (lr * self.weight_decay) * p
    else:
      p = p - lr * (u + self.weight_decay * p)
    phases = self.phases.get(name) or [0] * len(st["work_shape"])
    for bs, index in blocks:
      self._accumulate_stats(bs, np.asarray(g_work[index]))
      due = [
        axis
        for axis, f in enumerate(bs["factored"])
        if f and t % self.precondition_frequency == phases[axis]
      ]
      if due:
        self._refresh(bs, due)
    return p

  # public ----------------------------------------------------------------------------------

  def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]):
    """One optimizer call. Returns new params (float64); inputs are not modified."""
    lr = self._lr_at(self.count)
    if self.count == 0:
      self._plan_phases(params)
    out = {}
    for name, p in params.items():
      p = np.array(p, dtype=np.float64)
      g = np.array(grads[name], dtype=np.float64)
      if name not in self.state:  # DEVIATION_FIRST_CALL_ONLY_INITIALISES
        self._init_param(name, g)
        out[name] = p
        continue
      out[name] = self._update_param(name, p, g, lr)
    self.count += 1
    return out


# -- Shampoo -----------------------------------------------------------------------------------


class ShampooOracle(_FamilyOracle):
  """Shampoo with DS's gradient filtering and grafting, per block, at call ``t >= 1``.

  * Gradient filtering (DS ``betas[0]``, ``DistributedShampoo._compute_filtered_grad_list``):
    ``M <- b1 M + (1 - b1) G`` (state ``mu``, parameter basis), ``M_hat = M / (1 - b1^t)``. The
    preconditioners and the grafting method both act on ``M_hat``; nothing comes after grafting.
  * ``P = M_hat ×_k [Q_k diag((max(lam_k, 0) + eps_k)^(-exponent)) Q_k^T]`` over the factored
    axes; ``eps_k = eps * max(max(lam_k, 0))`` with ``relative_eps`` (declared deviation (d)),
    else ``eps`` (DS's absolute form). DS adds eps to the eigenvalues of the factor as well
    (``matrix_functions.matrix_inverse_root_from_eigendecomposition``), but shifts all of them
    by ``-lambda_min`` when one is negative instead of clipping each at 0.
  * ``trace_scaling`` (the SOAP paper, not DS): ``P <- P * tr^(exponent * (K - 1))``, ``K`` the
    number of factored axes of the block, ``tr = sum(max(lam_k0, 0))`` of the first factored
    axis. (DS's ``use_trace_scaling`` instead multiplies each factor by ``tr(L_k)^(-1/2)``
    before its inverse root.)
  * Grafting (DS ``AdagradPreconditionerList``): the second moment takes the raw gradient,
    ``nu <- b2 nu + (1 - b2) G^2``; the grafted direction is
    ``A = M_hat / (sqrt(nu / (1 - b2^t)) + graft_eps)`` for ``"adam"``, without the division
    for ``"rmsprop"`` (eps outside the root, after the bias correction, as in DS), ``A = M_hat``
    for ``"sgd"``. Step: ``D = P ||A||_F / ||P||_F`` per block (``D = 0`` if ``P = 0``; DS divides
    by ``||P|| + 1e-16``); ``"none"``: ``D = P``. A block without a factored axis takes
    ``D = A`` (``A = M_hat`` for ``"none"`` and ``"sgd"``).
  * ``bias_correct_factors`` (DS's form, off by default): the eigenvalue estimates are divided by
    ``1 - beta^n``, ``n`` = number of gradients in ``L`` when they were computed. Bases do not
    depend on it.
  """

  def __init__(
    self,
    lr: float | Callable[[int], float],
    b1: float = 0.9,
    b2: float = 0.999,
    shampoo_beta: float | None = None,
    eps: float = 1e-6,
    relative_eps: bool = True,
    exponent: float = 0.5,
    trace_scaling: bool = False,
    grafting: str = "adam",
    graft_eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    method: str = "eigh",
    refresh_tolerance: float = 0.0,
    max_qr_iterations: int = 1,
    block_size: int | None = None,
    stagger: bool = False,
    first_basis: str = "eigh",
    weight_decay_mask: Mapping[str, bool] | None = None,
    soap_weight_decay: bool = True,
    bias_correct_factors: bool = False,
  ):
    super().__init__(**_family_args(locals()))
    if grafting not in _GRAFTINGS:
      raise ValueError(f"unknown grafting {grafting!r}")
    self.b1 = float(b1)
    self.eps = float(eps)
    # Declared deviation (d): damping relative to the largest eigenvalue of each factor.
    self.relative_eps = bool(relative_eps)
    self.exponent = float(exponent)
    self.trace_scaling = bool(trace_scaling)
    self.grafting = grafting
    self.graft_eps = float(graft_eps)
    self.bias_correct_factors = bool(bias_correct_factors)

  def _init_moments(self, bs: dict, shape: tuple[int, ...]) -> None:
    bs["mu"] = np.zeros(shape)  # DS's filtered gradient (not bias-corrected)
    bs["nu"] = np.zeros(shape) if self.grafting in ("rmsprop", "adam") else None

  def _eigenvalues(self, bs: dict, axis: int) -> np.ndarray:
    lam = bs["eig"][axis]
    if self.bias_correct_factors:
      lam = lam / (1.0 - self.shampoo_beta ** bs["eig_count"][axis])
    return lam

  def preconditioned(self, bs: dict, x: np.ndarray) -> np.ndarray:
    """``P`` (before grafting) for a block-shaped ``x``, with the block's current bases."""
    mats = []
    for axis, q in enumerate(bs["Q"]):
      if q is None:
        mats.append(None)
        continue
      lam = np.maximum(self._eigenvalues(bs, axis), 0.0)
      eps = self.eps * lam.max() if self.relative_eps else self.eps
      mats.append((q * (lam + eps) ** (-self.exponent)) @ q.T)
    p = mode_product(x, mats)
    factored = [k for k, q in enumerate(bs["Q"]) if q is not None]
    if self.trace_scaling and factored:
      total = float(np.sum(np.maximum(self._eigenvalues(bs, factored[0]), 0.0)))
      p = p * total ** (self.exponent * (len(factored) - 1))
    return p

  def _direction(self, bs: dict, g: np.ndarray, t: int) -> np.ndarray:
    bs["mu"] = self.b1 * bs["mu"] + (1.0 - self.b1) * g
    m_hat = bs["mu"] / (1.0 - self.b1**t)
    if self.grafting in ("rmsprop", "adam"):
      bs["nu"] = self.b2 * bs["nu"] + (1.0 - self.b2) * np.square(g)
      nu = bs["nu"] / (1.0 - self.b2**t) if self.grafting == "adam" else bs["nu"]
      graft = m_hat / (np.sqrt(nu) + self.graft_eps)
    else:
      graft = m_hat
    if not any(q is not None for q in bs["Q"]):
      return graft
    p = self.preconditioned(bs, m_hat)
    if self.grafting == "none":
      return p
    p_norm = np.linalg.norm(p)
    if p_norm == 0.0:
      return np.zeros_like(p)
    return p * (np.linalg.norm(graft) / p_norm)


# -- Adafactor in the eigenbasis ---------------------------------------------------------------


def adafactor_axes(work_shape: Sequence[int]) -> tuple[int, int] | None:
  """``(a, b)``: the two largest axes (last two of a stable ascending argsort), or ``None``."""
  if len(work_shape) < 2:
    return None
  ranked = np.argsort(np.asarray(work_shape), kind="stable")
  return int(ranked[-2]), int(ranked[-1])


def _adafactor_second_moment(st: dict, g2: np.ndarray, b2: float, eps2: float) -> np.ndarray:
  """Update ``r, c`` (or the full ``V``) with ``g2 = G'^2``; return the full ``V`` estimate."""
  axes = adafactor_axes(g2.shape)
  if axes is None:
    st["V"] = b2 * st["V"] + (1.0 - b2) * (g2 + eps2)
    return st["V"]
  a, b = axes
  st["r"] = b2 * st["r"] + (1.0 - b2) * np.sum(g2 + eps2, axis=b, keepdims=True)
  st["c"] = b2 * st["c"] + (1.0 - b2) * np.sum(g2 + eps2, axis=a, keepdims=True)
  return st["r"] * st["c"] / np.sum(st["r"], axis=a, keepdims=True)


def _adafactor_init(work_shape: tuple[int, ...]) -> dict:
  axes = adafactor_axes(work_shape)
  st = {"m": np.zeros(work_shape), "r": None, "c": None, "V": None}
  if axes is None:
    st["V"] = np.zeros(work_shape)
  else:
    a, b = axes
    st["r"] = np.zeros(tuple(1 if k == b else n for k, n in enumerate(work_shape)))
    st["c"] = np.zeros(tuple(1 if k == a else n for k, n in enumerate(work_shape)))
  return st


def adafactor_reference_step(
  state: dict | None,
  p: np.ndarray,
  g: np.ndarray,
  lr: float,
  b1: float = 0.95,
  b2: float = 0.95,
  eps: float = 1e-8,
  eps2: float = 1e-30,
  weight_decay: float = 0.01,
  correct_bias: bool = True,
) -> tuple[dict, np.ndarray]:
  """Plain Adafactor (no rotation) with the family conventions, on one parameter.

  ``state=None`` is the first call: it initialises and returns ``p`` unchanged. Afterwards
  ``m <- b1 m + (1 - b1) G``; second moment factored over the two largest axes as in
  :class:`EigenAdafactorOracle` (full for < 2 axes);
  ``p <- p - lr s_t m / (sqrt(V) + eps)``, ``s_t = sqrt(1 - b2^t) / (1 - b1^t)``; then
  ``p <- p - lr wd p``. Returns ``(state, new_p)``.
  """
  p = np.array(p, dtype=np.float64)
  g = np.array(g, dtype=np.float64)
  if state is None:
    state = _adafactor_init(g.shape)
    state["step"] = 0
    return state, p
  state["step"] += 1
  t = state["step"]
  state["m"] = b1 * state["m"] + (1.0 - b1) * g
  v = _adafactor_second_moment(state, np.square(g), b2, eps2)
  scale = np.sqrt(1.0 - b2**t) / (1.0 - b1**t) if correct_bias else 1.0
  p = p - lr * scale * state["m"] / (np.sqrt(v) + eps)
  if weight_decay > 0.0:
    p = p - lr * weight_decay * p
  return state, p


class EigenAdafactorOracle(_FamilyOracle):
  """The SOAP paper's "Adafactor in the eigenbasis", in the family conventions, per block.

  Call ``t >= 1``: ``G' = G ×_k Q_k^T``; ``m <- b1 m + (1 - b1) G'``. Blocks with >= 2 axes:
  ``(a, b)`` = :func:`adafactor_axes`; ``r <- b2 r + (1 - b2) sum_b(G'^2 + eps2)``,
  ``c <- b2 c + (1 - b2) sum_a(G'^2 + eps2)`` (keepdims), ``V = r c / sum_a(r)``; otherwise
  ``V <- b2 V + (1 - b2)(G'^2 + eps2)``. ``u = s_t (m / (sqrt(V) + eps)) ×_k Q_k`` with
  ``s_t = sqrt(1 - b2^t) / (1 - b1^t)`` (1 without ``correct_bias``).

  Refresh: ``m`` is rotated exactly along the refreshed axes; ``r``, ``c`` and ``V`` are
  permuted along every refreshed axis with that axis's order (``r`` not along ``b``, ``c`` not
  along ``a``). The refresh knobs default to SOAP's (``"qr"``, tolerance 0, one iteration).
  """

  def __init__(
    self,
    lr: float | Callable[[int], float] = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    eps2: float = 1e-30,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    correct_bias: bool = True,
    method: str = "qr",
    refresh_tolerance: float = 0.0,
    max_qr_iterations: int = 1,
    block_size: int | None = None,
    stagger: bool = False,
    first_basis: str = "eigh",
    weight_decay_mask: Mapping[str, bool] | None = None,
    soap_weight_decay: bool = True,
  ):
    super().__init__(**_family_args(locals()))
    self.b1 = float(b1)
    self.eps = float(eps)
    self.eps2 = float(eps2)
    self.correct_bias = bool(correct_bias)

  def _init_moments(self, bs: dict, shape: tuple[int, ...]) -> None:
    bs.update(_adafactor_init(shape))

  def _direction(self, bs: dict, g: np.ndarray, t: int) -> np.ndarray:
    g_rot = mode_product(g, [None if q is None else q.T for q in bs["Q"]])
    bs["m"] = self.b1 * bs["m"] + (1.0 - self.b1) * g_rot
    v = _adafactor_second_moment(bs, np.square(g_rot), self.b2, self.eps2)
    scale = np.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t) if self.correct_bias else 1.0
    return scale * mode_product(bs["m"] / (np.sqrt(v) + self.eps), bs["Q"])

  def _move_moments(self, bs: dict, rotations: list, orders: list) -> None:
    bs["m"] = mode_product(bs["m"], rotations)
    bs["V"] = _permute(bs["V"], orders)
    axes = adafactor_axes(bs["work_shape"])
    if axes is not None:
      bs["r"] = _permute(bs["r"], orders, skip=axes[1])
      bs["c"] = _permute(bs["c"], orders, skip=axes[0])


# -- EShampoo (eigenvalue-corrected Shampoo) ---------------------------------------------------


class EShampooOracle(_FamilyOracle):
  """Eigenvalue-corrected Shampoo (DS ``EigenvalueCorrectedShampooPreconditionerList``), per block.

  Call ``t >= 1``: ``M <- b1 M + (1 - b1) G`` (parameter basis, DS's filtered gradient);
  ``D <- b2 D + (1 - b2) (G ×_k Q_k^T)^2`` (eigenbasis, the raw gradient);
  ``u = [((M / (1 - b1^t)) ×_k Q_k^T) / (sqrt(D / (1 - b2^t)) + eps)] ×_k Q_k``: eps after the
  bias correction and the root, as DS's ``_compute_preconditioned_gradient``.

  Refresh: ``D`` is permuted with each refreshed axis's order (``DEVIATION_SOAP_SORTED_QR_REFRESH``;
  DS leaves ``D`` untouched when the basis changes); ``M`` needs nothing. With the basis lag
  (``DEVIATION_BASIS_LAG``) ``D`` takes this call's gradient in the old basis; DS refreshes first
  and adds the gradient in the new basis.
  """

  def __init__(
    self,
    lr: float | Callable[[int], float] = 3e-3,
    b1: float = 0.9,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    refresh_tolerance: float = 0.01,
    max_qr_iterations: int = 3,
    method: str = "qr",
    block_size: int | None = None,
    stagger: bool = False,
    first_basis: str = "eigh",
    weight_decay_mask: Mapping[str, bool] | None = None,
    soap_weight_decay: bool = True,
  ):
    super().__init__(**_family_args(locals()))
    self.b1 = float(b1)
    self.eps = float(eps)

  def _init_moments(self, bs: dict, shape: tuple[int, ...]) -> None:
    bs["M"] = np.zeros(shape)
    bs["D"] = np.zeros(shape)

  def _direction(self, bs: dict, g: np.ndarray, t: int) -> np.ndarray:
    into = [None if q is None else q.T for q in bs["Q"]]
    bs["M"] = self.b1 * bs["M"] + (1.0 - self.b1) * g
    bs["D"] = self.b2 * bs["D"] + (1.0 - self.b2) * np.square(mode_product(g, into))
    m_rot = mode_product(bs["M"] / (1.0 - self.b1**t), into)
    denom = np.sqrt(bs["D"] / (1.0 - self.b2**t)) + self.eps
    return mode_product(m_rot / denom, bs["Q"])

  def _move_moments(self, bs: dict, rotations: list, orders: list) -> None:
    bs["D"] = _permute(bs["D"], orders)


# -- the SOAP paper's idealized claim ----------------------------------------------------------


def _sym_power(a: np.ndarray, power: float) -> np.ndarray:
  vals, vecs = np.linalg.eigh(a)
  return (vecs * vals**power) @ vecs.T


def idealized_claim(
  grads_dataset: Sequence[np.ndarray], g: np.ndarray | None = None
) -> dict[str, np.ndarray]:
  """Idealized Shampoo vs idealized Adafactor in Shampoo's eigenbasis (SOAP paper's claim).

  From gradient matrices ``G_i`` (all ``(m, n)``): ``L = mean(G G^T)``, ``R = mean(G^T G)``,
  their eigenbases ``Q_L, Q_R`` (descending). For ``g`` (default: the first gradient):

  * ``shampoo = tr(L)^(1/2) L^(-1/2) g R^(-1/2)`` (Shampoo-1/2 with trace scaling, eps = 0);
  * ``adafactor = Q_L (g' / sqrt(A_i C_j / sum(A))) Q_R^T`` with ``g' = Q_L^T g Q_R``,
    ``A = E[row sums of G'^2]``, ``C = E[column sums of G'^2]`` computed from the dataset
    (they equal ``diag(Q_L^T L Q_L)`` and ``diag(Q_R^T R Q_R)``).

  The claim is ``shampoo == adafactor``. ``L`` and ``R`` must be nonsingular. Returns a dict
  with ``L, R, Q_L, Q_R, lam_L, lam_R, A, C, shampoo, adafactor``.
  """
  gs = [np.asarray(x, dtype=np.float64) for x in grads_dataset]
  g = gs[0] if g is None else np.asarray(g, dtype=np.float64)
  big_l = np.mean([x @ x.T for x in gs], axis=0)
  big_r = np.mean([x.T @ x for x in gs], axis=0)
  lam_l, q_l = eigh_descending(big_l)
  lam_r, q_r = eigh_descending(big_r)
  rotated = [q_l.T @ x @ q_r for x in gs]
  row = np.mean([np.sum(x**2, axis=1) for x in rotated], axis=0)
  col = np.mean([np.sum(x**2, axis=0) for x in rotated], axis=0)
  shampoo = np.sqrt(np.trace(big_l)) * _sym_power(big_l, -0.5) @ g @ _sym_power(big_r, -0.5)
  g_rot = q_l.T @ g @ q_r
  adafactor = q_l @ (g_rot / np.sqrt(np.outer(row, col) / np.sum(row))) @ q_r.T
  return {
    "L": big_l,
    "R": big_r,
    "Q_L": q_l,
    "Q_R": q_r,
    "lam_L": lam_l,
    "lam_R": lam_r,
    "A": row,
    "C": col,
    "shampoo": shampoo,
    "adafactor": adafactor,
  }
