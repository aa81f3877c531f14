"""How a parameter's axes map onto blocks and Kronecker factors.

Every block of a composition asks the same question of a parameter — after which reshape, cut
into which blocks, which axes carry a factor — and must get the same answer. That answer depends
only on the parameter's shape (and, with a per-parameter ``factor_axes`` rule, its path) and on
the rule's settings, so it is decided here, statically, in plain Python: nothing traced, nothing
that could differ between blocks. :func:`to_blocks` and
:func:`from_blocks` are the only array code: they move a parameter-shaped array to the layout
every block computes in and back.

The working layout of a parameter is ``(num_blocks, *block_shape)``. Without ``block_size`` it is
the (merged) parameter with a leading axis of length one; with it, every axis longer than
``block_size`` is cut into blocks of that length (the last one padded with zeros when the axis
does not divide), and each block gets its own factors, as Distributed Shampoo's
``max_preconditioner_dim`` does. With ``stacked_axes``, the leading axes of a parameter stack
independent parameters (the layers of a model scanned over its depth): each slice is laid out as
above and the slices' blocks follow one another on the block axis, so a stack of ``L`` layers
costs one set of batched operations, not ``L``. With ``factor_axes``, only some of the axes that
may carry a factor get one (one side of a matrix, or a choice per parameter); the others are left
as an axis longer than ``max_precond_dim`` is: no statistic, the identity for a basis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np


def merge_dims(shape: Sequence[int], max_precond_dim: int) -> tuple[int, ...]:
  """Greedily merges consecutive axes, left to right, while their product fits.

  This follows the rule of the SOAP reference implementation, so that e.g. a Flax HWIO
  convolution kernel ``(3, 3, 64, 128)`` becomes ``(576, 128)`` with ``max_precond_dim=10000``.
  An axis that alone exceeds ``max_precond_dim`` stays on its own (and later gets no factor).

  Args:
    shape: the parameter's shape.
    max_precond_dim: the largest merged axis length allowed.

  Returns:
    The merged shape; its product equals the product of ``shape``.

  Examples:
    >>> soap_optax._layout.merge_dims((3, 3, 64, 128), max_precond_dim=10000)
    (576, 128)
    >>> soap_optax._layout.merge_dims((20000, 4, 4), max_precond_dim=100)
    (20000, 16)
  """
  merged = []
  run = 1
  for size in shape:
    if run * size > max_precond_dim:
      if run > 1:
        merged.append(run)
        run = size
      else:
        merged.append(size)
        run = 1
    else:
      run *= size
  if run > 1 or not merged:
    merged.append(run)
  return tuple(merged)


@dataclasses.dataclass(frozen=True)
class FactorLayout:
  """The static factor layout of one parameter.

  Attributes:
    shape: the parameter's own shape.
    working_shape: the shape after merging axes.
    factored: one flag per working axis: whether that axis has a factor (in every block).
    block_shape: the length of each working axis within one block (the working shape itself
      when the parameter is not cut into blocks).
    stack_shape: the leading axes of ``shape`` that stack independent slices (empty unless the
      rule has ``stacked_axes``); ``working_shape`` describes one slice.
  """

  shape: tuple[int, ...]
  working_shape: tuple[int, ...]
  factored: tuple[bool, ...]
  block_shape: tuple[int, ...] = ()
  stack_shape: tuple[int, ...] = ()

  def __post_init__(self):
    if not self.block_shape:  # () means unblocked (a 0-D parameter's block is () too)
      object.__setattr__(self, "block_shape", self.working_shape)

  @property
  def num_slices(self) -> int:
    """How many independent slices the stack axes hold (1 without ``stacked_axes``)."""
    return math.prod(self.stack_shape)

  @property
  def grid(self) -> tuple[int, ...]:
    """Blocks per working axis (of one slice)."""
    return tuple(
      -(-n // b) if b else 1 for n, b in zip(self.working_shape, self.block_shape, strict=True)
    )

  @property
  def num_blocks(self) -> int:
    """Blocks of the whole parameter: every slice's blocks, slice after slice."""
    return self.num_slices * math.prod(self.grid)

  @property
  def blocked_shape(self) -> tuple[int, ...]:
    """The shape every block computes in: ``(num_blocks, *block_shape)``."""
    return (self.num_blocks, *self.block_shape)

  @property
  def num_factors(self) -> int:
    return sum(self.factored)

  @property
  def factor_sizes(self) -> tuple[int | None, ...]:
    """The side of each axis's factor (one per block), or None for an axis without one."""
    return tuple(b if f else None for b, f in zip(self.block_shape, self.factored, strict=True))

  @property
  def padded(self) -> bool:
    """Whether some block reaches past the end of its axis (ragged blocks, zero-padded)."""
    return any(
      g * b != n for g, b, n in zip(self.grid, self.block_shape, self.working_shape, strict=True)
    )

  def padding(self, axis: int) -> np.ndarray | None:
    """``(num_blocks, block_shape[axis])`` bools, True on the zero padding of ragged blocks.

    None when that axis has no padding. Padding coordinates carry zero gradient; the refresh
    keeps them out of the real eigenbasis (see ``_eigenbasis``).
    """
    n, b, g = self.working_shape[axis], self.block_shape[axis], self.grid[axis]
    if g * b == n:
      return None
    positions = np.arange(g)[:, None] * b + np.arange(b)[None, :]  # (grid[axis], b)
    block_index = np.indices(self.grid)[axis].reshape(-1)  # each block's index along `axis`
    return np.tile(positions[block_index] >= n, (self.num_slices, 1))

  def real_counts(self) -> np.ndarray:
    """Per block, how many of its entries belong to the parameter (the rest is padding)."""
    counts = np.ones(self.grid, np.int64)
    for axis, (n, b, g) in enumerate(
      zip(self.working_shape, self.block_shape, self.grid, strict=True)
    ):
      lengths = np.minimum(b, n - np.arange(g) * b)
      shape = [1] * len(self.grid)
      shape[axis] = g
      counts = counts * lengths.reshape(shape)
    return np.tile(counts.reshape(-1), self.num_slices)


def to_blocks(x: jax.Array, layout: FactorLayout) -> jax.Array:
  """A parameter-shaped array in the working layout ``(num_blocks, *block_shape)``."""
  x = x.reshape(layout.num_slices, *layout.working_shape)
  if layout.num_blocks == layout.num_slices and not layout.padded:
    return x
  sizes = zip(layout.working_shape, layout.block_shape, layout.grid, strict=True)
  if layout.padded:
    x = jnp.pad(x, [(0, 0)] + [(0, g * b - n) for n, b, g in sizes])
  rank = len(layout.grid)
  pairs = [d for g, b in zip(layout.grid, layout.block_shape, strict=True) for d in (g, b)]
  x = x.reshape(layout.num_slices, *pairs)
  # Slice first, then the block's grid position, then its contents: slice-major block order.
  x = x.transpose([0] + [1 + 2 * i for i in range(rank)] + [2 + 2 * i for i in range(rank)])
  return x.reshape(layout.blocked_shape)


def from_blocks(x: jax.Array, layout: FactorLayout) -> jax.Array:
  """The inverse of :func:`to_blocks`: back to the parameter's shape (padding dropped)."""
  if layout.num_blocks == layout.num_slices and not layout.padded:
    return x.reshape(layout.shape)
  rank = len(layout.grid)
  x = x.reshape(layout.num_slices, *layout.grid, *layout.block_shape)
  x = x.transpose([0] + [j for i in range(rank) for j in (1 + i, 1 + rank + i)])
  x = x.reshape(
    [layout.num_slices] + [g * b for g, b in zip(layout.grid, layout.block_shape, strict=True)]
  )
  if layout.padded:
    x = x[(slice(None),) + tuple(slice(0, n) for n in layout.working_shape)]
  return x.reshape(layout.shape)


def group_key(layout: FactorLayout) -> tuple:
  """What parameters must share to be computed as one stack: equal blocks, equally factored.

  Two parameters with equal working shape, block shape and factored axes have blocks of the same
  shape, padded in the same places, so their working layouts concatenate along the block axis
  into the working layout of a stack of both (:func:`stacked_layout`).
  """
  return (layout.working_shape, layout.block_shape, layout.factored)


def stacked_layout(layouts: Sequence[FactorLayout]) -> FactorLayout:
  """The layout of parameters of one :func:`group_key` concatenated along the block axis.

  It is the layout of a stack of their slices (``stack_shape = (total slices,)``): blocks in the
  members' order, slice after slice, each slice's padding where it was, so every property that
  the blocks read (``num_blocks``, ``padding``, ``real_counts``) is the members' concatenated.
  A single layout is returned as it is.
  """
  if len(layouts) == 1:
    return layouts[0]
  first = layouts[0]
  assert all(group_key(lay) == group_key(first) for lay in layouts), "one group key"
  slices = sum(lay.num_slices for lay in layouts)
  return FactorLayout(
    (slices, *first.working_shape),
    first.working_shape,
    first.factored,
    first.block_shape,
    (slices,),
  )


# Which working axes of a parameter carry a factor, among those the other settings allow.
FactorChoice = Literal["all", "smaller", "larger", "none"] | tuple[int, ...]
# A choice for every parameter, or one decided per parameter from its path and shape.
FactorAxes = (
  FactorChoice | Callable[[str, tuple[int, ...]], FactorChoice] | Mapping[str, FactorChoice]
)
_NAMED_CHOICES = ("all", "smaller", "larger", "none")


def _check_choice(choice, where: str) -> FactorChoice:
  """``choice`` as a name or a tuple of ints, or a ValueError saying what is accepted."""
  if isinstance(choice, str):
    if choice in _NAMED_CHOICES:
      return choice  # type: ignore[return-value]  # one of the literal names
  elif isinstance(choice, Sequence) and all(
    isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in choice
  ):
    return tuple(int(a) for a in choice)
  raise ValueError(
    f"{where}: a factor choice is one of {_NAMED_CHOICES} or a tuple of working-axis indices, "
    f"got {choice!r}."
  )


def _chosen(choice: FactorChoice, working: tuple[int, ...], allowed: tuple[bool, ...]):
  """The factored flags that ``choice`` keeps of ``allowed`` (per working axis)."""
  candidates = [axis for axis, ok in enumerate(allowed) if ok]
  if isinstance(choice, tuple):
    rank = len(working)
    bad = [a for a in choice if not -rank <= a < rank]
    if bad:
      raise ValueError(
        f"factor axes {choice} name axes {bad} that do not exist: the working shape is "
        f"{working} ({rank} axes, after stacked_axes and merge_dims)."
      )
    keep = [a % rank for a in choice]
  elif choice == "all":
    keep = candidates
  elif choice == "none" or not candidates:
    keep = []
  elif choice == "smaller":
    # Ties go to the first axis: the least (length, index).
    keep = [min(candidates, key=lambda a: (working[a], a))]
  else:  # "larger"; ties go to the first axis too.
    keep = [max(candidates, key=lambda a: (working[a], -a))]
  return tuple(ok and axis in keep for axis, ok in enumerate(allowed))


def _static_int(name: str, value, *, allow_none: bool = False):
  """``value`` as a Python int, or a ValueError saying that it decides array shapes."""
  if value is None and allow_none:
    return None
  if isinstance(value, bool) or not isinstance(value, int):
    try:
      return int(value)  # A NumPy or concrete JAX integer.
    except Exception as e:  # A tracer: shapes cannot depend on it.
      raise ValueError(
        f"{name} must be a static Python int (it decides array shapes); with "
        f"optax.inject_hyperparams, list it in static_args."
      ) from e
  return value


@dataclasses.dataclass(frozen=True)
class LayoutRule:
  """Decides, from a parameter's shape (and path), how it is blocked and which axes get a factor.

  One rule is shared by every block of a composition (the aliases build one and hand it to each
  block), which is what guarantees that the statistics, the bases and the rotated moments agree.

  Attributes:
    max_precond_dim: axes (of a block) longer than this get no factor: they stay unrotated,
      while the other axes of the same parameter are still rotated. ``0`` rotates nothing.
    merge_dims: merge consecutive axes greedily while their product stays at most
      ``max_precond_dim`` (see :func:`merge_dims`).
    precondition_1d: give 1-D parameters (biases, norm scales) a factor too, when their length
      (block length) is at most ``max_precond_dim``. 0-D parameters never get one.
    block_size: cut every working axis longer than this into blocks of this length, each with
      its own factors (Distributed Shampoo's ``max_preconditioner_dim``; the last block of an
      axis that does not divide is zero-padded). ``None`` (the default, the SOAP reference's
      behaviour) never cuts.
    stacked_axes: how many leading axes of every parameter stack independent parameters, as a
      model scanned over its layers stores them (``nn.scan``, ``nnx.scan``): each slice gets the
      layout and factors it would get on its own, and the optimizer's program no longer grows
      with the stack's length. ``0`` (the default) treats every axis as the parameter's own.
      The rule applies to every parameter it is given: use it on the stacked part of a model
      (``optax.partition``), not on parameters without a stack axis.
    factor_axes: which of the axes that the settings above allow a factor actually get one.
      ``"all"`` (the default, the SOAP reference's behaviour) factors all of them; ``"smaller"``
      or ``"larger"`` only the shortest or the longest of them (by working-axis length; ties go
      to the first axis, so on a square matrix both pick axis 0, the input side of a Flax
      ``Dense`` kernel); ``"none"`` none; a tuple of working-axis indices (negative ones count
      from the end) those of them. Every other axis is left exactly as ``max_precond_dim`` leaves
      a long one: no statistic, no basis (the identity), its coordinates treated diagonally by
      the optimizer after the rotation. Axes are counted in the working shape of one block:
      after ``stacked_axes`` are set aside and ``merge_dims`` has merged (with ``block_size``,
      every block of a parameter gets the same axes). Per parameter: a function
      ``(path, shape) -> choice`` (``path`` as in the state's keys, e.g. ``"layer0/mlp/kernel"``,
      ``shape`` the parameter's full shape), or a mapping ``{regular expression: choice}`` whose
      first key found (``re.search``) in the path decides; a parameter that no key matches gets
      ``"all"``. A key that matches no parameter of the tree given to ``init`` is an error (a
      misspelt name would otherwise change nothing): with ``optax.partition``, give each part's
      rule only the keys of its own parameters.
    group_equal_layouts: compute parameters whose working layouts are equal together, as one
      stack: parameters with the same working shape, block shape and factored axes (and compute
      dtype, and sharding under explicit sharding) are concatenated along the block axis, so
      statistics, refreshes, rotations and moments run once per *group* and the compiled update
      stops growing with the number of parameters (a model written layer by layer then compiles
      like one scanned with ``stacked_axes``). Each parameter's update is exactly what it would
      be alone. The state is then keyed by group (see :func:`~soap_optax.kronecker_stats`), and
      every block of the chain must be built with the same rule. Under automatic sharding on a
      mesh a parameter's type does not say how it is divided, so there each parameter is a group
      of its own (keyed as above, placed as the parameter is): grouping saves compile time on
      one device and under explicit sharding.

  Examples:
    >>> import soap_optax
    >>> soap_optax.LayoutRule(max_precond_dim=1024).layout((512, 4096)).factored
    (True, False)
    >>> blocked = soap_optax.LayoutRule(block_size=128).layout((384, 200))
    >>> blocked.blocked_shape, blocked.factor_sizes  # 3 × 2 blocks; the last column padded
    ((6, 128, 128), (128, 128))
    >>> stacked = soap_optax.LayoutRule(stacked_axes=1).layout((12, 384, 1536))
    >>> stacked.blocked_shape, stacked.factor_sizes  # 12 layers, each with its own two factors
    ((12, 384, 1536), (384, 1536))
    >>> soap_optax.LayoutRule(factor_axes="smaller").layout((384, 1536)).factor_sizes
    (384, None)
    >>> per_parameter = soap_optax.LayoutRule(factor_axes={"embed|head": "none", "attn": "all"})
    >>> per_parameter.layout((256, 384), name="embed").factored
    (False, False)
  """

  max_precond_dim: int = 10000
  merge_dims: bool = False
  precondition_1d: bool = False
  block_size: int | None = None
  stacked_axes: int = 0
  factor_axes: FactorAxes = "all"
  group_equal_layouts: bool = False

  def __post_init__(self):
    object.__setattr__(
      self, "max_precond_dim", _static_int("max_precond_dim", self.max_precond_dim)
    )
    if self.max_precond_dim < 0:
      raise ValueError(f"max_precond_dim must be >= 0, got {self.max_precond_dim}.")
    block_size = _static_int("block_size", self.block_size, allow_none=True)
    object.__setattr__(self, "block_size", block_size)
    if block_size is not None and block_size < 1:
      raise ValueError(f"block_size must be None or an int >= 1, got {block_size}.")
    object.__setattr__(self, "stacked_axes", _static_int("stacked_axes", self.stacked_axes))
    if self.stacked_axes < 0:
      raise ValueError(f"stacked_axes must be >= 0, got {self.stacked_axes}.")
    rule = self.factor_axes
    if isinstance(rule, Mapping):
      # Kept as a tuple of pairs, so that the rule stays hashable and compares by value.
      pairs = tuple((str(k), _check_choice(v, f"factor_axes[{k!r}]")) for k, v in rule.items())
      for pattern, _ in pairs:
        try:
          re.compile(pattern)
        except re.error as e:
          raise ValueError(f"factor_axes key {pattern!r} is not a regular expression: {e}") from e
      object.__setattr__(self, "factor_axes", _PathRules(pairs))
    elif not callable(rule):
      object.__setattr__(self, "factor_axes", _check_choice(rule, "factor_axes"))

  @property
  def per_parameter(self) -> bool:
    """Whether the layout depends on the parameter's path as well as its shape."""
    return callable(self.factor_axes)

  def check_names(self, names: Sequence[str]) -> None:
    """Raises if a key of a ``factor_axes`` mapping matches none of ``names``.

    :func:`~soap_optax.kronecker_stats` calls it with the paths of the parameters it is
    initialised with.

    Raises:
      ValueError: naming the key and the parameter paths it was tried on.
    """
    # No names: the leafless placeholder that optax.tree.map_params initialises with.
    if names and isinstance(self.factor_axes, _PathRules):
      self.factor_axes.check_used(names)

  def layout(self, shape: Sequence[int], name: str | None = None) -> FactorLayout:
    """Returns the :class:`FactorLayout` of a parameter of this shape (and path).

    Args:
      shape: the parameter's shape.
      name: the parameter's path (as in the state's keys); needed when ``factor_axes`` decides
        per parameter, and named in the errors.

    Raises:
      ValueError: if the shape has fewer axes than ``stacked_axes``, or the factor axes chosen
        for the parameter name an axis that does not exist (the message names the parameter).
    """
    try:
      return self._layout(tuple(int(n) for n in shape), name)
    except ValueError as e:
      if name is None:
        raise
      raise ValueError(f"parameter {name!r}: {e}") from None

  def _layout(self, full: tuple[int, ...], name: str | None) -> FactorLayout:
    if len(full) < self.stacked_axes:
      raise ValueError(
        f"stacked_axes={self.stacked_axes} needs parameters with at least that many axes, got "
        f"shape {full}: apply this rule only to the stacked parameters (e.g. optax.partition)."
      )
    stack, shape = full[: self.stacked_axes], full[self.stacked_axes :]
    if len(shape) == 0:
      return FactorLayout(full, shape, (), stack_shape=stack)
    working: tuple[int, ...]
    if len(shape) == 1:
      # The reference never merges or factors vectors unless asked to.
      working, may_factor = shape, self.precondition_1d
    else:
      working = merge_dims(shape, self.max_precond_dim) if self.merge_dims else shape
      may_factor = True
    block: tuple[int, ...]
    if self.block_size is None:
      block = working
    else:
      block = tuple(min(n, self.block_size) for n in working)
    factored = tuple(may_factor and 0 < b <= self.max_precond_dim for b in block)
    factored = _chosen(self._choice(name, full), working, factored)
    return FactorLayout(full, working, factored, block, stack)

  def _choice(self, name: str | None, shape: tuple[int, ...]) -> FactorChoice:
    rule = self.factor_axes
    if not callable(rule):
      return rule  # type: ignore[return-value]  # a mapping became a _PathRules, callable
    if name is None:
      raise ValueError(
        "this LayoutRule decides its factor axes per parameter: pass the parameter's path "
        "(layout(shape, name=...))."
      )
    return _check_choice(rule(name, shape), f"factor_axes({name!r}, {shape})")


@dataclasses.dataclass(frozen=True)
class _PathRules:
  """A ``factor_axes`` mapping: the first regular expression found in the path decides."""

  rules: tuple[tuple[str, FactorChoice], ...]

  def __call__(self, name: str, shape: tuple[int, ...]) -> FactorChoice:
    del shape
    for pattern, choice in self.rules:
      if re.search(pattern, name):
        return choice
    return "all"

  def check_used(self, names: Sequence[str]) -> None:
    for pattern, _ in self.rules:
      if not any(re.search(pattern, name) for name in names):
        raise ValueError(
          f"factor_axes key {pattern!r} matches no parameter; the parameters are {sorted(names)}."
        )
