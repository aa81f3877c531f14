"""One-sided and per-parameter factor rules (``factor_axes``) and ``mu_dtype``, against the oracles.

A factor rule leaves some axes of a parameter without a factor, exactly as ``max_precond_dim``
leaves a long axis. The float64 oracles decide their factored axes from ``max_precond_dim`` alone,
so here they are driven through a mask: the oracle of each alias, with the axes the rule's
specification leaves out switched off in every block (no statistic, no basis) before the first
gradient. The masks below are written from the rule's documented meaning (``"smaller"``: the
shortest factorable working axis, ties to the first; ``"larger"``: the longest), not computed by
the library.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import SoapOracle
from oracles_family import EigenAdafactorOracle, EShampooOracle, ShampooOracle
from runner import assert_close, cumulative_update_errors

import soap_optax

# Refreshes at updates 3, 6, 9, 12.
COMMON = dict(learning_rate=1e-2, precondition_frequency=3)
STEPS = 14
ALIASES = ["soap", "shampoo", "eigen_adafactor", "eshampoo"]
FAMILY = ["shampoo", "eigen_adafactor", "eshampoo"]  # the oracles that implement block_size


class _SoapKeeping(SoapOracle):
  """The SOAP oracle with factors only on the working axes ``keep[name]`` marks True."""

  def __init__(self, keep, **kwargs):
    super().__init__(**kwargs)
    self.keep, self._name = keep, None

  def _init_state(self, name, g):
    self._name = name
    super()._init_state(name, g)

  def _work_shape(self, shape):
    work, factored = super()._work_shape(shape)
    keep = self.keep.get(self._name, (True,) * len(work))
    return work, [f and k for f, k in zip(factored, keep, strict=True)]


def _family_keeping(base):
  class Keeping(base):
    """A family oracle with factors only on the working axes ``keep[name]`` marks True."""

    def __init__(self, keep, **kwargs):
      super().__init__(**kwargs)
      self.keep, self._name = keep, None

    def _init_param(self, name, g):
      self._name = name
      super()._init_param(name, g)

    def _new_block(self, shape, param_ndim):
      bs = super()._new_block(shape, param_ndim)
      for axis, kept in enumerate(self.keep.get(self._name, (True,) * len(shape))):
        if not kept:
          bs["factored"][axis] = False
          bs["L"][axis] = None
          bs["refresh_count"][axis] = None
      return bs

  return Keeping


ORACLES = {
  "soap": _SoapKeeping,
  "shampoo": _family_keeping(ShampooOracle),
  "eigen_adafactor": _family_keeping(EigenAdafactorOracle),
  "eshampoo": _family_keeping(EShampooOracle),
}


def _oracle(name, keep, **kwargs):
  kwargs = dict(kwargs)
  kwargs["lr"] = kwargs.pop("learning_rate")
  return ORACLES[name](keep, **kwargs)


def _data(seed, shapes, steps=STEPS):
  rng = np.random.default_rng(seed)
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  grads = [{k: rng.standard_normal(s) for k, s in shapes.items()} for _ in range(steps)]
  return params, grads


def _hand_over_first_bases(oracle, library_state):
  """Gives the oracle the library's first bases (unblocked parameters only).

  A factor that is rank-deficient after the first gradient has no unique eigenbasis, and the
  optimizers whose moments live in the basis depend on the choice; from the same first bases
  on, the library and the oracle must agree.
  """
  bases = optax.tree.get(library_state, "basis")
  assert bases, "nothing to hand over"
  for key, stack in bases.items():
    name, axis = key.rsplit(":", 1)
    oracle.state[name]["Q"][int(axis)] = np.asarray(stack[0], np.float64)


def _compare(name, shapes, keep, *, tol=1e-8, hand_over=False, seed=0, **kwargs):
  """The alias with ``kwargs`` (a factor rule) against its oracle with the ``keep`` masks."""
  params, grads = _data(seed, shapes)
  settings = {**COMMON, **kwargs}
  rule_settings = {k: settings.pop(k) for k in ("factor_axes", "stacked_axes") if k in settings}
  oracle = _oracle(name, keep, **settings)
  with jax.enable_x64(True):
    tx = getattr(soap_optax, name)(**settings, **rule_settings)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state, step = tx.init(p), jax.jit(tx.update)
    q = params
    for i, g in enumerate(grads):
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
      q = oracle.step(q, g)
      if i == 0 and hand_over:
        _hand_over_first_bases(oracle, state)
  errors = cumulative_update_errors(params, p, q)
  assert len(errors) == len(shapes)
  assert all(np.isfinite(e) for e in errors.values()), errors
  assert max(errors.values()) < tol, errors
  return state


def _factor_keys(state):
  stats = optax.tree.get(state, "stats")
  return sorted(stats)


# -- one-sided factors ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
def test_smaller_factors_only_the_shorter_side_as_the_oracle_with_the_other_axis_unfactored(name):
  shapes = {"wide": (4, 12), "tall": (12, 4), "square": (5, 5), "bias": (5,)}
  keep = {"wide": (True, False), "tall": (False, True), "square": (True, False)}
  state = _compare(name, shapes, keep, factor_axes="smaller")
  assert _factor_keys(state) == ["square:0", "tall:1", "wide:0"]


@pytest.mark.parametrize("name", ALIASES)
def test_larger_factors_only_the_longer_side_as_the_oracle_with_the_other_axis_unfactored(name):
  # The longer side of a matrix is rank-deficient after one gradient: the bases are handed over.
  shapes = {"wide": (4, 12), "square": (5, 5), "tensor": (6, 4, 4), "tensor_b": (3, 3, 8)}
  keep = {
    "wide": (False, True),
    "square": (True, False),  # a tie goes to the first axis
    "tensor": (True, False, False),
    "tensor_b": (False, False, True),
  }
  _compare(name, shapes, keep, hand_over=True, factor_axes="larger")


@pytest.mark.parametrize("name", ALIASES)
def test_a_fixed_choice_of_working_axes_counts_axes_after_merging(name):
  # (4, 4, 6) merges to (16, 6) and (3, 4, 4) to (12, 4): axis -1 is the 6 and the 4.
  shapes = {"conv": (4, 4, 6), "tensor": (3, 4, 4)}
  keep = {"conv": (False, True), "tensor": (False, True)}
  _compare(name, shapes, keep, factor_axes=(-1,), merge_dims=True, max_precond_dim=16)


@pytest.mark.parametrize("name", FAMILY)
def test_one_sided_blocks_keep_the_chosen_axis_in_every_block(name):
  # (8, 12) in 4 x 4 blocks: the smaller working axis is 0, so every block factors its rows.
  shapes = {"w": (8, 12), "v": (4, 10)}
  keep = {"w": (True, False), "v": (True, False)}
  _compare(name, shapes, keep, tol=1e-8, factor_axes="smaller", block_size=4)


LAYERS = 3


def _unstack(tree):
  return {f"{name}/{i}": np.asarray(x)[i] for name, x in tree.items() for i in range(LAYERS)}


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_each_stacked_slice_gets_the_one_sided_factor_it_would_get_alone(name):
  params, grads = _data(3, {"kernel": (LAYERS, 4, 12), "head": (LAYERS, 12, 4)})
  sides = {"kernel": (True, False), "head": (False, True)}
  keep = {f"{k}/{i}": m for k, m in sides.items() for i in range(LAYERS)}
  oracle = _oracle(name, keep, **COMMON)
  with jax.enable_x64(True):
    tx = getattr(soap_optax, name)(stacked_axes=1, factor_axes="smaller", **COMMON)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state, step = tx.init(p), jax.jit(tx.update)
    q = _unstack(params)
    for g in grads:
      updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
      p = optax.apply_updates(p, updates)
      q = oracle.step(q, _unstack(g))
  errors = cumulative_update_errors(_unstack(params), _unstack(p), q)
  assert len(errors) == 2 * LAYERS
  assert all(np.isfinite(e) for e in errors.values()), errors
  assert max(errors.values()) < 1e-8, errors
  assert _factor_keys(state) == ["head:1", "kernel:0"]


@pytest.mark.parametrize("exponent", [0.5, 0.25])
def test_one_sided_shampoo_applies_its_exponent_to_the_one_factor(exponent):
  """``exponent`` belongs to each factored axis: one-sided, the step is ``(L + ε)^(−e) G``.

  Float64, no filtering, no grafting, absolute damping; trace scaling is ``tr^(e·0) = 1``. The
  second call uses the factor from the first call's refresh (its statistic ``(1 − β) G₀ G₀ᵀ``).
  """
  rng = np.random.default_rng(7)
  g0, g1 = rng.standard_normal((2, 4, 12))
  beta, eps = 0.9, 1e-3
  with jax.enable_x64(True):
    rule = soap_optax.LayoutRule(factor_axes="smaller")
    tx = optax.chain(
      soap_optax.kronecker_stats(beta, layout=rule),
      soap_optax.eigenbasis_refresh(10, layout=rule, method="eigh"),
      soap_optax.shampoo_precondition(
        exponent, eps, relative_eps=False, grafting="none", trace_scaling=True
      ),
    )
    state = tx.init({"w": jnp.zeros((4, 12))})
    _, state = tx.update({"w": jnp.asarray(g0)}, state)
    updates, _ = tx.update({"w": jnp.asarray(g1)}, state)
  lam, q = np.linalg.eigh((1 - beta) * g0 @ g0.T)
  root = (q * (np.maximum(lam, 0) + eps) ** (-exponent)) @ q.T
  assert_close(updates["w"], root @ g1, rtol=1e-9, atol=1e-12)


# -- per-parameter rules -------------------------------------------------------------------------

MODEL = {
  "embed": (12, 4),
  "layer/attn/kernel": (5, 5),
  "layer/attn/bias": (5,),
  "layer/mlp/kernel": (6, 6),
  "head": (4, 12),
}


@pytest.mark.parametrize("name", ALIASES)
def test_a_mapping_decides_each_parameter_s_factors_from_its_path(name):
  rule = {"embed": "none", "head": "smaller", "attn": "all"}  # mlp: no key, so "all"
  keep = {"embed": (False, False), "head": (True, False)}
  state = _compare(name, MODEL, keep, factor_axes=rule)
  assert _factor_keys(state) == [
    "head:0",
    "layer/attn/kernel:0",
    "layer/attn/kernel:1",
    "layer/mlp/kernel:0",
    "layer/mlp/kernel:1",
  ]


@pytest.mark.parametrize("name", ["soap", "shampoo"])
def test_a_function_of_path_and_shape_decides_each_parameter_s_factors(name):
  seen = []

  def rule(path, shape):
    seen.append((path, shape))
    if path in ("embed", "head"):
      return (0,) if path == "head" else "none"
    return "all"

  keep = {"embed": (False, False), "head": (True, False)}
  _compare(name, MODEL, keep, factor_axes=rule)
  assert ("embed", (12, 4)) in seen and ("layer/attn/kernel", (5, 5)) in seen


def test_rules_compose_with_optax_partition():
  params = {k: jnp.zeros(s) for k, s in MODEL.items()}
  labels = {k: "adam" if k == "embed" else "soap" for k in MODEL}
  tx = optax.partition(
    {"adam": optax.adam(1e-3), "soap": soap_optax.soap(factor_axes={"head": "smaller"})},
    labels,
  )
  state = tx.init(params)
  keys = _factor_keys(state.inner_states["soap"])
  assert keys == [
    "head:0",
    "layer/attn/kernel:0",
    "layer/attn/kernel:1",
    "layer/mlp/kernel:0",
    "layer/mlp/kernel:1",
  ]
  grads = {k: jnp.ones(s) for k, s in MODEL.items()}
  for _ in range(2):
    updates, state = tx.update(grads, state, params)
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
  assert float(jnp.abs(updates["head"]).max()) > 0


def test_a_key_that_matches_no_parameter_of_a_partition_is_an_error():
  # "embed" goes to Adam: a soap rule keyed on it would silently change nothing.
  labels = {k: "adam" if k == "embed" else "soap" for k in MODEL}
  tx = optax.partition(
    {"adam": optax.adam(1e-3), "soap": soap_optax.soap(factor_axes={"embed": "none"})},
    labels,
  )
  with pytest.raises(ValueError, match=r"'embed' matches no parameter.*head"):
    tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})


def test_a_function_rule_passes_through_inject_hyperparams_as_a_static_arg():
  def rule(path, shape):
    return "none" if path == "embed" else "smaller"

  tx = optax.inject_hyperparams(soap_optax.soap, static_args=("factor_axes",))(
    learning_rate=1e-3, factor_axes=rule
  )
  state = tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})
  assert _factor_keys(state) == [
    "head:0",
    "layer/attn/kernel:0",
    "layer/mlp/kernel:0",
  ]


# -- invalid rules name the parameter ------------------------------------------------------------


@pytest.mark.parametrize("name", ALIASES)
def test_an_axis_that_does_not_exist_raises_naming_the_parameter(name):
  tx = getattr(soap_optax, name)(factor_axes={"mlp": (2,)})
  with pytest.raises(ValueError, match=r"parameter 'layer/mlp/kernel'.*\[2\] that do not exist"):
    tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})


def test_a_function_returning_an_invalid_choice_raises_naming_the_parameter():
  tx = soap_optax.soap(factor_axes=lambda path, shape: "left" if path == "head" else "all")
  with pytest.raises(ValueError, match=r"head.*'left'"):
    tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})


def test_a_misspelt_mapping_key_raises_naming_it_and_the_parameters():
  tx = soap_optax.soap(factor_axes={"embedding": "none"})
  with pytest.raises(ValueError, match=r"'embedding' matches no parameter.*'embed'"):
    tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})


@pytest.mark.parametrize("bad", ["left", 1.5, ("0",), {"embed": "one"}, {"(": "none"}])
def test_an_invalid_rule_raises_when_built(bad):
  with pytest.raises(ValueError, match="factor"):
    soap_optax.LayoutRule(factor_axes=bad)


# -- mu_dtype ----------------------------------------------------------------------------------


MU_STATES = {
  # alias: (its first-moment field, another moment, which keeps float32)
  "soap": ("mu", "nu"),
  "shampoo": ("mu", "graft_nu"),
  "eigen_adafactor": ("mu", "nu_row"),
  "eshampoo": ("mu", "nu"),
}


@pytest.mark.parametrize("name", ALIASES)
def test_mu_dtype_stores_the_first_moment_alone_in_that_dtype(name):
  tx = getattr(soap_optax, name)(mu_dtype=jnp.bfloat16)
  state = tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})
  first, other = MU_STATES[name]
  mus = jax.tree.leaves(optax.tree.get(state, first))
  others = jax.tree.leaves(optax.tree.get(state, other))
  assert len(mus) == len(MODEL) and others
  assert {x.dtype for x in mus} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in others} == {jnp.dtype(jnp.float32)}
  # moment_dtype still sets the rest; mu_dtype wins for the first moment.
  tx = getattr(soap_optax, name)(moment_dtype=jnp.bfloat16, mu_dtype=jnp.float32)
  state = tx.init({k: jnp.zeros(s) for k, s in MODEL.items()})
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, first))} == {jnp.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves(optax.tree.get(state, other))} == {
    jnp.dtype(jnp.bfloat16)
  }


@pytest.mark.parametrize("name", ALIASES)
def test_a_bf16_first_moment_follows_the_oracle_within_bf16_rounding(name):
  shapes = {"square": (5, 5), "wide": (4, 12), "bias": (5,)}
  params, grads = _data(4, shapes)
  settings = dict(COMMON, factor_axes="smaller")
  tx = getattr(soap_optax, name)(mu_dtype=jnp.bfloat16, **settings)
  p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  state, step = tx.init(p), jax.jit(tx.update)
  for g in grads:
    updates, state = step({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}, state, p)
    p = optax.apply_updates(p, updates)
  settings.pop("factor_axes")
  oracle = _oracle(name, {"square": (True, False), "wide": (True, False)}, **settings)
  q = params
  for g in grads:
    q = oracle.step(q, g)
  errors = cumulative_update_errors(params, p, q)
  assert len(errors) == len(shapes) and all(np.isfinite(e) for e in errors.values()), errors
  # bf16 keeps 8 significant bits (rounding 2^-9 ≈ 2e-3 per store); measured 2.2e-3 to 2.7e-3
  # here, against 2e-6 to 3e-6 with a float32 first moment.
  assert max(errors.values()) < 1e-2, errors
