"""Float64 NumPy oracles for SOAP, written from the authors' PyTorch reference.

The reference is ``soap.py`` in github.com/nikhilvyas/SOAP at commit a1e5535. This module
re-implements its per-parameter update in plain NumPy (float64) so that the JAX library can be
checked against it. Only the default ``data_format="channels_first"`` is modelled.

Per-parameter state (``oracle.state[name]``):

* ``step``: number of real updates done so far (0 after the initialisation call).
* ``m``, ``v``: first and second Adam moments, parameter-shaped, expressed in the eigenbasis
  (every axis that has a basis is rotated by it).
* ``GG``: list with one entry per (merged) axis: the factor statistic ``G_(k) G_(k)^T`` (an EMA),
  or ``None`` for an axis without a factor.
* ``Q``: list of the same length: the orthonormal basis of each factor, or ``None``.

Choice documented here: like the reference, the first moment is projected back to parameter
space with the old bases and forward with the (possibly new) bases at *every* preconditioner
update, not only at a refresh. With unchanged bases this is the identity up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

# The reference adds this multiple of the identity before its (single) eigendecomposition.
_EIGH_JITTER = 1e-30
# The reference adds this to the RMS when ``normalize_grads`` is on.
_NORMALIZE_EPS = 1e-30


def merge_dims(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
  """The reference's greedy dimension merging, applied to a shape.

  Walk the axes left to right, multiplying them into a running block while the product stays
  ``<= max_precond_dim``. When the next axis would overflow the block, the block is emitted
  (if it is larger than 1) and the axis starts a new block; if the block is still 1 the axis
  itself is emitted and the block restarts at 1. At the end the block is emitted only if it is
  larger than 1 or nothing was emitted. Consequences: size-1 axes vanish into neighbours (or
  are dropped after an emitted axis), ``()`` becomes ``(1,)``, and merged axes may exceed the
  limit only when a single original axis does.
  """
  merged: list[int] = []
  block = 1
  for size in shape:
    size = int(size)
    if block * size <= max_precond_dim:
      block *= size
    elif block > 1:
      merged.append(block)
      block = size
    else:
      merged.append(size)
      block = 1
  if block > 1 or not merged:
    merged.append(block)
  return tuple(merged)


def factor_layout(
  shape: Sequence[int], max_precond_dim: int, merge: bool, precondition_1d: bool
) -> tuple[tuple[int, ...], list[bool]]:
  """Working shape and which of its axes get a Kronecker factor, as in the reference.

  1-D parameters are never merged and get a factor only with ``precondition_1d`` and
  length ``<= max_precond_dim``. Everything else (0-D included) is merged first when
  ``merge`` is set; then each working axis of length ``<= max_precond_dim`` gets a factor.
  Note the quirk: with ``merge=True`` a 0-D parameter is viewed as ``(1,)`` and gets a 1x1
  factor (numerically equivalent to none).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) == 1:
    return shape, [bool(precondition_1d) and shape[0] <= max_precond_dim]
  work = merge_dims(shape, max_precond_dim) if merge else shape
  return work, [size <= max_precond_dim for size in work]


def assign_phases(costs: Sequence[float], frequency: int) -> list[int]:
  """Staggered-refresh phases: greedy least-loaded assignment of units to phases.

  Units are visited by descending cost (a stable sort, so ties keep their input order); each goes
  to the phase in ``range(frequency)`` with the smallest accumulated cost, the lowest phase index
  on ties. Returns one phase per unit, in input order. This is the library's declared rule (DS
  has no staggering: all of a group's factors are recomputed on the same steps).
  """
  frequency = int(frequency)
  load = [0.0] * frequency
  phases = [0] * len(costs)
  for unit in sorted(range(len(costs)), key=lambda i: -float(costs[i])):
    phase = min(range(frequency), key=lambda j: (load[j], j))
    phases[unit] = phase
    load[phase] += float(costs[unit])
  return phases


def _rotate(x: np.ndarray, bases: Sequence[np.ndarray | None], transpose: bool) -> np.ndarray:
  """Multiply each axis ``k`` of ``x`` by ``Q_k^T`` (transpose) or ``Q_k``; skip ``None``."""
  for axis, q in enumerate(bases):
    if q is None:
      continue
    mat = q.T if transpose else q
    x = np.moveaxis(np.tensordot(mat, x, axes=([1], [axis])), 0, axis)
  return x


def _axis_gram(x: np.ndarray, axis: int) -> np.ndarray:
  """``X_(k) X_(k)^T``: contract ``x`` with itself over every axis except ``axis``."""
  unfolded = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
  return unfolded @ unfolded.T


class SoapOracle:
  """NumPy float64 mirror of the reference ``SOAP.step`` (soap.py @ a1e5535).

  Call order per parameter, as in the reference:

  * First call: statistics ``GG_k = (1 - shampoo_beta) * G_(k) G_(k)^T`` and bases from one
    ``eigh`` (columns flipped to descending eigenvalues). The parameter is returned unchanged
    (no step, no weight decay) and ``step`` stays 0.
  * Later calls: ``step += 1``; Adam in the eigenbasis (eps added to ``sqrt(v)``, bias
    correction folded into the step size); rotate back; optional RMS normalisation; apply;
    decoupled weight decay ``p -= lr * wd * p`` on the already-updated ``p``; then update the
    statistics with the current gradient, and every ``precondition_frequency`` steps refresh
    the bases by one power iteration + QR (re-sorting ``v`` to follow), carrying ``m`` over.

  ``lr`` may be a float or a schedule ``lr(count)``; ``count`` is the number of earlier calls,
  so the t-th real update (call index t >= 1) uses ``lr(t)`` for both the step and the decay.
  All parameters must be passed on every call.

  ``stagger=True`` (a library extension, not in the reference): each factor (a parameter's
  working axis) gets a phase from :func:`assign_phases` with cost ``n^3`` (``n`` = axis length),
  units listed by sorted parameter name then ascending axis; the factor is refreshed on real
  update ``t`` iff ``t % precondition_frequency == phase``. Phases are fixed by the parameters of
  the first call (a parameter seen later gets phase 0). ``self.phases[name][axis]`` holds them
  (``None`` for an axis without a factor). Without stagger every phase is 0, i.e. the reference.
  """

  def __init__(
    self,
    lr: float | Callable[[int], float] = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float | None = None,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    normalize_grads: bool = False,
    correct_bias: bool = True,
    stagger: bool = False,
  ):
    self.lr = lr
    self.b1 = float(b1)
    self.b2 = float(b2)
    # The reference uses a negative value (default -1) to mean "reuse b2".
    use_b2 = shampoo_beta is None or shampoo_beta < 0
    self.shampoo_beta = self.b2 if use_b2 else float(shampoo_beta)
    self.eps = float(eps)
    self.weight_decay = float(weight_decay)
    self.precondition_frequency = int(precondition_frequency)
    self.max_precond_dim = int(max_precond_dim)
    self.merge_dims = bool(merge_dims)
    self.precondition_1d = bool(precondition_1d)
    self.normalize_grads = bool(normalize_grads)
    self.correct_bias = bool(correct_bias)
    self.stagger = bool(stagger)
    self.count = 0  # number of completed calls to ``step``
    self.state: dict[str, dict] = {}
    self.phases: dict[str, list[int | None]] = {}

  # -- helpers -------------------------------------------------------------------------------

  def _lr_at(self, count: int) -> float:
    return float(self.lr(count)) if callable(self.lr) else float(self.lr)

  def _work_shape(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[bool]]:
    return factor_layout(shape, self.max_precond_dim, self.merge_dims, self.precondition_1d)

  def _plan_phases(self, params: Mapping[str, np.ndarray]) -> None:
    """Fix every factor's refresh phase (all 0 without ``stagger``)."""
    units, costs = [], []
    for name in sorted(params):
      work_shape, factored = self._work_shape(np.shape(params[name]))
      self.phases[name] = [0 if f else None for f in factored]
      for axis, (size, f) in enumerate(zip(work_shape, factored, strict=True)):
        if f:
          units.append((name, axis))
          costs.append(float(size) ** 3)
    if self.stagger:
      phases = assign_phases(costs, self.precondition_frequency)
      for (name, axis), phase in zip(units, phases, strict=True):
        self.phases[name][axis] = phase

  def project(self, name: str, x: np.ndarray) -> np.ndarray:
    """Parameter space -> eigenbasis (``Q_k^T`` on every factored axis)."""
    st = self.state[name]
    return _rotate(x.reshape(st["work_shape"]), st["Q"], transpose=True).reshape(x.shape)

  def project_back(self, name: str, x: np.ndarray) -> np.ndarray:
    """Eigenbasis -> parameter space (``Q_k`` on every factored axis)."""
    st = self.state[name]
    return _rotate(x.reshape(st["work_shape"]), st["Q"], transpose=False).reshape(x.shape)

  def _accumulate_stats(self, st: dict, g_work: np.ndarray) -> None:
    weight = 1.0 - self.shampoo_beta
    for axis, gg in enumerate(st["GG"]):
      if gg is not None:
        # torch ``lerp_(end, weight)``: start + weight * (end - start)
        st["GG"][axis] = gg + weight * (_axis_gram(g_work, axis) - gg)

  def _init_state(self, name: str, g: np.ndarray) -> None:
    work_shape, factored = self._work_shape(g.shape)
    st = {
      "step": 0,
      "m": np.zeros_like(g),
      "v": np.zeros_like(g),
      "GG": [np.zeros((n, n)) if f else None for n, f in zip(work_shape, factored, strict=True)],
      "Q": None,
      "work_shape": work_shape,
    }
    self.state[name] = st
    self._accumulate_stats(st, g.reshape(work_shape))
    st["Q"] = [None if gg is None else self._eigh_descending(gg) for gg in st["GG"]]

  @staticmethod
  def _eigh_descending(gg: np.ndarray) -> np.ndarray:
    _, vecs = np.linalg.eigh(gg + _EIGH_JITTER * np.eye(gg.shape[0]))
    return np.ascontiguousarray(vecs[:, ::-1])

  def _refresh(self, st: dict, axes: Sequence[int] | None = None) -> None:
    """One power iteration + QR per factor in ``axes`` (default: all); ``v`` follows each order."""
    v = st["v"].reshape(st["work_shape"])
    new_q = []
    for axis, (gg, q) in enumerate(zip(st["GG"], st["Q"], strict=True)):
      if gg is None or (axes is not None and axis not in axes):
        new_q.append(q)
        continue
      estimate = np.diag(q.T @ gg @ q)
      order = np.argsort(-estimate, kind="stable")  # descending; ties: stable
      v = np.take(v, order, axis=axis)
      basis, _ = np.linalg.qr(gg @ q[:, order])
      new_q.append(basis)
    st["v"] = v.reshape(st["v"].shape)
    st["Q"] = new_q

  def _update_preconditioner(self, name: str, g: np.ndarray) -> None:
    st = self.state[name]
    m_param = self.project_back(name, st["m"])  # with the old bases
    self._accumulate_stats(st, g.reshape(st["work_shape"]))
    t = st["step"]
    if not self.stagger:
      if t % self.precondition_frequency == 0:
        self._refresh(st)
    else:
      phases = self.phases.get(name) or [0] * len(st["GG"])
      due = [
        axis
        for axis, gg in enumerate(st["GG"])
        if gg is not None and t % self.precondition_frequency == phases[axis]
      ]
      if due:
        self._refresh(st, due)
    st["m"] = self.project(name, m_param)  # with the (possibly) new bases

  # -- public --------------------------------------------------------------------------------

  def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]):
    """One optimizer call. Returns new params (float64); inputs are not modified."""
    lr = self._lr_at(self.count)
    if self.count == 0:
      self._plan_phases(params)
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

  def _update_param(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> np.ndarray:
    st = self.state[name]
    g_rot = self.project(name, g)
    st["step"] += 1
    t = st["step"]
    st["m"] = self.b1 * st["m"] + (1.0 - self.b1) * g_rot
    st["v"] = self.b2 * st["v"] + (1.0 - self.b2) * np.square(g_rot)
    denom = np.sqrt(st["v"]) + self.eps
    step_size = lr
    if self.correct_bias:
      step_size = lr * np.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t)
    direction = self.project_back(name, st["m"] / denom)
    if self.normalize_grads:
      direction = direction / (_NORMALIZE_EPS + np.sqrt(np.mean(np.square(direction))))
    p = p - step_size * direction
    if self.weight_decay > 0.0:
      p = p - (lr * self.weight_decay) * p
    self._update_preconditioner(name, g)
    return p


class AdamOracle:
  """Adam with the SOAP reference's conventions, i.e. SOAP with nothing rotated.

  Mirrors soap.py @ a1e5535 with ``max_precond_dim=0``: the first call only initialises and
  returns the params unchanged; then ``m, v`` EMAs, ``denom = sqrt(v) + eps``, step size
  ``lr * sqrt(1 - b2^t) / (1 - b1^t)`` (if ``correct_bias``), optional RMS normalisation of the
  direction, and decoupled decay ``p -= lr * wd * p`` applied after the step.
  """

  def __init__(
    self,
    lr: float | Callable[[int], float] = 3e-3,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    normalize_grads: bool = False,
    correct_bias: bool = True,
  ):
    self.lr = lr
    self.b1, self.b2, self.eps = float(b1), float(b2), float(eps)
    self.weight_decay = float(weight_decay)
    self.normalize_grads = bool(normalize_grads)
    self.correct_bias = bool(correct_bias)
    self.count = 0
    self.state: dict[str, dict] = {}

  def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]):
    lr = float(self.lr(self.count)) if callable(self.lr) else float(self.lr)
    out = {}
    for name, p in params.items():
      p = np.array(p, dtype=np.float64)
      g = np.array(grads[name], dtype=np.float64)
      if name not in self.state:
        self.state[name] = {"step": 0, "m": np.zeros_like(g), "v": np.zeros_like(g)}
        out[name] = p
        continue
      st = self.state[name]
      st["step"] += 1
      t = st["step"]
      st["m"] = self.b1 * st["m"] + (1.0 - self.b1) * g
      st["v"] = self.b2 * st["v"] + (1.0 - self.b2) * g * g
      scale = lr * np.sqrt(1.0 - self.b2**t) / (1.0 - self.b1**t) if self.correct_bias else lr
      direction = st["m"] / (np.sqrt(st["v"]) + self.eps)
      if self.normalize_grads:
        direction = direction / (_NORMALIZE_EPS + np.sqrt(np.mean(direction**2)))
      p = p - scale * direction
      if self.weight_decay > 0.0:
        p = p - (lr * self.weight_decay) * p
      out[name] = p
    self.count += 1
    return out


def run_soap(
  params: Mapping[str, np.ndarray],
  grad_seq: Sequence[Mapping[str, np.ndarray]] | Callable,
  num_steps: int | None = None,
  **hparams,
) -> list[dict[str, np.ndarray]]:
  """Run :class:`SoapOracle` and return the params after each call.

  ``grad_seq`` is either a sequence of gradient dicts (one per call), or a function
  ``params -> grads`` evaluated at the current params, in which case ``num_steps`` is needed.
  """
  opt = SoapOracle(**hparams)
  current = {k: np.array(v, dtype=np.float64) for k, v in params.items()}
  history = []
  if callable(grad_seq):
    if num_steps is None:
      raise ValueError("num_steps is required when grad_seq is a function")
    grad_fn = grad_seq
    grad_seq = (None for _ in range(num_steps))
  else:
    grad_fn = None
  for grads in grad_seq:
    current = opt.step(current, grad_fn(current) if grad_fn else grads)
    history.append(current)
  return history
