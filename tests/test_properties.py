"""Property-based specification: invariants of every alias, whatever the shapes and settings.

Hypothesis draws parameter trees (0-D to 4-D, size-1 axes, axes longer than ``max_precond_dim``,
axes that ``block_size`` cuts into ragged blocks; float32, bfloat16 and float16 leaves), gradients
(zero ones included) and the hyperparameters of each alias, and checks that

* the updates are finite for finite gradients and have the parameters' shapes and dtypes (a
  float16 parameter runs beside a float32 twin, which tells whether float16 can hold its update);
* every floating leaf of the state stays finite;
* every basis of every factor and block is orthonormal after steps that cross a refresh;
* the jitted step is traced once: the state a step returns has exactly the tree structure,
  shapes, dtypes (and weak types) of the state it was given, so nothing recompiles.

Every example compiles its own step (seconds on CPU), so CI runs few examples, the same ones in
every run (derandomized); the abstract property (structure, shapes, dtypes) needs no compilation
and runs more through ``jax.eval_shape``. ``SOAP_OPTAX_HYPOTHESIS_PROFILE=thorough`` runs more
than ten times as many. The corners the properties once found failing (eps = 0, a zero gradient
under normalize_grads, b1 that rounds to 1 in float32, a float16 direction past 65504) are drawn
like any other value, and pinned by minimal reproducers at the end of the file.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from runner import assert_close

import soap_optax

ALIASES = ("soap", "shampoo", "eigen_adafactor", "eshampoo")

# ‖QᵀQ − I‖_max of float32 bases (factor sides ≤ 6, eigh and QR) measured at most 6.8e-7 (under
# 6 float32 ulps) over the 722 bases of two runs of the "thorough" profile; the bound leaves 15×.
ORTHONORMALITY_TOLERANCE = 1e-5

# Profiles, chosen with SOAP_OPTAX_HYPOTHESIS_PROFILE (default "ci"). max_examples counts the
# compiled runs per alias, each of which costs seconds of XLA compilation on CPU; the abstract
# property (jax.eval_shape, no compilation) runs four times as many.
for _name, _examples in (("ci", 2), ("thorough", 25)):
  settings.register_profile(
    f"soap_optax-{_name}",
    max_examples=_examples,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI is reproducible
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
  )
_PROFILE = settings.get_profile(
  "soap_optax-" + os.environ.get("SOAP_OPTAX_HYPOTHESIS_PROFILE", "ci")
)
COMPILED = settings(_PROFILE)
ABSTRACT = settings(_PROFILE, max_examples=4 * _PROFILE.max_examples)

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Per-step gradient scales: zero gradients, tiny ones, and large ones (within float16's range).
GRADIENT_SCALES = (0.0, 1e-4, 1.0, 100.0)
EPSILONS = (1e-30, 0.0, 1e-12, 1e-8, 1e-3)


# -- strategies ---------------------------------------------------------------------------------
#
# Each choice lists its simplest value first: Hypothesis starts from it and shrinks towards it. The
# first example is therefore already a real case (two 5×5 parameters cut into ragged 3×3 blocks,
# a refresh at the second step), which matters when a profile runs only a few examples.

PARAMETER_COUNTS = (2, 1, 3)
RANKS = (2, 0, 1, 3, 4)
AXIS_LENGTHS = (5, 1, 3, 7, 2, 4, 6)  # 5 and 7: longer than most max_precond_dim and block_size
MAX_PRECOND_DIMS = (4, 0, 1, 2, 3, 5, 6)
BLOCK_SIZES = (3, None, 2, 4)  # 3 cuts 4, 5 and 7 into ragged blocks, 2 cuts 3, 5 and 7


@st.composite
def shapes(draw):
  """0-D to 4-D, axes of 1 to 7."""
  rank = draw(st.sampled_from(RANKS))
  return tuple(draw(st.sampled_from(AXIS_LENGTHS)) for _ in range(rank))


@st.composite
def parameter_specs(draw):
  """One to three named parameters, each with its own shape and dtype."""
  count = draw(st.sampled_from(PARAMETER_COUNTS))
  return {f"p{i}": (draw(shapes()), draw(st.sampled_from(DTYPES))) for i in range(count)}


def unit_interval():
  """A decay in [0, 1), including values that round to 1 in float32."""
  return st.floats(0.0, 1.0, exclude_max=True)


@st.composite
def common_settings(draw):
  """The arguments every alias shares."""
  return dict(
    learning_rate=draw(st.sampled_from([1e-3, 1e-1])),
    b1=draw(unit_interval()),
    b2=draw(unit_interval()),
    eps=draw(st.sampled_from(EPSILONS)),
    weight_decay=draw(st.sampled_from([0.0, 0.1])),
    precondition_frequency=draw(st.integers(1, 4)),
    max_precond_dim=draw(st.sampled_from(MAX_PRECOND_DIMS)),
    merge_dims=draw(st.booleans()),
    precondition_1d=draw(st.booleans()),
    block_size=draw(st.sampled_from(BLOCK_SIZES)),
    first_basis=draw(st.sampled_from(["eigh", "qr"])),
    stagger_refresh=draw(st.booleans()),
  )


@st.composite
def alias_settings(draw, name):
  """Every argument of alias ``name`` that changes what a step computes."""
  kwargs = draw(common_settings())
  if name == "soap":
    kwargs.update(normalize_grads=draw(st.booleans()), correct_bias=draw(st.booleans()))
  elif name == "eigen_adafactor":
    kwargs.update(correct_bias=draw(st.booleans()))
  elif name == "shampoo":
    kwargs.update(
      exponent=draw(st.sampled_from([0.25, 0.5])),
      grafting=draw(st.sampled_from(["adam", "rmsprop", "sgd", "none"])),
      trace_scaling=draw(st.booleans()),
      relative_eps=draw(st.booleans()),
      method=draw(st.sampled_from(["eigh", "qr"])),
      refresh_tolerance=draw(st.sampled_from([0.0, 0.1])),
      max_qr_iterations=draw(st.integers(1, 3)),
    )
  elif name == "eshampoo":
    kwargs.update(
      refresh_tolerance=draw(st.sampled_from([0.0, 0.01, 0.5, 1.0])),
      max_qr_iterations=draw(st.integers(1, 3)),
    )
  return kwargs


@st.composite
def runs(draw, name):
  """(settings, parameter specs, gradient seed, per-step gradient scales).

  The run is long enough that every factor, whatever its staggered phase, has its first basis
  and at least one scheduled refresh: ``precondition_frequency + 1`` steps, or one more.
  """
  kwargs = draw(alias_settings(name))
  steps = kwargs["precondition_frequency"] + 1 + draw(st.integers(0, 1))
  scales = draw(st.lists(st.sampled_from(GRADIENT_SCALES), min_size=steps, max_size=steps))
  return kwargs, draw(parameter_specs()), draw(st.integers(0, 2**16)), scales


# -- helpers ------------------------------------------------------------------------------------


def make_params(specs, seed):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(rng.standard_normal(shape), dtype) for k, (shape, dtype) in specs.items()}


def make_grads(specs, seed, scales):
  rng = np.random.default_rng(seed + 1)
  return [
    {
      k: jnp.asarray(scale * rng.standard_normal(shape), dtype)
      for k, (shape, dtype) in specs.items()
    }
    for scale in scales
  ]


def twin_key(key: str) -> str:
  return f"{key}_in_float32"


def with_float32_twins(tree):
  """``tree`` plus a float32 copy of each float16 leaf: same values, run alongside it.

  float16 cannot hold every update float32 can (its largest value is 65504); the twin tells
  whether the update a float16 parameter gets is one float16 can represent.
  """
  twins = {twin_key(k): x.astype(jnp.float32) for k, x in tree.items() if x.dtype == jnp.float16}
  return {**tree, **twins}


def fits(update, twin_update) -> bool:
  """Whether ``update`` must be finite: its float32 twin's update fits its dtype.

  (The blocks compute in float32 and cast only the finished update, so a direction past float16's
  range before the learning rate scales it does not overflow.) A margin of 4 absorbs the
  difference between the runs.
  """
  if update.dtype != jnp.float16:
    return True
  largest = np.max(np.abs(np.asarray(twin_update, np.float64)), initial=0.0)
  return bool(largest <= np.finfo(np.float16).max / 4)


def step_function(tx, traces=None):
  """One optimizer step; appends to ``traces`` whenever JAX traces it."""

  def step(params, state, grads):
    if traces is not None:
      traces.append(None)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return step


def avals(tree):
  """Each leaf's (shape, dtype, weak type): what jit's cache compares."""
  abstract = jax.eval_shape(lambda t: t, tree)
  return jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype), x.weak_type), abstract)


def orthonormality_error(q: np.ndarray) -> float:
  """``max |QᵀQ − I|`` over a stack of bases, in float64."""
  q = q.astype(np.float64)
  gram = np.einsum("bij,bik->bjk", q, q)
  return float(np.max(np.abs(gram - np.eye(q.shape[-1])), initial=0.0))


def floating_leaves(tree):
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]


def all_finite(x) -> bool:
  return bool(np.all(np.isfinite(np.asarray(x, np.float64))))


def layouts(kwargs, shapes_by_key) -> dict[str, soap_optax.FactorLayout]:
  rule = soap_optax.LayoutRule(
    kwargs["max_precond_dim"], kwargs["merge_dims"], kwargs["precondition_1d"], kwargs["block_size"]
  )
  return {key: rule.layout(shape) for key, shape in shapes_by_key.items()}


def note_coverage(layouts, specs):
  """Events for ``--hypothesis-show-statistics``: which cases the examples reached."""
  for key, layout in layouts.items():
    shape, dtype = specs[key]
    event(f"{len(shape)}-D {jnp.dtype(dtype).name} parameter")
    if 1 in shape:
      event("size-1 axis")
    if layout.num_factors and not all(layout.factored):
      event("unrotated axis beside a rotated one")
    if layout.num_blocks > 1:
      event("several blocks")
    if layout.padded:
      event("ragged blocks")


# -- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
@ABSTRACT
@given(data=st.data())
def test_a_step_keeps_the_state_structure_shapes_and_dtypes(name, data):
  """The returned state matches the given one leaf for leaf (weak types too), and the updates
  match the parameters: what lets a jitted step run for ever without recompiling."""
  kwargs, specs, _, _ = data.draw(runs(name), label="run")
  note_coverage(layouts(kwargs, {k: shape for k, (shape, _) in specs.items()}), specs)
  tx = getattr(soap_optax, name)(**kwargs)
  params = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in specs.items()}
  state = jax.eval_shape(tx.init, params)
  new_params, new_state, updates = jax.eval_shape(step_function(tx), params, state, params)

  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert avals(new_state) == avals(state)
  assert avals(updates) == avals(params)
  assert avals(new_params) == avals(params)


@pytest.mark.parametrize("name", ALIASES)
@COMPILED
@given(data=st.data())
def test_steps_are_finite_keep_orthonormal_bases_and_never_recompile(name, data):
  kwargs, specs, seed, scales = data.draw(runs(name), label="run")
  factors = layouts(kwargs, {k: shape for k, (shape, _) in specs.items()})
  assume(any(layout.num_factors for layout in factors.values()))  # a basis to check
  note_coverage(factors, specs)
  tx = getattr(soap_optax, name)(**kwargs)
  params = with_float32_twins(make_params(specs, seed))
  state = tx.init(params)
  param_avals, initial = avals(params), avals(state)
  traces = []
  step = jax.jit(step_function(tx, traces))
  overflowed = set()  # float16 parameters whose (twin's) update float16 cannot hold

  for count, grads in enumerate(make_grads(specs, seed, scales)):
    params, state, updates = step(params, state, with_float32_twins(grads))
    where = f"after step {count + 1} of {len(scales)}"
    assert len(traces) == 1, f"the step was traced again {where}"
    assert avals(updates) == param_avals, where
    assert avals(params) == param_avals, where
    for key, u in updates.items():
      if key in overflowed or not fits(u, updates.get(twin_key(key))):
        event("a float16 update out of float16's range")
        overflowed.add(key)
        continue
      assert all_finite(u), f"update of {key} not finite {where}: {u}"
    assert avals(state) == initial, where
    for leaf in floating_leaves(state):
      assert all_finite(leaf), f"state not finite {where}: {leaf}"

  eigenbasis_state = state.inner_state[1]  # chain: statistics, bases, direction, lr, decay
  assert isinstance(eigenbasis_state, soap_optax.EigenbasisState)
  expected_shapes = {
    f"{key}:{axis}": (layout.num_blocks, n, n)
    for key, layout in layouts(kwargs, {k: p.shape for k, p in params.items()}).items()
    for axis, n in enumerate(layout.factor_sizes)
    if n is not None
  }
  assert {k: q.shape for k, q in eigenbasis_state.basis.items()} == expected_shapes
  if kwargs.get("refresh_tolerance", 0.0) == 0.0:  # no adaptive skip: first basis + a refresh
    for key, refreshes in eigenbasis_state.refreshes.items():
      assert np.all(np.asarray(refreshes) >= 2), f"basis {key} refreshed {refreshes} times"
  for key, q in eigenbasis_state.basis.items():
    assert q.dtype == jnp.float32, key
    error = orthonormality_error(np.asarray(q))
    assert error <= ORTHONORMALITY_TOLERANCE, f"basis {key}: max |QᵀQ − I| = {error:.3g}"


# -- corners the properties once found failing (minimal reproducers, now fixed) ----------------


def two_jitted_steps(tx, grads):
  """The update of the second step (the first only initialises), jitted as users run it."""
  params = jnp.zeros_like(grads)
  step = jax.jit(step_function(tx))
  state = tx.init(params)
  _, state, _ = step(params, state, grads)
  _, _, updates = step(params, state, grads)
  return updates


@pytest.mark.parametrize("name", ["soap", "eigen_adafactor", "eshampoo"])
def test_a_zero_eps_keeps_updates_finite(name):
  tx = getattr(soap_optax, name)(eps=0.0, max_precond_dim=0)  # nothing rotated: cheap to compile
  updates = two_jitted_steps(tx, jnp.array([[1.0, 0.0], [0.0, 0.0]]))
  assert all_finite(updates), updates


def test_normalize_grads_keeps_a_zero_gradient_of_a_scalar_finite():
  updates = two_jitted_steps(soap_optax.soap(normalize_grads=True), jnp.zeros(()))
  assert updates == 0.0, updates


@pytest.mark.parametrize("name", ALIASES)
def test_b1_just_below_one_is_finite(name):
  b1 = 1.0 - 1e-9  # below 1, but 1.0 in float32
  updates = two_jitted_steps(getattr(soap_optax, name)(b1=b1), jnp.ones(2))
  assert all_finite(updates), updates


def test_a_float16_direction_that_overflows_before_the_learning_rate_is_finite():
  # Normalised, then bias-corrected by 1/(1 − b1): a direction of about 2.2e5, an update of 221.
  tx = soap_optax.soap(learning_rate=1e-3, b1=0.999999, normalize_grads=True)
  grads = jnp.array([1e-4, -2e-4, 3e-4], jnp.float16)
  in_float32 = two_jitted_steps(tx, grads.astype(jnp.float32))
  in_float16 = two_jitted_steps(tx, grads)
  assert_close(np.asarray(in_float16, np.float32), in_float32, rtol=1e-2)
