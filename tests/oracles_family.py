"""Float64 NumPy oracles for the Kronecker-factored family: Shampoo, eigen-Adafactor, EShampoo.

Written from the library's documented "family conventions", independently of ``soap_optax``.
Every class has the interface of :class:`oracles.SoapOracle`: constructor keyword arguments,
``step(params, grads) -> new params`` (float64, original shapes; inputs are not modified),
``self.count`` (number of completed calls) and ``self.state[name]``.

Family conventions (shared by all oracles here):

* Layout as SOAP (``max_precond_dim``, ``merge_dims``, ``precondition_1d``) via
  :func:`family_layout`, except that a 0-D parameter is never factored (its working shape is
  ``()``). All state arrays live in the working (merged) shape.
* Statistics ``L_k <- beta L_k + (1 - beta) G_(k) G_(k)^T`` (from 0, no bias correction) with the
  current gradient on every call, including the first; ``beta = shampoo_beta or b2``.
* First call: statistics, then ``Q_k, lam_k = eigh(L_k)`` in descending order; params are
  returned unchanged, no moment is touched, no weight decay.
* Call ``t >= 1`` (``t`` = number of earlier calls): the update uses the current ``Q_k, lam_k``;
  ``p <- p - lr_t u``, then ``p <- p - lr_t wd p`` (if ``wd > 0``); the statistics get this
  call's gradient; if ``t % precondition_frequency == 0`` every factor is refreshed with
  :func:`refresh_factor` and the eigenbasis moments follow (first-moment-like arrays are
  rotated exactly by ``Q_new^T Q_old``; diagonal arrays are permuted with the refresh's order).

Per-parameter state (``oracle.state[name]``), common keys:

* ``step``: number of real updates so far (``t`` of the last call; 0 after the first call).
* ``work_shape``: the working shape; ``factored``: per working axis, whether it has a factor.
* ``L``, ``Q``, ``eig``: lists with one entry per working axis (``None`` where not factored):
  the statistic, the orthonormal basis (columns) and the eigenvalue estimates.
* ``order``: per axis, the permutation used by the last refresh (``None`` if not factored).
* ``refresh_count``: per axis, number of refreshes that were not skipped by the tolerance test
  (the first-call ``eigh`` is not counted).

Besides those, ``ShampooOracle`` keeps ``mu`` (momentum) and ``nu`` (grafting second moment, or
``None``), both in the parameter basis; ``EigenAdafactorOracle`` keeps ``m`` (eigenbasis),
``r``, ``c`` (factored second moment, ``keepdims`` shapes, or ``None``) and ``V`` (full second
moment for working shapes with fewer than 2 axes, or ``None``); ``EShampooOracle`` keeps ``M``
(parameter basis) and ``D`` (eigenbasis).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

try:  # works whether or not tests/ is a package
  from tests.oracles import factor_layout
except ModuleNotFoundError:
  from oracles import factor_layout

_METHODS = ("qr", "eigh")
_GRAFTINGS = ("none", "sgd", "rmsprop", "adam")


# -- helpers -----------------------------------------------------------------------------------


def family_layout(
  shape: Sequence[int], max_precond_dim: int, merge: bool, precondition_1d: bool
) -> tuple[tuple[int, ...], list[bool]]:
  """SOAP's :func:`oracles.factor_layout`, except that 0-D is never factored (shape ``()``)."""
  shape = tuple(int(s) for s in shape)
  if not shape:
    return (), []
  return factor_layout(shape, max_precond_dim, merge, precondition_1d)


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
  """``||B - diag(B)||_F <= tol ||B||_F``."""
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


class _FamilyOracle:
  """Layout, statistics, first-call ``eigh``, schedule and refresh; subclasses add moments."""

  def __init__(
    self,
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
  ):
    if method not in _METHODS:
      raise ValueError(f"unknown method {method!r}")
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
    self.count = 0  # number of completed calls to ``step``
    self.state: dict[str, dict] = {}

  # hooks -----------------------------------------------------------------------------------

  def _init_moments(self, st: dict, work_shape: tuple[int, ...]) -> None:
    raise NotImplementedError

  def _direction(self, st: dict, g: np.ndarray, t: int) -> np.ndarray:
    """The update ``u`` (working shape) of call ``t >= 1``; may update moments."""
    raise NotImplementedError

  def _move_moments(self, st: dict, q_old: list, q_new: list, orders: list) -> None:
    """Carry eigenbasis moments over a refresh (default: nothing in the eigenbasis)."""

  # helpers ---------------------------------------------------------------------------------

  def _lr_at(self, count: int) -> float:
    return float(self.lr(count)) if callable(self.lr) else float(self.lr)

  def layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], list[bool]]:
    return family_layout(shape, self.max_precond_dim, self.merge_dims, self.precondition_1d)

  def project(self, name: str, x: np.ndarray) -> np.ndarray:
    """Parameter basis -> eigenbasis (``×_k Q_k^T``); keeps ``x``'s shape."""
    st = self.state[name]
    mats = [None if q is None else q.T for q in st["Q"]]
    return mode_product(np.reshape(x, st["work_shape"]), mats).reshape(np.shape(x))

  def project_back(self, name: str, x: np.ndarray) -> np.ndarray:
    """Eigenbasis -> parameter basis (``×_k Q_k``); keeps ``x``'s shape."""
    st = self.state[name]
    return mode_product(np.reshape(x, st["work_shape"]), st["Q"]).reshape(np.shape(x))

  def _accumulate_stats(self, st: dict, g: np.ndarray) -> None:
    beta = self.shampoo_beta
    for axis, stat in enumerate(st["L"]):
      if stat is not None:
        st["L"][axis] = beta * stat + (1.0 - beta) * axis_gram(g, axis)

  def _init_state(self, name: str, g: np.ndarray) -> None:
    work_shape, factored = self.layout(g.shape)
    st = {
      "step": 0,
      "work_shape": work_shape,
      "factored": factored,
      "L": [np.zeros((n, n)) if f else None for n, f in zip(work_shape, factored, strict=True)],
      "Q": [None] * len(work_shape),
      "eig": [None] * len(work_shape),
      "order": [None] * len(work_shape),
      "refresh_count": [0 if f else None for f in factored],
    }
    self.state[name] = st
    self._accumulate_stats(st, g.reshape(work_shape))
    for axis, stat in enumerate(st["L"]):
      if stat is not None:
        st["eig"][axis], st["Q"][axis] = eigh_descending(stat)
        st["order"][axis] = np.arange(stat.shape[0])
    self._init_moments(st, work_shape)

  def _refresh(self, st: dict) -> None:
    q_old = list(st["Q"])
    orders: list[np.ndarray | None] = [None] * len(q_old)
    for axis, (stat, q) in enumerate(zip(st["L"], q_old, strict=True)):
      if stat is None:
        continue
      basis, lam, order, refreshed = refresh_factor(
        stat, q, self.method, self.refresh_tolerance, self.max_qr_iterations
      )
      st["Q"][axis], st["eig"][axis], st["order"][axis] = basis, lam, order
      orders[axis] = order
      st["refresh_count"][axis] += int(refreshed)
    self._move_moments(st, q_old, list(st["Q"]), orders)

  def _update_param(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
    st = self.state[name]
    st["step"] += 1
    t = st["step"]
    g_work = g.reshape(st["work_shape"])
    u = self._direction(st, g_work, t)
    p = p - lr * u.reshape(p.shape)
    if self.weight_decay > 0.0:
      p = p - (lr * self.weight_decay) * p
    self._accumulate_stats(st, g_work)
    if t % self.precondition_frequency == 0:
      self._refresh(st)
    return p

  # public ----------------------------------------------------------------------------------

  def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]):
    """One optimizer call. Returns new params (float64); inputs are not modified."""
    lr = self._lr_at(self.count)
    out = {}
    for name, p in params.items():
      p = np.array(p, dtype=np.float64)
      g = np.array(grads[name], dtype=np.float64)
      if name not in self.state:
        self._init_state(name, g)
        out[name] = p
        continue
      out[name] = self._update_param(name, p, g, lr)
    self.count += 1
    return out


def _rotation_mats(q_old: list, q_new: list) -> list:
  """``Q_new^T Q_old`` per axis (``None`` where not factored)."""
  return [None if a is None else b.T @ a for a, b in zip(q_old, q_new, strict=True)]


# -- Shampoo -----------------------------------------------------------------------------------


class ShampooOracle(_FamilyOracle):
  """Shampoo with grafting and momentum, in the family conventions.

  Call ``t >= 1``:

  * ``P = G ×_k [Q_k diag((max(lam_k, 0) + eps_k)^(-exponent)) Q_k^T]`` over factored axes,
    ``eps_k = eps * max(lam_k)`` with ``relative_eps`` (the default), else ``eps``.
  * ``trace_scaling``: ``P <- P * max(sum(lam_k0), 0)^(exponent * (K_f - 1))`` with ``k0`` the
    first factored axis and ``K_f`` the number of factored axes (raw, unclipped estimates).
  * Grafting: ``'none'`` ``D = P``; ``'sgd'`` ``D = P ||G|| / ||P||``; ``'rmsprop'``
    ``nu <- b2 nu + (1 - b2) G^2``, ``A = G / (sqrt(nu) + graft_eps)``, ``D = P ||A|| / ||P||``;
    ``'adam'`` the same with ``nu / (1 - b2^t)`` under the root. ``||P|| = 0`` gives ``D = 0``.
    No factored axis: ``D = A`` (``A = G`` for ``'none'`` and ``'sgd'``).
  * ``mu <- b1 mu + (1 - b1) D``; ``u = mu / (1 - b1^(t+1))``: the library's momentum is
    ``optax.ema(b1, debias=True)``, whose count also ticks on the initialising first call.
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
  ):
    super().__init__(
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
    )
    if grafting not in _GRAFTINGS:
      raise ValueError(f"unknown grafting {grafting!r}")
    self.b1 = float(b1)
    self.eps = float(eps)
    self.relative_eps = bool(relative_eps)
    self.exponent = float(exponent)
    self.trace_scaling = bool(trace_scaling)
    self.grafting = grafting
    self.graft_eps = float(graft_eps)

  def _init_moments(self, st: dict, work_shape: tuple[int, ...]) -> None:
    st["mu"] = np.zeros(work_shape)
    st["nu"] = np.zeros(work_shape) if self.grafting in ("rmsprop", "adam") else None

  def preconditioned(self, st: dict, g: np.ndarray) -> np.ndarray:
    """``P`` (before grafting) for a working-shape gradient, with the current bases."""
    mats = []
    for q, lam in zip(st["Q"], st["eig"], strict=True):
      if q is None:
        mats.append(None)
        continue
      lam = np.maximum(lam, 0.0)
      eps = self.eps * lam.max() if self.relative_eps else self.eps  # damping relative to λ_max
      scale = (lam + eps) ** (-self.exponent)
      mats.append((q * scale) @ q.T)
    p = mode_product(g, mats)
    factored = [k for k, q in enumerate(st["Q"]) if q is not None]
    if self.trace_scaling and factored:
      total = max(float(np.sum(st["eig"][factored[0]])), 0.0)
      p = p * total ** (self.exponent * (len(factored) - 1))
    return p

  def _direction(self, st: dict, g: np.ndarray, t: int) -> np.ndarray:
    if self.grafting in ("rmsprop", "adam"):
      st["nu"] = self.b2 * st["nu"] + (1.0 - self.b2) * np.square(g)
      nu = st["nu"] / (1.0 - self.b2**t) if self.grafting == "adam" else st["nu"]
      graft = g / (np.sqrt(nu) + self.graft_eps)
    else:
      graft = g
    if not any(q is not None for q in st["Q"]):
      d = graft
    else:
      p = self.preconditioned(st, g)
      if self.grafting == "none":
        d = p
      else:
        p_norm = np.linalg.norm(p)
        d = np.zeros_like(p) if p_norm == 0.0 else p * (np.linalg.norm(graft) / p_norm)
    st["mu"] = self.b1 * st["mu"] + (1.0 - self.b1) * d
    return st["mu"] / (1.0 - self.b1 ** (t + 1))


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
  """The SOAP paper's "Adafactor in the eigenbasis", in the family conventions.

  Call ``t >= 1``: ``G' = G ×_k Q_k^T``; ``m <- b1 m + (1 - b1) G'``. Working shapes with >= 2
  axes: ``(a, b)`` = :func:`adafactor_axes`; ``r <- b2 r + (1 - b2) sum_b(G'^2 + eps2)``,
  ``c <- b2 c + (1 - b2) sum_a(G'^2 + eps2)`` (keepdims), ``V = r c / sum_a(r)``; otherwise
  ``V <- b2 V + (1 - b2)(G'^2 + eps2)``. ``u = s_t (m / (sqrt(V) + eps)) ×_k Q_k`` with
  ``s_t = sqrt(1 - b2^t) / (1 - b1^t)`` (1 without ``correct_bias``).

  Refresh: ``m`` is rotated exactly; ``r``, ``c`` and ``V`` are permuted along every factored
  axis with that axis's order (``r`` not along ``b``, ``c`` not along ``a``). The refresh knobs
  default to SOAP's (``"qr"``, tolerance 0, one iteration); they are extras of this oracle.
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
  ):
    super().__init__(
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
    )
    self.b1 = float(b1)
    self.eps = float(eps)
    self.eps2 = float(eps2)
    self.correct_bias = bool(correct_bias)

  def _init_moments(self, st: dict, work_shape: tuple[int, ...]) -> None:
    st.update(_adafactor_init(work_shape))

  def _direction(self, st: dict, g: np.ndarray, t: int) -> np.ndarray:
    g_rot = mode_product(g, [None if q is None else q.T for q in st["Q"]])
    st["m"] = self.b1 * st["m"] + (1.0 - self.b1) * g_rot
    v = _adafactor_second_moment(st, np.square(g_rot), self.b2, self.eps2)
    scale = np.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t) if self.correct_bias else 1.0
    return scale * mode_product(st["m"] / (np.sqrt(v) + self.eps), st["Q"])

  def _move_moments(self, st: dict, q_old: list, q_new: list, orders: list) -> None:
    st["m"] = mode_product(st["m"], _rotation_mats(q_old, q_new))
    st["V"] = _permute(st["V"], orders)
    axes = adafactor_axes(st["work_shape"])
    if axes is not None:
      st["r"] = _permute(st["r"], orders, skip=axes[1])
      st["c"] = _permute(st["c"], orders, skip=axes[0])


# -- EShampoo (eigenvalue-corrected Shampoo) ---------------------------------------------------


class EShampooOracle(_FamilyOracle):
  """Eigenvalue-corrected Shampoo in the family conventions.

  Call ``t >= 1``: ``M <- b1 M + (1 - b1) G`` (parameter basis);
  ``D <- b2 D + (1 - b2) (G ×_k Q_k^T)^2`` (eigenbasis);
  ``u = ((M / (1 - b1^t)) ×_k Q_k^T / (sqrt(D / (1 - b2^t)) + eps)) ×_k Q_k``.
  Refresh: ``D`` is permuted with each factored axis's order; ``M`` needs nothing.
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
  ):
    super().__init__(
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
    )
    self.b1 = float(b1)
    self.eps = float(eps)

  def _init_moments(self, st: dict, work_shape: tuple[int, ...]) -> None:
    st["M"] = np.zeros(work_shape)
    st["D"] = np.zeros(work_shape)

  def _direction(self, st: dict, g: np.ndarray, t: int) -> np.ndarray:
    into = [None if q is None else q.T for q in st["Q"]]
    st["M"] = self.b1 * st["M"] + (1.0 - self.b1) * g
    st["D"] = self.b2 * st["D"] + (1.0 - self.b2) * np.square(mode_product(g, into))
    m_rot = mode_product(st["M"] / (1.0 - self.b1**t), into)
    denom = np.sqrt(st["D"] / (1.0 - self.b2**t)) + self.eps
    return mode_product(m_rot / denom, st["Q"])

  def _move_moments(self, st: dict, q_old: list, q_new: list, orders: list) -> None:
    st["D"] = _permute(st["D"], orders)


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
