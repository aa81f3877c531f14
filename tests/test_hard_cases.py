"""Every alias against its independent float64 oracle on the cases the plain comparisons avoid.

Rectangular parameters (rank-deficient first statistics), vectors with ``precondition_1d``,
merged tensors, learning-rate schedules, ``weight_decay_mask``, staggered refreshes inside the
full optimizer (moments moved when only some factors refresh), blocking (Distributed Shampoo's
``max_preconditioner_dim``; divisible and ragged blocks), the eigh-free first basis, and stacked
parameters (a scanned model's layers: each slice against the oracle run on it as a parameter).

Where a factor is rank-deficient after the first gradient its eigenbasis is not unique, and
SOAP-like optimizers (whose moments live in the basis) depend on the choice. There the test
hands the oracle the library's first bases (as a user porting a checkpoint would) and compares
everything after; Shampoo's preconditioner is a matrix function, independent of that choice.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import SoapOracle
from oracles_family import EigenAdafactorOracle, EShampooOracle, ShampooOracle
from runner import cumulative_update_errors

import soap_optax

ORACLES = {
  "soap": SoapOracle,
  "shampoo": ShampooOracle,
  "eigen_adafactor": EigenAdafactorOracle,
  "eshampoo": EShampooOracle,
}
# Settings common to every comparison: refreshes at updates 3, 6, 9, 12.
COMMON = dict(learning_rate=1e-2, precondition_frequency=3)
STEPS = 14


def _data(seed, shapes, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
  return params, grads


def _oracle(name, block_size=None, **kwargs):
  """The oracle of alias ``name`` with the library's argument names translated."""
  kwargs = dict(kwargs)
  kwargs["lr"] = kwargs.pop("learning_rate", 1e-2)
  if "stagger_refresh" in kwargs:
    kwargs["stagger"] = kwargs.pop("stagger_refresh")
  if name == "soap":
    return _BlockwiseSoap(block_size, **kwargs)
  return ORACLES[name](block_size=block_size, **kwargs)


def _block_slices(shape, block_size):
  """The blocks of a working shape (``numpy.split`` at multiples of ``block_size``), C order."""
  per_axis = [
    [slice(i, min(i + block_size, n)) for i in range(0, n, block_size)]
    if block_size and n > block_size
    else [slice(0, n)]
    for n in shape
  ]
  return list(itertools.product(*per_axis))


class _BlockwiseSoap:
  """The reference SOAP oracle run on each block as an independent parameter (blocked SOAP).

  The shapes these tests block are not merged, so a block is a slice of the parameter itself.
  ``weight_decay_mask``: the parameters it leaves out are stepped by a second oracle without
  decay. ``first_basis="qr"``: after the first call, each basis is replaced by the QR refresh
  from the identity (sorted by ``diag(L)``, one power step, QR), computed here in NumPy.
  """

  def __init__(self, block_size, weight_decay_mask=None, first_basis="eigh", **kwargs):
    self.block_size = block_size
    self.mask = weight_decay_mask
    self.first_basis = first_basis
    self.oracle = SoapOracle(**kwargs)
    self.undecayed = SoapOracle(**{**kwargs, "weight_decay": 0.0})
    self.state = self.oracle.state

  def _split(self, tree):
    out = {}
    for name, x in tree.items():
      for i, index in enumerate(_block_slices(np.shape(x), self.block_size)):
        out[f"{name}#{i}"] = np.asarray(x)[index]
    return out

  def step(self, params, grads):
    first = not self.oracle.state
    decayed = [k for k in params if self.mask is None or self.mask[k]]
    kept = [k for k in params if k not in decayed]
    new = self.oracle.step(*(self._split({k: t[k] for k in decayed}) for t in (params, grads)))
    if kept:
      new.update(
        self.undecayed.step(*(self._split({k: t[k] for k in kept}) for t in (params, grads)))
      )
    if first and self.first_basis == "qr":
      for state in self.oracle.state.values():
        pairs = zip(state["Q"], state["GG"], strict=True)
        state["Q"] = [None if q is None else _qr_from_identity(gg) for q, gg in pairs]
    out = {}
    for name, x in params.items():
      y = np.array(x, np.float64)
      for i, index in enumerate(_block_slices(np.shape(x), self.block_size)):
        y[index] = new[f"{name}#{i}"]
      out[name] = y
    return out

  def bases(self, name, block):
    return self.oracle.state[f"{name}#{block}"]["Q"]


def _qr_from_identity(stat):
  """The QR refresh started from Q = I: sort by diag(L), one power step L·I, QR."""
  order = np.argsort(-np.diag(stat), kind="stable")
  return np.linalg.qr(stat[:, order])[0]


def _oracle_bases(oracle, name, block, blocked):
  if isinstance(oracle, _BlockwiseSoap):
    return oracle.bases(name, block)
  state = oracle.state[name]
  return state["blocks"][block]["Q"] if blocked else state["Q"]


def _hand_over_first_bases(oracle, library_state, params, block_size):
  """Gives the oracle the library's first bases (the real part of each padded block)."""
  bases = optax.tree.get(library_state, "basis")
  assert bases, "nothing to hand over"
  for key, stack in bases.items():
    name, axis = key.rsplit(":", 1)
    if block_size is None:  # one block: the whole (possibly merged) working shape
      _oracle_bases(oracle, name, 0, False)[int(axis)] = np.asarray(stack[0], np.float64)
      continue
    for block, index in enumerate(_block_slices(np.shape(params[name]), block_size)):
      n = index[int(axis)].stop - index[int(axis)].start
      q = np.asarray(stack[block], np.float64)[:n, :n]
      _oracle_bases(oracle, name, block, True)[int(axis)] = q


def _compare(
  name, shapes, tol, *, seed=0, hand_over=False, block_size=None, oracle_kwargs=(), **kwargs
):
  """Runs alias ``name`` and its oracle over the same gradients in float64; asserts agreement.

  ``oracle_kwargs`` override ``kwargs`` for the oracle (an argument it spells differently).
  """
  params, grads = _data(seed, shapes)
  settings = {**COMMON, **kwargs}
  oracle = _oracle(name, block_size=block_size, **{**settings, **dict(oracle_kwargs)})
  with jax.enable_x64(True):
    tx = getattr(soap_optax, name)(block_size=block_size, **settings)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(tx.update)
    q = params
    for i, g in enumerate(grads):
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
      q = oracle.step(q, g)
      if i == 0 and hand_over:
        _hand_over_first_bases(oracle, state, params, block_size)
  errors = cumulative_update_errors(params, p, q)
  assert all(np.isfinite(e) for e in errors.values()), errors
  assert max(errors.values()) < tol, errors


ALIASES = list(ORACLES)


@pytest.mark.parametrize("name", ALIASES)
def test_rectangular_parameters_with_rank_deficient_first_statistics(name):
  # (3, 10): the right factor has rank 3 after the first gradient; full rank before the first
  # refresh (4 gradients by update 3).
  _compare(name, {"wide": (3, 10), "tall": (9, 4)}, 1e-8, hand_over=True)


@pytest.mark.parametrize("name", ALIASES)
def test_vectors_are_preconditioned_with_precondition_1d(name):
  _compare(name, {"vector": (5,), "matrix": (4, 4)}, 1e-8, hand_over=True, precondition_1d=True)


@pytest.mark.parametrize("name", ALIASES)
def test_merged_tensors(name):
  shapes = {"conv": (2, 2, 4, 4), "tensor": (3, 4, 4)}  # merged to (16, 4) and (12, 4)
  _compare(name, shapes, 1e-8, hand_over=True, merge_dims=True, max_precond_dim=16)


@pytest.mark.parametrize("name", ALIASES)
def test_a_learning_rate_schedule(name):
  # Dyadic end points: every float32 value optax computes for the schedule is exact, so the
  # oracle sees the very learning rates the library uses.
  schedule = optax.linear_schedule(2.0**-6, 2.0**-7, 16)
  params, grads = _data(1, {"matrix": (5, 5)})
  with jax.enable_x64(True):
    tx = getattr(soap_optax, name)(**{**COMMON, "learning_rate": schedule})
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state, step = tx.init(p), jax.jit(tx.update)
    for g in grads:
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
  lr = lambda t: 2.0**-6 - 2.0**-7 * min(t, 16) / 16  # noqa: E731
  oracle = _oracle(name, **{**COMMON, "learning_rate": lr})
  q = params
  for g in grads:
    q = oracle.step(q, g)
  errors = cumulative_update_errors(params, p, q)
  assert max(errors.values()) < 1e-9, errors


@pytest.mark.parametrize("name", ALIASES)
def test_weight_decay_mask(name):
  mask = {"decayed": True, "kept": False}
  _compare(
    name,
    {"decayed": (4, 4), "kept": (4, 4)},
    1e-9,
    weight_decay=0.1,
    weight_decay_mask=mask,
  )


def test_a_weight_decay_mask_given_as_a_function_of_the_params():
  """As optax's masks: the function gets the params and returns the tree of bools. This one decays
  the matrices, not the vectors (the usual rule for biases); the oracle is told by name. The
  masking is the aliases' shared frame, so one alias checks it, with nothing rotated (cheap to
  compile; the rotation is not what this test is about)."""
  shapes = {"matrix": (4, 4), "bias": (4,)}

  def matrices(params):
    return jax.tree.map(lambda p: p.ndim == 2, params)

  want = {"matrix": True, "bias": False}
  assert matrices({k: np.zeros(s) for k, s in shapes.items()}) == want
  # The mask changes the result: the oracle without it decays the bias too.
  params, grads = _data(0, shapes)
  runs = []
  for mask in (want, None):
    oracle = _oracle("soap", **COMMON, max_precond_dim=0, weight_decay=0.1, weight_decay_mask=mask)
    q = params
    for g in grads:
      q = oracle.step(q, g)
    runs.append(q)
  errors = cumulative_update_errors(params, runs[1], runs[0])
  assert errors["matrix"] == 0.0 and errors["bias"] > 1e-3, errors
  _compare(
    "soap",
    shapes,
    1e-9,
    max_precond_dim=0,
    weight_decay=0.1,
    weight_decay_mask=matrices,
    oracle_kwargs={"weight_decay_mask": want},
  )


@pytest.mark.parametrize("name", ALIASES)
def test_staggered_refresh_inside_the_full_optimizer(name):
  # Factors of sizes 6, 4 and 3 over 3 phases: only some factors of a parameter refresh at a
  # time, so the moments must move along those axes only.
  _compare(name, {"a": (6, 4), "b": (3, 3)}, 1e-8, hand_over=True, stagger_refresh=True)


@pytest.mark.parametrize("name", ALIASES)
def test_blocked_parameters_equal_the_block_diagonal_preconditioner(name):
  # 8 = 2 blocks of 4: square blocks, full rank from the first gradient.
  _compare(name, {"w": (8, 8), "v": (4, 8)}, 1e-8, block_size=4)


@pytest.mark.parametrize("name", ALIASES)
def test_ragged_blocks_equal_the_oracle_s_ragged_blocks(name):
  # 10 = 4 + 4 + 2: the library pads the last block; the oracle does not.
  _compare(name, {"w": (10, 6)}, 1e-8, hand_over=True, block_size=4)


@pytest.mark.parametrize("name", ALIASES)
def test_the_eigh_free_first_basis(name):
  """``first_basis="qr"`` deviates from the reference's first step by design (QR iterations from
  the identity instead of ``eigh``); the oracle implements the same rule."""
  kwargs = dict(first_basis="qr")
  if name == "shampoo":
    kwargs.update(method="qr", max_qr_iterations=3)  # no eigh anywhere
  # Square parameters: full-rank statistics, so QR from the identity is unique.
  _compare(name, {"matrix": (5, 5), "other": (4, 4)}, 1e-8, hand_over=False, **kwargs)


# -- stacked parameters (``stacked_axes``): a scanned model's layers ------------------------------

LAYERS = 3


def _unstack(tree):
  """A stacked tree as the unstacked model holds it: one parameter per layer."""
  return {f"{name}/{i}": np.asarray(x)[i] for name, x in tree.items() for i in range(LAYERS)}


def _compare_stacked(name, shapes, tol, *, block_size=None, **kwargs):
  """The library on ``(LAYERS, *shape)`` stacks against the oracle run on every slice alone."""
  params, grads = _data(5, {k: (LAYERS, *s) for k, s in shapes.items()})
  settings = {**COMMON, **kwargs}
  oracle = _oracle(name, block_size=block_size, **settings)
  with jax.enable_x64(True):
    tx = getattr(soap_optax, name)(stacked_axes=1, block_size=block_size, **settings)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state, step = tx.init(p), jax.jit(tx.update)
    q = _unstack(params)
    for g in grads:
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
      q = oracle.step(q, _unstack(g))
  errors = cumulative_update_errors(_unstack(params), _unstack(p), q)
  assert len(errors) == LAYERS * len(shapes)
  assert all(np.isfinite(e) for e in errors.values()), errors
  assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("name", ALIASES)
def test_each_slice_of_a_stacked_parameter_is_optimized_as_a_parameter_of_its_own(name):
  # Square slices (full-rank statistics from the first gradient) and an unfactored bias.
  _compare_stacked(name, {"kernel": (4, 4), "bias": (4,)}, 1e-8)


@pytest.mark.parametrize("name", ALIASES)
def test_blocks_of_stacked_parameters_equal_the_oracle_s_blocks_of_each_slice(name):
  _compare_stacked(name, {"kernel": (8, 4), "vector": (8,)}, 1e-8, block_size=4)
