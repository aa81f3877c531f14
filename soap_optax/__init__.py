"""soap_optax: Kronecker-factored optimizers (SOAP, Shampoo, EShampoo) as optax blocks.

Every optimizer is an ``optax.chain`` of the public blocks::

  soap            = chain(kronecker_stats, eigenbasis_refresh, rotated_adam, lr, decay)
  shampoo         = chain(kronecker_stats, eigenbasis_refresh(eigh), shampoo_precondition,
                          lr, decay)
  eigen_adafactor = chain(kronecker_stats, eigenbasis_refresh, rotated_adafactor, lr, decay)
  eshampoo        = chain(kronecker_stats, eigenbasis_refresh(τ), eigenvalue_corrected, lr, decay)

and each direction alone, the three Kronecker blocks with one shared layout, composes as optax's
``scale_by_*`` do: ``scale_by_soap``, ``scale_by_shampoo``, ``scale_by_eigen_adafactor``,
``scale_by_eshampoo``. The stable surface is ``__all__``; names outside it are private.
"""

import warnings as _warnings

from soap_optax._alias import (
  eigen_adafactor,
  eshampoo,
  scale_by_eigen_adafactor,
  scale_by_eshampoo,
  scale_by_shampoo,
  scale_by_soap,
  shampoo,
  skip_nonfinite_steps,
  soap,
)
from soap_optax._carrier import KroneckerUpdate
from soap_optax._checkpoint import abstract_state
from soap_optax._diagnostics import Diagnostics, FactorDiagnostics, diagnostics
from soap_optax._eigenbasis import EigenbasisState, Method, eigenbasis_refresh
from soap_optax._grafting import Grafting
from soap_optax._layout import FactorAxes, FactorLayout, LayoutRule
from soap_optax._linalg import MatmulPrecision, Orthonormalization, off_diagonal_ratio
from soap_optax._regroup import group_state
from soap_optax._rotated import (
  DirectionRule,
  EigenvalueCorrectedState,
  Moment,
  MomentBasis,
  RotatedAdafactorState,
  RotatedAdamState,
  Rotation,
  eigenbasis_optimizer,
  eigenvalue_corrected,
  rotated_adafactor,
  rotated_adam,
)
from soap_optax._shampoo import ShampooPreconditionState, shampoo_precondition
from soap_optax._stats import KroneckerStatsState, kronecker_stats
from soap_optax._weight_decay import WeightDecayAfterStepState, add_decayed_weights_after_step

__version__ = "0.2.0"

__all__ = (
  "DirectionRule",
  "Diagnostics",
  "EigenbasisState",
  "EigenvalueCorrectedState",
  "FactorAxes",
  "FactorDiagnostics",
  "FactorLayout",
  "Grafting",
  "KroneckerStatsState",
  "KroneckerUpdate",
  "LayoutRule",
  "MatmulPrecision",
  "Method",
  "Moment",
  "MomentBasis",
  "Orthonormalization",
  "RotatedAdafactorState",
  "RotatedAdamState",
  "Rotation",
  "ShampooPreconditionState",
  "WeightDecayAfterStepState",
  "abstract_state",
  "add_decayed_weights_after_step",
  "diagnostics",
  "eigen_adafactor",
  "eigenbasis_optimizer",
  "eigenbasis_refresh",
  "eigenvalue_corrected",
  "eshampoo",
  "group_state",
  "kronecker_stats",
  "off_diagonal_ratio",
  "rotated_adafactor",
  "rotated_adam",
  "scale_by_eigen_adafactor",
  "scale_by_eshampoo",
  "scale_by_shampoo",
  "scale_by_soap",
  "shampoo",
  "shampoo_precondition",
  "skip_nonfinite_steps",
  "soap",
)

# Names that leave the public surface: still importable for one release, with a warning that
# says what to use instead.
_DEPRECATED = {
  "ema_momentum": (
    "soap_optax._momentum",
    "use optax.ema(decay, debias=True, accumulator_dtype=jnp.float32); no soap_optax optimizer "
    "uses it",
  ),
  "EmaMomentumState": ("soap_optax._momentum", "use optax.EmaState"),
  "merge_dims": (
    "soap_optax._layout",
    "use LayoutRule(max_precond_dim=d, merge_dims=True).layout(shape).working_shape",
  ),
}


def __getattr__(name: str):
  if name in _DEPRECATED:
    module, advice = _DEPRECATED[name]
    _warnings.warn(
      f"soap_optax.{name} is deprecated and will be removed in the next release: {advice}.",
      DeprecationWarning,
      stacklevel=2,
    )
    import importlib

    return getattr(importlib.import_module(module), name)
  raise AttributeError(f"module 'soap_optax' has no attribute {name!r}")
