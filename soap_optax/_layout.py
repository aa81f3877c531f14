"""How a parameter's axes map onto Kronecker factors.

Every block asks the same question of a parameter — which axes carry a factor, after which
reshape — and must get the same answer. That answer depends only on the parameter's shape and
on three settings, so it is computed here, statically, in plain Python: no arrays, nothing
traced, nothing that could differ between blocks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


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
    working_shape: the shape every block computes in (after merging axes).
    factored: one flag per axis of ``working_shape``: whether that axis has a factor.
  """

  shape: tuple[int, ...]
  working_shape: tuple[int, ...]
  factored: tuple[bool, ...]

  @property
  def num_factors(self) -> int:
    return sum(self.factored)

  @property
  def factor_sizes(self) -> tuple[int | None, ...]:
    """The side of each axis's factor, or None for an axis without one."""
    return tuple(n if f else None for n, f in zip(self.working_shape, self.factored, strict=True))


@dataclasses.dataclass(frozen=True)
class LayoutRule:
  """Decides, from a shape alone, which axes of a parameter get a Kronecker factor.

  One rule is shared by every block of a composition (the aliases build one and hand it to each
  block), which is what guarantees that the statistics, the bases and the rotated moments agree.

  Attributes:
    max_precond_dim: axes longer than this get no factor (they stay unrotated, while the other
      axes of the same parameter are still rotated). ``0`` rotates nothing.
    merge_dims: merge consecutive axes greedily while their product stays at most
      ``max_precond_dim`` (see :func:`merge_dims`).
    precondition_1d: give 1-D parameters (biases, norm scales) a factor too, when their length
      is at most ``max_precond_dim``. 0-D parameters never get one.
  """

  max_precond_dim: int = 10000
  merge_dims: bool = False
  precondition_1d: bool = False

  def __post_init__(self):
    if isinstance(self.max_precond_dim, bool) or not isinstance(self.max_precond_dim, int):
      try:
        value = int(self.max_precond_dim)  # A NumPy or concrete JAX integer.
      except Exception as e:  # A tracer: shapes cannot depend on it.
        raise ValueError(
          "max_precond_dim must be a static Python int (it decides array shapes); with "
          "optax.inject_hyperparams, list it in static_args."
        ) from e
      object.__setattr__(self, "max_precond_dim", value)
    if self.max_precond_dim < 0:
      raise ValueError(f"max_precond_dim must be >= 0, got {self.max_precond_dim}.")

  def layout(self, shape: Sequence[int]) -> FactorLayout:
    """Returns the :class:`FactorLayout` of a parameter of this shape."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 0:
      return FactorLayout(shape, shape, ())
    if len(shape) == 1:
      # The reference never merges or factors vectors unless asked to.
      factored = self.precondition_1d and shape[0] <= self.max_precond_dim
      return FactorLayout(shape, shape, (factored,))
    working = merge_dims(shape, self.max_precond_dim) if self.merge_dims else shape
    assert math.prod(working) == math.prod(shape)
    return FactorLayout(shape, working, tuple(n <= self.max_precond_dim for n in working))
