"""The optimizers, each a short ``optax.chain`` of the public blocks."""

from __future__ import annotations

import functools
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from soap_optax import _checks, _linalg, _sharding
from soap_optax._eigenbasis import Method, eigenbasis_refresh
from soap_optax._grafting import Grafting
from soap_optax._layout import FactorAxes, LayoutRule
from soap_optax._linalg import MatmulPrecision, Orthonormalization
from soap_optax._rotated import eigenvalue_corrected, rotated_adafactor, rotated_adam
from soap_optax._shampoo import shampoo_precondition
from soap_optax._stats import kronecker_stats
from soap_optax._weight_decay import add_decayed_weights_after_step

# The reference's max_precond_dim. The aliases default to None rather than to this number (and
# stacked_axes to None rather than 0) so that optax.inject_hyperparams, which turns every numeric
# default into a traced hyperparameter, leaves these shape-deciding arguments static.
_MAX_PRECOND_DIM = 10000

Mask = Any | Callable[[optax.Params], Any] | None

# Documentation of the arguments every alias shares, inserted where a docstring says so.
_SHARED_ARGS = """\
    max_precond_dim: axes (of a block) longer than this are not rotated; 0 rotates nothing.
      ``None`` means 10000, the SOAP reference's default.
    merge_dims: merge consecutive axes while their product is at most ``max_precond_dim``.
    precondition_1d: rotate 1-D parameters too.
    block_size: cut axes longer than this into blocks with their own factors (Distributed
      Shampoo's ``max_preconditioner_dim``); ``None`` never cuts (the reference's behaviour).
    stacked_axes: how many leading axes of every parameter stack independent parameters (a
      model scanned over its layers); each slice is optimized as if it were a parameter of its
      own, in one batched program whatever the stack's length (see
      :class:`~soap_optax.LayoutRule`; with a partly stacked model, use ``optax.partition``).
      ``None`` (no stack axes) is the reference's behaviour.
    first_basis: ``"eigh"`` (the references) or ``"qr"``: the first bases by QR iterations from
      the identity, so that no ``eigh`` runs at all (the choice on accelerators whose ``eigh`` is
      slow; see :func:`~soap_optax.eigenbasis_refresh`).
    stagger_refresh: spread the factors' refreshes over each window of
      ``precondition_frequency`` steps instead of refreshing all at once (same work, no slow
      step; changes the schedule, so off by default).
    stats_dtype: storage dtype of the factor statistics (default float32, float64 for float64
      params); ``jnp.bfloat16`` halves their memory, decompositions still run in float32.
    basis_dtype: storage dtype of the eigenbases (default: as the statistics).
    moment_dtype: storage dtype of the moments (default float32, float64 for float64 params).
    mu_dtype: storage dtype of the first moment alone, overriding ``moment_dtype`` for it
      (optax's ``mu_dtype``; ``jnp.bfloat16`` saves 2 bytes per parameter).
    factor_axes: which axes get a factor: ``"all"`` (the reference's behaviour), ``"smaller"``,
      ``"larger"``, ``"none"``, a tuple of working axes, or per parameter a function
      ``(path, shape) -> choice`` or a mapping ``{regular expression on the path: choice}``
      (see :class:`~soap_optax.LayoutRule`); the other axes stay unrotated, as a long axis does.
      With ``optax.inject_hyperparams``, name a function rule in ``static_args`` (it would be
      taken for a schedule).
    group_equal_layouts: compute parameters of equal layout (working shape, blocks, factored
      axes; dtype and sharding) as one stack, so that the compiled update does not grow with the
      number of parameters (each parameter's update is unchanged). The state is then keyed by
      group, ``"<first member's path>+<more members>:<axis>"`` (see
      :class:`~soap_optax.LayoutRule`).
    precision: of the statistics' and rotations' matmuls: ``"highest"`` (full float32, the
      default), ``"high"``/``"default"`` (an accelerator's faster TF32/bf16 passes), or
      ``"bfloat16"`` (operands rounded to bfloat16, float32 accumulation, on every platform).
      The refresh's power steps and staleness test stay in full float32.
    orthonormalization: how the refresh re-orthonormalises its power step: ``"qr"``
      (Householder, the default), ``"cholesky_qr2"`` or ``"shifted_cholesky_qr3"`` (matmuls and a
      Cholesky, for accelerators; a matrix where they lose orthonormality falls back to QR; see
      :func:`~soap_optax.eigenbasis_refresh`).
"""


_PLACEHOLDER = re.compile(r"^([ \t]*)\{shared_args\}[ \t]*$", re.MULTILINE)


def _shares_args(alias):
  """Puts the shared arguments' documentation where the docstring says ``{shared_args}``.

  The text takes the placeholder's own indentation: Python 3.13 strips a docstring's common
  indentation at compile time, so no fixed indentation can be assumed.
  """
  shared = textwrap.dedent(_SHARED_ARGS).rstrip("\n")
  alias.__doc__ = _PLACEHOLDER.sub(
    lambda match: textwrap.indent(shared, match.group(1)), alias.__doc__
  )
  return alias


def skip_nonfinite_steps(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``tx`` so that a step with a NaN or Inf gradient is skipped: zero update, state kept.

  This is ``optax.apply_if_finite`` that never gives up (same state, ``ApplyIfFiniteState``); its
  state counts the skipped steps (``total_notfinite``), which is worth logging. Each gradient is
  tested through its sum (accumulated in float32 at least), so a gradient whose sum overflows
  float32 is skipped too: its squares would overflow the second moments anyway.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = soap_optax.skip_nonfinite_steps(optax.sgd(0.1))
    >>> state = tx.init(jnp.zeros(2))
    >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state)
    >>> updates, int(state.total_notfinite)
    (Array([0., 0.], dtype=float32), 1)
  """
  # optax.apply_if_finite with its limit set to "never" has these semantics, but its rejecting
  # branch closes over the updates, whose sharding type an eager (un-jitted) call under explicit
  # sharding then loses; here every array enters the branches as an operand.
  tx = optax.with_extra_args_support(tx)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return optax.ApplyIfFiniteState(zero, jnp.ones([], bool), zero, tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    with jax.named_scope("skip_nonfinite_steps"):
      finite = _linalg.all_finite(jax.tree.leaves(updates))

    def apply(updates, inner, params):
      return tx.update(updates, inner, params, **extra_args)

    @jax.named_scope("skip_nonfinite_steps")
    def skip(updates, inner, params):
      del params
      return optax.tree.zeros_like(updates), inner

    new_updates, inner = jax.lax.cond(finite, apply, skip, updates, state.inner_state, params)
    return new_updates, _skip_state(state, finite, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _skip_state(state: optax.ApplyIfFiniteState, finite, inner) -> optax.ApplyIfFiniteState:
  bad = (~finite).astype(jnp.int32)
  return optax.ApplyIfFiniteState(
    notfinite_count=(state.notfinite_count + bad) * bad,
    last_finite=finite,
    total_notfinite=state.total_notfinite + bad,
    inner_state=inner,
  )


def _skip_nonfinite_steps_of_chain(
  guarded: Sequence[optax.GradientTransformation], rest: Sequence[optax.GradientTransformation]
) -> optax.GradientTransformationExtraArgs:
  """``skip_nonfinite_steps(optax.chain(*guarded, *rest))`` (the same state and results) for
  blocks of the family in ``guarded``, which skip a non-finite step themselves.

  The blocks of the family keep their state on a non-finite step (but for ``kronecker_stats``'
  count of skipped steps, which the first of ``guarded`` must be) and return a zero update, so
  only ``rest``'s state and the final updates need to be kept or zeroed here: a select each,
  instead of a runtime branch around the whole update, which made XLA compile the step inside
  a conditional and test the gradients twice (measured: BUILD_NOTES.md, "Compile time").

  On a device mesh the runtime branch stays: on simulated CPU devices, without it the step's
  collectives deadlocked in XLA's thread pool (the stacked-layers mesh test).
  """
  tx = optax.with_extra_args_support(optax.chain(*guarded, *rest))
  split = len(guarded)
  on_mesh = skip_nonfinite_steps(tx)

  def init_fn(params):
    zero = jnp.zeros([], jnp.int32)
    return optax.ApplyIfFiniteState(zero, jnp.ones([], bool), zero, tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    if _sharding.find_mesh(updates) is not None:
      return on_mesh.update(updates, state, params, **extra_args)
    new_updates, inner = tx.update(updates, state.inner_state, params, **extra_args)
    old = state.inner_state
    with jax.named_scope("skip_nonfinite_steps"):
      # kronecker_stats has tested the gradients (it counts a skipped step): the flag is read
      # from its state, so that the gradients are tested once, and per group when it groups.
      finite = inner[0].skipped == old[0].skipped
      keep = functools.partial(jnp.where, finite)
      new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
      stats = inner[0]._replace(skipped=old[0].skipped)
      inner = (stats, *inner[1:split], *jax.tree.map(keep, inner[split:], old[split:]))
    return new_updates, _skip_state(state, finite, inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_common(b1, b2, shampoo_beta, eps, precondition_frequency) -> None:
  """The checks of the arguments every member shares, under the members' own names."""
  _checks.check_unit_interval("b1", b1)
  _checks.check_unit_interval("b2", b2)
  if shampoo_beta is not None:
    _checks.check_unit_interval("shampoo_beta", shampoo_beta)
  _checks.check_nonnegative("eps", eps)
  _checks.check_positive_int("precondition_frequency", precondition_frequency)


def _kronecker_blocks(
  direction: Callable[[LayoutRule], optax.GradientTransformation],
  *,
  b1,
  b2,
  shampoo_beta,
  eps,
  precondition_frequency,
  max_precond_dim,
  merge_dims,
  precondition_1d,
  block_size,
  stacked_axes,
  factor_axes,
  group_equal_layouts,
  stagger_refresh,
  stats_dtype,
  basis_dtype,
  precision,
  **refresh_options,
) -> tuple[optax.GradientTransformation, ...]:
  """``kronecker_stats → eigenbasis_refresh → direction(layout)``, one layout shared by the three.

  Takes the arguments every member shares, under the members' names (and checks them so); the
  rest are the refresh's own options (``first_basis``, ``orthonormalization``, …).
  """
  _check_common(b1, b2, shampoo_beta, eps, precondition_frequency)
  _checks.check_float_dtype("stats_dtype", stats_dtype)
  _checks.check_float_dtype("basis_dtype", basis_dtype)
  layout = LayoutRule(
    _MAX_PRECOND_DIM if max_precond_dim is None else max_precond_dim,
    merge_dims,
    precondition_1d,
    block_size,
    0 if stacked_axes is None else stacked_axes,
    factor_axes,
    group_equal_layouts,
  )
  beta = b2 if shampoo_beta is None else shampoo_beta
  return (
    kronecker_stats(beta, layout=layout, dtype=stats_dtype, precision=precision),
    eigenbasis_refresh(
      precondition_frequency,
      layout=layout,
      stagger=stagger_refresh,
      dtype=stats_dtype if basis_dtype is None else basis_dtype,
      **refresh_options,
    ),
    direction(layout),
  )


def _kronecker_chain(blocks, arguments: dict) -> optax.GradientTransformationExtraArgs:
  """An alias: its direction's blocks, then learning rate, after-step decay and the dtype cast,
  wrapped so that a step with a non-finite gradient is skipped.

  ``arguments`` are the alias's own (its ``locals()``); the learning rate, the decay and its
  mask are taken out and the rest builds ``blocks``. The chain is flat (not a chain inside a
  chain), so the state tree is the one every earlier release wrote to checkpoints.
  """
  arguments = dict(arguments)
  learning_rate = arguments.pop("learning_rate")
  weight_decay = arguments.pop("weight_decay")
  weight_decay_mask = arguments.pop("weight_decay_mask")
  _checks.check_learning_rate(learning_rate)
  _checks.check_nonnegative("weight_decay", weight_decay)
  guarded = blocks(**arguments)
  rest = (
    optax.scale_by_learning_rate(learning_rate),
    add_decayed_weights_after_step(learning_rate, weight_decay, weight_decay_mask),
    _in_parameter_dtypes(),
  )
  return _skip_nonfinite_steps_of_chain(guarded, rest)


def _in_parameter_dtypes() -> optax.GradientTransformation:
  """Casts the finished updates to their parameters' dtypes (the blocks compute in float32)."""

  def update_fn(updates, state, params=None):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


# -- the directions: each member's Kronecker blocks ------------------------------------------


# Each member's blocks, from its arguments (its scale_by_*'s ``locals()``): the direction's own
# arguments by name, the shared ones passed on to _kronecker_blocks.


def _soap_blocks(*, b1, b2, eps, normalize_grads, correct_bias, moment_dtype, mu_dtype, **shared):
  def direction(layout):
    return rotated_adam(
      b1,
      b2,
      eps,
      correct_bias=correct_bias,
      normalize_grads=normalize_grads,
      moment_dtype=moment_dtype,
      mu_dtype=mu_dtype,
      precision=shared["precision"],
      layout=layout,
    )

  return _kronecker_blocks(direction, b1=b1, b2=b2, eps=eps, **shared)


def _shampoo_blocks(
  *,
  b1,
  b2,
  eps,
  exponent,
  trace_scaling,
  grafting,
  graft_eps,
  relative_eps,
  moment_dtype,
  mu_dtype,
  **shared,
):
  def direction(layout):
    return shampoo_precondition(
      exponent,
      eps,
      b1=b1,
      relative_eps=relative_eps,
      trace_scaling=trace_scaling,
      grafting=grafting,
      graft_b2=b2,
      graft_eps=graft_eps,
      moment_dtype=moment_dtype,
      mu_dtype=mu_dtype,
      precision=shared["precision"],
      layout=layout,
    )

  return _kronecker_blocks(direction, b1=b1, b2=b2, eps=eps, **shared)


def _eigen_adafactor_blocks(*, b1, b2, eps, eps2, correct_bias, moment_dtype, mu_dtype, **shared):
  def direction(layout):
    return rotated_adafactor(
      b1,
      b2,
      eps,
      layout=layout,
      eps2=eps2,
      correct_bias=correct_bias,
      moment_dtype=moment_dtype,
      mu_dtype=mu_dtype,
      precision=shared["precision"],
    )

  return _kronecker_blocks(direction, b1=b1, b2=b2, eps=eps, **shared)


def _eshampoo_blocks(*, b1, b2, eps, moment_dtype, mu_dtype, **shared):
  def direction(layout):
    return eigenvalue_corrected(
      b1,
      b2,
      eps,
      moment_dtype=moment_dtype,
      mu_dtype=mu_dtype,
      precision=shared["precision"],
      layout=layout,
    )

  return _kronecker_blocks(direction, b1=b1, b2=b2, eps=eps, **shared)


# -- scale_by_*: the directions as optax transformations ------------------------------------


@_shares_args
def scale_by_soap(
  b1: float = 0.95,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  correct_bias: bool = True,
  *,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """SOAP's update direction, to compose like ``optax.scale_by_adam``.

  ``chain(kronecker_stats, eigenbasis_refresh, rotated_adam)`` with one shared
  :class:`~soap_optax.LayoutRule`, and nothing else: no learning rate, weight decay or skipping
  of non-finite steps (the blocks themselves keep their state and return a zero update on such a
  step). :func:`soap` is this direction followed by the learning rate and SOAP's after-step
  weight decay. The updates come back in float32 (float64 for float64 parameters);
  ``optax.apply_updates`` casts them to the parameters' dtypes.

  Args:
    b1: Adam's first-moment decay in the eigenbasis.
    b2: Adam's second-moment decay in the eigenbasis.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√v``.
    precondition_frequency: refresh the eigenbases every this many updates.
    normalize_grads: divide each parameter's (block's) direction by its RMS.
    correct_bias: use Adam's bias correction.
    {shared_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(
    ...   optax.clip_by_global_norm(1.0),
    ...   soap_optax.scale_by_soap(b1=0.9, b2=0.99),
    ...   optax.add_decayed_weights(1e-4),
    ...   optax.scale_by_learning_rate(1e-3),
    ... )
    >>> params = {"w": jnp.ones((4, 3))}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((4, 3))}, state, params)
    >>> optax.tree.get(state, "EigenbasisState").basis["w:0"].shape  # found by its type
    (1, 4, 4)

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return optax.chain(*_soap_blocks(**locals()))


@_shares_args
def scale_by_shampoo(
  b1: float = 0.9,
  b2: float = 0.999,
  shampoo_beta: float | None = None,
  eps: float = 1e-6,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  exponent: float = 0.5,
  trace_scaling: bool = False,
  grafting: Grafting = "adam",
  graft_eps: float = 1e-8,
  *,
  relative_eps: bool = True,
  method: Method = "eigh",
  refresh_tolerance: float = 0.0,
  max_qr_iterations: int = 1,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """Shampoo's grafted update direction, to compose like optax's ``scale_by_*``.

  ``chain(kronecker_stats, eigenbasis_refresh, shampoo_precondition)`` with one shared
  :class:`~soap_optax.LayoutRule`, and nothing else (see :func:`shampoo`, which adds the
  learning rate and weight decay, for the arguments' meaning).

  Args:
    b1: gradient filtering (EMA of the gradient before preconditioning).
    b2: decay of the factor statistics and of the grafting's second moment.
    shampoo_beta: decay of the factor statistics if it should differ from ``b2``.
    eps: damping added to every factor eigenvalue before the inverse root.
    precondition_frequency: recompute the preconditioner every this many updates.
    exponent: inverse root of each factor.
    trace_scaling: the SOAP paper's scalar correction ``tr(L)^(exponent·(K−1))``.
    grafting: ``"adam"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
    graft_eps: epsilon of the grafted optimizer.
    relative_eps: scale ``eps`` by each factor's largest eigenvalue (else absolute).
    method: ``"eigh"`` (exact) or ``"qr"`` (warm-started power iteration) for the refresh.
    refresh_tolerance: adaptive skip test of the refresh (0 refreshes on every schedule).
    max_qr_iterations: QR iterations per refresh when ``method="qr"``.
    {shared_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(soap_optax.scale_by_shampoo(), optax.scale(-1e-2))
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones((4, 3))}, state)  # initialises
    >>> updates, _ = tx.update({"w": jnp.ones((4, 3))}, state)
    >>> round(float(jnp.linalg.norm(updates["w"])), 4)  # Adam's first step, grafted: lr·√12
    0.0346

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
  """
  return optax.chain(*_shampoo_blocks(**locals()))


@_shares_args
def scale_by_eigen_adafactor(
  b1: float = 0.95,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  correct_bias: bool = True,
  *,
  eps2: float = 1e-30,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """Adafactor's direction in Shampoo's eigenbasis, to compose like optax's ``scale_by_*``.

  ``chain(kronecker_stats, eigenbasis_refresh, rotated_adafactor)`` with one shared
  :class:`~soap_optax.LayoutRule`, and nothing else (see :func:`eigen_adafactor`).

  Args:
    b1: first-moment decay in the eigenbasis.
    b2: decay of the factored second moment.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√V``.
    precondition_frequency: refresh the eigenbases every this many updates.
    correct_bias: use Adam's bias correction.
    eps2: Adafactor's ε₁, added to the squared rotated gradient.
    {shared_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(soap_optax.scale_by_eigen_adafactor(), optax.scale(-1e-2))
    >>> state = tx.init({"w": jnp.zeros((64, 32))})
    >>> adafactor = optax.tree.get(state, "RotatedAdafactorState")
    >>> adafactor.nu_row["w"].size + adafactor.nu_col["w"].size  # 64 + 32 numbers, not 64·32
    96

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return optax.chain(*_eigen_adafactor_blocks(**locals()))


@_shares_args
def scale_by_eshampoo(
  b1: float = 0.9,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  refresh_tolerance: float = 0.01,
  max_qr_iterations: int = 3,
  *,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """EShampoo's direction with the adaptive refresh, to compose like optax's ``scale_by_*``.

  ``chain(kronecker_stats, eigenbasis_refresh(refresh_tolerance=τ), eigenvalue_corrected)`` with
  one shared :class:`~soap_optax.LayoutRule`, and nothing else (see :func:`eshampoo`).

  Args:
    b1: first-moment decay (parameter basis).
    b2: decay of the corrected eigenvalues.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√D̂``.
    precondition_frequency: how often the bases are tested (and refreshed when stale).
    refresh_tolerance: τ in ``[0, 1]``; 0 refreshes every factor on every schedule.
    max_qr_iterations: the most warm-started QR iterations per refresh.
    {shared_args}

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = optax.chain(soap_optax.scale_by_eshampoo(refresh_tolerance=0.05), optax.scale(-1e-2))
    >>> state = tx.init({"w": jnp.zeros((8, 4))})
    >>> sorted(optax.tree.get(state, "EigenbasisState").refreshes)
    ['w:0', 'w:1']

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  return optax.chain(*_eshampoo_blocks(**locals()))


# -- the optimizers -----------------------------------------------------------------------------


@_shares_args
def soap(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: float = 0.95,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  normalize_grads: bool = False,
  correct_bias: bool = True,
  *,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  weight_decay_mask: Mask = None,
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

  Composition::

    chain(kronecker_stats(shampoo_beta), eigenbasis_refresh(precondition_frequency),
          rotated_adam(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  wrapped so that a step with a non-finite gradient is skipped (zero update, state kept). With
  the defaults it reproduces the authors' PyTorch SOAP step for step: the first call only
  initialises the statistics and the bases (zero update, no decay); each step's basis predates its
  gradient; the bases are refreshed (sorted power step + QR) at updates 10, 20, …; the step size
  is ``lr·√(1−b2ᵗ)/(1−b1ᵗ)`` with ``eps`` added to ``√v``; weight decay ``p ← p − lr·wd·p`` is
  applied after the step.

  Args:
    learning_rate: learning rate or schedule (called with the update count, from 0).
    b1: Adam's first-moment decay in the eigenbasis.
    b2: Adam's second-moment decay in the eigenbasis.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√v``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: refresh the eigenbases every this many updates.
    normalize_grads: divide each parameter's (block's) direction by its RMS.
    correct_bias: use Adam's bias correction.
    {shared_args}
    weight_decay_mask: which parameters to decay (a tree of bools or a function of the params);
      ``None`` decays all, as the reference does.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = soap_optax.soap(learning_rate=1e-2)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((jnp.arange(4.0) @ p["w"] + p["b"] - 1.0) ** 2)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> bool(loss(params) < 108.0)
    True

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return _kronecker_chain(_soap_blocks, locals())


@_shares_args
def shampoo(
  learning_rate: optax.ScalarOrSchedule = 1e-3,
  b1: float = 0.9,
  b2: float = 0.999,
  shampoo_beta: float | None = None,
  eps: float = 1e-6,
  weight_decay: float = 0.0,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  exponent: float = 0.5,
  trace_scaling: bool = False,
  grafting: Grafting = "adam",
  graft_eps: float = 1e-8,
  *,
  relative_eps: bool = True,
  method: Method = "eigh",
  refresh_tolerance: float = 0.0,
  max_qr_iterations: int = 1,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  weight_decay_mask: Mask = None,
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """Shampoo (power 1/2 by default) with Adam grafting, as Distributed Shampoo runs it.

  Composition::

    chain(kronecker_stats(b2), eigenbasis_refresh(precondition_frequency, method="eigh"),
          shampoo_precondition(exponent, eps, b1=b1, grafting="adam"),
          scale_by_learning_rate(learning_rate), add_decayed_weights_after_step(...))

  The preconditioner ``(L_k + ε)^(−exponent)`` is recomputed (``eigh``) every
  ``precondition_frequency`` updates from the factor statistics; between refreshes it is stale,
  as in every practical Shampoo. What is preconditioned is the filtered gradient (Distributed
  Shampoo's ``betas[0]``: an EMA of the gradient with ``b1``, bias-corrected by the number of
  real updates), and the step takes the norm of Adam's step (without momentum) on it, per
  parameter or block (grafting).

  Args:
    learning_rate: learning rate or schedule.
    b1: gradient filtering (EMA of the gradient before preconditioning).
    b2: decay of the factor statistics and of the grafting's second moment.
    shampoo_beta: decay of the factor statistics if it should differ from ``b2``.
    eps: damping added to every factor eigenvalue before the inverse root, relative to the
      factor's largest eigenvalue (see :func:`~soap_optax.shampoo_precondition`).
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: recompute the preconditioner every this many updates.
    exponent: inverse root of each factor (0.5: the SOAP paper's Shampoo-1/2; 0.25: original).
    trace_scaling: the SOAP paper's scalar correction ``tr(L)^(exponent·(K−1))``.
    grafting: ``"adam"``, ``"rmsprop"``, ``"sgd"`` or ``"none"``.
    graft_eps: epsilon of the grafted optimizer.
    relative_eps: scale ``eps`` by each factor's largest eigenvalue (else absolute).
    method: ``"eigh"`` (exact) or ``"qr"`` (warm-started power iteration) for the refresh.
    refresh_tolerance: adaptive skip test of the refresh (0 refreshes on every schedule).
    max_qr_iterations: QR iterations per refresh when ``method="qr"``.
    {shared_args}
    weight_decay_mask: which parameters to decay (a tree of bools or a function of the params);
      ``None`` decays all, as the reference does.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import soap_optax
    >>> tx = soap_optax.shampoo(learning_rate=1e-2, method="qr", first_basis="qr")  # no eigh
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> state = tx.init(params)
    >>> _, state = tx.update({"w": jnp.ones((4, 3))}, state, params)  # initialises
    >>> updates, state = tx.update({"w": jnp.ones((4, 3))}, state, params)
    >>> round(float(jnp.linalg.norm(updates["w"])), 4)  # Adam's first step, grafted: lr·√12
    0.0346

  References:
    Gupta et al., `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return _kronecker_chain(_shampoo_blocks, locals())


@_shares_args
def eigen_adafactor(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: float = 0.95,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.01,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  correct_bias: bool = True,
  *,
  eps2: float = 1e-30,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  weight_decay_mask: Mask = None,
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """Adafactor in the eigenbasis of Shampoo's preconditioner (the SOAP paper's Shampoo-1/2).

  Composition::

    chain(kronecker_stats(b2), eigenbasis_refresh(precondition_frequency),
          rotated_adafactor(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  Same conventions and defaults as :func:`soap`, with Adafactor's factored second moment in place
  of Adam's: it stores ``m + n`` numbers per matrix instead of ``m·n``.

  Args:
    learning_rate: learning rate or schedule.
    b1: first-moment decay in the eigenbasis.
    b2: decay of the factored second moment.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√V``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: refresh the eigenbases every this many updates.
    correct_bias: use Adam's bias correction.
    eps2: Adafactor's ε₁, added to the squared rotated gradient.
    {shared_args}
    weight_decay_mask: which parameters to decay (a tree of bools or a function of the params);
      ``None`` decays all, as the reference does.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = soap_optax.eigen_adafactor(learning_rate=1e-2)
    >>> state = tx.init({"w": jnp.zeros((64, 32))})
    >>> adafactor = optax.tree.get(state, "RotatedAdafactorState")  # wherever it sits
    >>> adafactor.nu_row["w"].size + adafactor.nu_col["w"].size  # 64 + 32 numbers, not 64·32
    96

  References:
    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  return _kronecker_chain(_eigen_adafactor_blocks, locals())


@_shares_args
def eshampoo(
  learning_rate: optax.ScalarOrSchedule = 3e-3,
  b1: float = 0.9,
  b2: float = 0.95,
  shampoo_beta: float | None = None,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  precondition_frequency: int = 10,
  max_precond_dim: int | None = None,
  merge_dims: bool = False,
  precondition_1d: bool = False,
  refresh_tolerance: float = 0.01,
  max_qr_iterations: int = 3,
  *,
  block_size: int | None = None,
  stacked_axes: int | None = None,
  first_basis: Method = "eigh",
  weight_decay_mask: Mask = None,
  stagger_refresh: bool = False,
  stats_dtype: DTypeLike | None = None,
  basis_dtype: DTypeLike | None = None,
  moment_dtype: DTypeLike | None = None,
  mu_dtype: DTypeLike | None = None,
  factor_axes: FactorAxes = "all",
  group_equal_layouts: bool = False,
  precision: MatmulPrecision = "highest",
  orthonormalization: Orthonormalization = "qr",
) -> optax.GradientTransformationExtraArgs:
  """Eigenvalue-corrected Shampoo with the adaptive eigenbasis refresh of *Purifying Shampoo*.

  Composition::

    chain(kronecker_stats(b2),
          eigenbasis_refresh(precondition_frequency, refresh_tolerance=τ, max_qr_iterations=k),
          eigenvalue_corrected(b1, b2, eps), scale_by_learning_rate(learning_rate),
          add_decayed_weights_after_step(learning_rate, weight_decay))

  Every ``precondition_frequency`` updates each factor's basis is tested
  (``‖B − diag(B)‖_F ≤ τ‖B‖_F`` with ``B = QᵀLQ``) and refreshed by warm-started QR iterations only
  when it has gone stale, so that well-converged factors cost almost nothing.

  Args:
    learning_rate: learning rate or schedule.
    b1: first-moment decay (parameter basis).
    b2: decay of the corrected eigenvalues.
    shampoo_beta: decay of the factor statistics; ``None`` means ``b2``.
    eps: added to ``√D̂``.
    weight_decay: decoupled weight decay, applied after the step.
    precondition_frequency: how often the bases are tested (and refreshed when stale).
    refresh_tolerance: τ in ``[0, 1]``; 0 refreshes every factor on every schedule.
    max_qr_iterations: the most warm-started QR iterations per refresh.
    {shared_args}
    weight_decay_mask: which parameters to decay (a tree of bools or a function of the params);
      ``None`` decays all, as the reference does.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import soap_optax
    >>> tx = soap_optax.eshampoo(learning_rate=1e-2, refresh_tolerance=0.05)
    >>> state = tx.init({"w": jnp.zeros((8, 4))})
    >>> sorted(optax.tree.get(state, "EigenbasisState").refreshes)  # one counter per factor
    ['w:0', 'w:1']

  References:
    Eschenhagen et al., `Purifying Shampoo: Investigating Shampoo's Heuristics by Decomposing its
    Preconditioner <https://arxiv.org/abs/2506.03595>`_, 2025.
  """
  return _kronecker_chain(_eshampoo_blocks, locals())
