"""Specification of the static factor layout: which axes of a parameter get a Kronecker factor."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import factor_layout as reference_layout
from runner import assert_equal

import soap_optax
from soap_optax import FactorLayout, LayoutRule


@pytest.mark.parametrize(
  "shape, max_dim, merged",
  [
    ((3, 3, 64, 128), 10000, (576, 128)),  # a Flax HWIO convolution kernel
    ((2, 3, 4), 100, (24,)),
    ((10, 10, 10), 100, (100, 10)),
    ((100, 100), 10000, (10000,)),  # a product equal to the limit still merges
    ((4, 5, 6), 20, (20, 6)),
  ],
)
def test_merge_dims_merges_consecutive_axes_while_the_product_fits(shape, max_dim, merged):
  assert soap_optax._layout.merge_dims(shape, max_dim) == merged


@pytest.mark.parametrize(
  "shape, merged",
  [
    ((20000, 5), (20000, 5)),
    ((5, 20000), (5, 20000)),
    ((3, 20000, 2), (3, 20000, 2)),
    ((2, 3, 20000, 4, 5), (6, 20000, 20)),
  ],
)
def test_merge_dims_keeps_an_axis_longer_than_the_limit_on_its_own(shape, merged):
  assert soap_optax._layout.merge_dims(shape, 10000) == merged


@pytest.mark.parametrize(
  "shape, merged",
  [
    ((1, 4), (4,)),
    ((4, 1), (4,)),
    ((1, 1), (1,)),
    ((1, 20000), (20000,)),
    ((3, 20000, 1), (3, 20000)),
    ((2, 1, 3), (6,)),
  ],
)
def test_merge_dims_absorbs_size_one_axes(shape, merged):
  assert soap_optax._layout.merge_dims(shape, 10000) == merged


@pytest.mark.parametrize(
  "shape",
  [(3, 3, 64, 128), (1, 1), (7, 1, 20000, 3), (2, 2, 2, 2, 2), (9, 11), (1, 5, 1)],
)
@pytest.mark.parametrize("max_dim", [0, 1, 4, 16, 10000])
def test_merge_dims_preserves_the_number_of_elements(shape, max_dim):
  assert math.prod(soap_optax._layout.merge_dims(shape, max_dim)) == math.prod(shape)


@pytest.mark.parametrize("shape", [(3, 3, 64, 128), (2, 9, 5, 3), (7, 7, 7), (30, 2, 40)])
def test_merged_axes_exceed_the_limit_only_when_a_single_axis_does(shape):
  max_dim = 32
  for size in soap_optax._layout.merge_dims(shape, max_dim):
    assert size <= max_dim or size in shape


def test_layout_rule_gives_a_conv_kernel_two_factors_after_merging():
  layout = LayoutRule(10000, merge_dims=True).layout((3, 3, 64, 128))
  assert layout == FactorLayout((3, 3, 64, 128), (576, 128), (True, True))


def test_layout_rule_without_merging_keeps_the_shape():
  layout = LayoutRule(10000).layout((3, 3, 64, 128))
  assert layout.working_shape == (3, 3, 64, 128)
  assert layout.factored == (True, True, True, True)


def test_an_axis_longer_than_the_limit_gets_no_factor_while_the_others_do():
  layout = LayoutRule(16).layout((3, 20, 2))
  assert layout.factored == (True, False, True)
  assert layout.factor_sizes == (3, None, 2)
  assert layout.num_factors == 2


def test_a_scalar_never_gets_a_factor():
  for rule in (LayoutRule(), LayoutRule(10, merge_dims=True, precondition_1d=True)):
    assert rule.layout(()) == FactorLayout((), (), ())


def test_a_vector_gets_no_factor_by_default():
  layout = LayoutRule().layout((7,))
  assert layout == FactorLayout((7,), (7,), (False,))


def test_a_vector_gets_a_factor_with_precondition_1d():
  layout = LayoutRule(precondition_1d=True).layout((7,))
  assert layout == FactorLayout((7,), (7,), (True,))


def test_precondition_1d_leaves_a_vector_longer_than_the_limit_unfactored():
  rule = LayoutRule(5, precondition_1d=True)
  assert rule.layout((5,)).factored == (True,)
  assert rule.layout((6,)).factored == (False,)


def test_vectors_are_never_merged():
  assert LayoutRule(4, merge_dims=True).layout((7,)).working_shape == (7,)


@pytest.mark.parametrize("shape", [(), (5,), (1,), (3, 4), (1, 3), (2, 3, 4), (3, 3, 64, 128)])
@pytest.mark.parametrize("merge", [False, True])
def test_max_precond_dim_zero_factors_nothing(shape, merge):
  layout = LayoutRule(0, merge_dims=merge, precondition_1d=True).layout(shape)
  assert layout.num_factors == 0
  assert math.prod(layout.working_shape) == math.prod(shape)


@pytest.mark.parametrize(
  "shape", [(5,), (6, 4), (3, 20000, 2), (1, 4), (4, 1), (3, 3, 64, 128), (2, 1, 3), (7, 7, 7)]
)
@pytest.mark.parametrize("max_dim", [0, 6, 49, 10000])
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("precondition_1d", [False, True])
def test_layout_agrees_with_the_reference_rule(shape, max_dim, merge, precondition_1d):
  """Away from 0-D parameters (where the reference adds a useless 1x1 factor) the rules agree."""
  layout = LayoutRule(max_dim, merge, precondition_1d).layout(shape)
  working, factored = reference_layout(shape, max_dim, merge, precondition_1d)
  assert layout.working_shape == tuple(working)
  assert layout.factored == tuple(factored)


def test_layout_is_plain_python():
  layout = LayoutRule(16).layout(np.array([3, 20, 2]))
  for value in (*layout.shape, *layout.working_shape):
    assert type(value) is int
  assert all(type(flag) is bool for flag in layout.factored)


def test_layout_and_rule_are_hashable_and_compare_by_value():
  rule = LayoutRule(16, merge_dims=True)
  assert rule == LayoutRule(16, merge_dims=True)
  assert hash(rule) == hash(LayoutRule(16, merge_dims=True))
  assert hash(rule.layout((4, 5))) == hash(rule.layout((4, 5)))
  assert len({rule.layout((4, 5)), rule.layout((4, 5)), rule.layout((5, 4))}) == 2


def test_layout_and_rule_are_frozen():
  rule = LayoutRule()
  layout = rule.layout((3, 4))
  with pytest.raises(dataclasses.FrozenInstanceError):
    rule.max_precond_dim = 3
  with pytest.raises(dataclasses.FrozenInstanceError):
    layout.factored = (False, False)


def test_layout_is_static_under_jit():
  """Computed from a traced array's shape, the layout is the same concrete value."""
  rule = LayoutRule(5)
  seen = []

  @jax.jit
  def f(x):
    seen.append(rule.layout(x.shape))
    return x

  f(jnp.zeros((6, 4)))
  assert seen == [FactorLayout((6, 4), (6, 4), (False, True))]


def test_a_layout_rule_can_be_a_static_argument_of_jit():
  def count_factors(x, rule):
    return jnp.sum(x) + rule.layout(x.shape).num_factors

  f = jax.jit(count_factors, static_argnums=1)
  assert float(f(jnp.zeros((2, 3)), LayoutRule())) == 2.0
  assert float(f(jnp.zeros((2, 3)), LayoutRule(2))) == 1.0


def test_negative_max_precond_dim_raises_value_error():
  with pytest.raises(ValueError, match="max_precond_dim"):
    LayoutRule(-1)


def test_max_precond_dim_accepts_numpy_integers():
  rule = LayoutRule(np.int64(8))
  assert type(rule.max_precond_dim) is int
  assert rule == LayoutRule(8)


def test_a_traced_max_precond_dim_is_rejected_with_a_value_error():
  with pytest.raises(ValueError, match="static"):
    jax.jit(lambda n: LayoutRule(n).max_precond_dim)(3)


# -- stacked parameters (stacked_axes) ------------------------------------------------------------

STACKED_CASES = [
  ((3, 5, 7), {}),
  ((3, 10, 7), {"block_size": 4}),
  ((2, 3, 10, 7), {"block_size": 4}),
  ((4, 6), {"block_size": 4, "precondition_1d": True}),
  ((2, 2, 3, 8), {"merge_dims": True, "max_precond_dim": 6}),
  ((5,), {}),
]


def _stack_axes(shape):
  return 2 if len(shape) == 4 and shape[:2] == (2, 3) else 1


@pytest.mark.parametrize("shape, settings", STACKED_CASES)
def test_each_slice_of_a_stacked_parameter_gets_the_layout_of_a_parameter_of_its_own(
  shape, settings
):
  k = _stack_axes(shape)
  stacked = LayoutRule(stacked_axes=k, **settings).layout(shape)
  alone = LayoutRule(**settings).layout(shape[k:])
  assert stacked.stack_shape == shape[:k]
  assert stacked.working_shape == alone.working_shape
  assert stacked.factor_sizes == alone.factor_sizes
  assert stacked.num_blocks == math.prod(shape[:k]) * alone.num_blocks


def _numpy_blocks(x, k, block):
  """Slice after slice, each slice's zero-padded blocks in C order over its block grid."""
  slices = x.reshape(-1, *x.shape[k:])
  out = []
  for piece in slices:
    grid = [-(-n // block) for n in piece.shape]
    padded = np.zeros([g * block for g in grid])
    padded[tuple(slice(0, n) for n in piece.shape)] = piece
    for index in np.ndindex(*grid):
      out.append(padded[tuple(slice(i * block, (i + 1) * block) for i in index)])
  return np.stack(out)


@pytest.mark.parametrize("shape", [(3, 10, 7), (2, 3, 10, 7), (2, 9)])
def test_stacked_blocks_are_each_slice_s_blocks_one_slice_after_another(shape):
  k = _stack_axes(shape)
  layout = LayoutRule(stacked_axes=k, block_size=4, precondition_1d=True).layout(shape)
  x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape) + 1
  blocks = soap_optax._layout.to_blocks(jnp.asarray(x), layout)
  assert_equal(np.asarray(blocks), _numpy_blocks(x, k, 4))


@pytest.mark.parametrize("shape, settings", STACKED_CASES)
def test_from_blocks_restores_a_stacked_parameter(shape, settings):
  layout = LayoutRule(stacked_axes=_stack_axes(shape), **settings).layout(shape)
  x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
  blocks = soap_optax._layout.to_blocks(x, layout)
  assert blocks.shape == layout.blocked_shape
  assert_equal(np.asarray(soap_optax._layout.from_blocks(blocks, layout)), x)


def test_padding_and_real_counts_repeat_for_every_slice():
  stacked = LayoutRule(stacked_axes=1, block_size=4).layout((3, 10, 7))
  alone = LayoutRule(block_size=4).layout((10, 7))
  for axis in (0, 1):
    assert_equal(stacked.padding(axis), np.tile(alone.padding(axis), (3, 1)))
  assert_equal(stacked.real_counts(), np.tile(alone.real_counts(), 3))
  assert stacked.real_counts().sum() == 3 * 10 * 7


def test_negative_stacked_axes_raises_value_error():
  with pytest.raises(ValueError, match="stacked_axes"):
    LayoutRule(stacked_axes=-1)


def test_a_parameter_with_fewer_axes_than_stacked_axes_is_named_in_the_error():
  params = {"layers": {"kernel": jnp.zeros((2, 3, 3))}, "head": {"bias": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"head.*bias.*stacked_axes=2"):
    soap_optax.soap(stacked_axes=2).init(params)


# -- factor rules (factor_axes) ------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape, choice, factored",
  [
    ((384, 1536), "smaller", (True, False)),
    ((384, 1536), "larger", (False, True)),
    ((1536, 384), "smaller", (False, True)),
    ((64, 64), "smaller", (True, False)),  # ties go to the first axis
    ((64, 64), "larger", (True, False)),
    ((4, 8, 6), "smaller", (True, False, False)),
    ((4, 8, 6), "larger", (False, True, False)),
    ((4, 8, 6), "none", (False, False, False)),
    ((4, 8, 6), (0, -1), (True, False, True)),
    ((4, 8, 6), "all", (True, True, True)),
  ],
)
def test_factor_axes_keeps_the_chosen_axes(shape, choice, factored):
  assert LayoutRule(factor_axes=choice).layout(shape).factored == factored


def test_one_sided_choices_pick_among_the_axes_max_precond_dim_allows():
  # The 20000-long axis never gets a factor, so the "larger" of the factorable axes is axis 0.
  assert LayoutRule(factor_axes="larger").layout((384, 20000)).factored == (True, False)
  assert LayoutRule(factor_axes=(1,)).layout((384, 20000)).factored == (False, False)


def test_an_unfactored_axis_is_left_as_max_precond_dim_leaves_a_long_one():
  one_sided = LayoutRule(factor_axes="smaller").layout((384, 1536))
  long_axis = LayoutRule(max_precond_dim=1024).layout((384, 1536))
  assert one_sided == long_axis


def test_factor_axes_count_working_axes_after_merging_and_stacking():
  merged = LayoutRule(max_precond_dim=16, merge_dims=True, factor_axes="larger")
  assert merged.layout((4, 4, 6)).working_shape == (16, 6)
  assert merged.layout((4, 4, 6)).factored == (True, False)
  stacked = LayoutRule(stacked_axes=1, factor_axes=(0,)).layout((12, 384, 1536))
  assert stacked.factored == (True, False) and stacked.stack_shape == (12,)


def test_one_sided_blocks_decide_by_the_working_axis_not_the_block():
  # (256, 1024) in 128-blocks: every block is square, the parameter's rows are the shorter side.
  layout = LayoutRule(block_size=128, factor_axes="larger").layout((256, 1024))
  assert layout.block_shape == (128, 128) and layout.factored == (False, True)


def test_a_mapping_rule_takes_the_first_key_found_in_the_path_and_all_for_the_rest():
  rule = LayoutRule(factor_axes={"embed|head": "none", "attn": "smaller", "": "larger"})
  assert rule.layout((256, 384), name="embed").factored == (False, False)
  assert rule.layout((384, 1152), name="layer0/attn/qkv").factored == (True, False)
  assert rule.layout((384, 1536), name="layer0/mlp/up").factored == (False, True)
  assert LayoutRule(factor_axes={"x": "none"}).layout((4, 5), name="y").factored == (True, True)


def test_a_function_rule_receives_the_path_and_the_full_shape():
  calls = []

  def rule(path, shape):
    calls.append((path, shape))
    return "smaller"

  layout = LayoutRule(stacked_axes=1, factor_axes=rule).layout((3, 4, 5), name="layers/w")
  assert calls == [("layers/w", (3, 4, 5))] and layout.factored == (True, False)


def test_a_per_parameter_rule_needs_the_parameter_s_path():
  with pytest.raises(ValueError, match="per parameter"):
    LayoutRule(factor_axes={"x": "none"}).layout((4, 5))


def test_rules_with_mappings_compare_by_value_and_hash():
  a = LayoutRule(factor_axes={"embed": "none", "head": (0,)})
  b = LayoutRule(factor_axes={"embed": "none", "head": [0]})
  assert a == b and hash(a) == hash(b)
  assert a != LayoutRule(factor_axes={"embed": "none"})


def test_an_axis_that_does_not_exist_is_an_error_naming_the_parameter():
  with pytest.raises(ValueError, match=r"parameter 'w'.*\[2\]"):
    LayoutRule(factor_axes=(2,)).layout((3, 4), name="w")
