"""soap_optax: Kronecker-factored optimizers (SOAP, Shampoo, EShampoo) as optax blocks.

Every optimizer is an ``optax.chain`` of the public blocks::

  soap            = chain(kronecker_stats, eigenbasis_refresh, rotated_adam, lr, decay)
  shampoo         = chain(kronecker_stats, eigenbasis_refresh(eigh), shampoo_precondition,
                          lr, decay)
  eigen_adafactor = chain(kronecker_stats, eigenbasis_refresh, rotated_adafactor, lr, decay)
  eshampoo        = chain(kronecker_stats, eigenbasis_refresh(τ), eigenvalue_corrected, lr, decay)
"""

from soap_optax._alias import eigen_adafactor, eshampoo, shampoo, skip_nonfinite_steps, soap
from soap_optax._carrier import KroneckerUpdate
from soap_optax._checkpoint import abstract_state
from soap_optax._diagnostics import Diagnostics, FactorDiagnostics, diagnostics
from soap_optax._eigenbasis import EigenbasisState, eigenbasis_refresh
from soap_optax._layout import FactorLayout, LayoutRule, merge_dims
from soap_optax._linalg import off_diagonal_ratio
from soap_optax._momentum import EmaMomentumState, ema_momentum
from soap_optax._rotated import (
  EigenvalueCorrectedState,
  Moment,
  RotatedAdafactorState,
  RotatedAdamState,
  eigenbasis_optimizer,
  eigenvalue_corrected,
  rotated_adafactor,
  rotated_adam,
)
from soap_optax._shampoo import ShampooPreconditionState, shampoo_precondition
from soap_optax._stats import KroneckerStatsState, kronecker_stats
from soap_optax._weight_decay import WeightDecayAfterStepState, add_decayed_weights_after_step

__version__ = "0.1.0"

__all__ = (
  "Diagnostics",
  "EigenbasisState",
  "EmaMomentumState",
  "EigenvalueCorrectedState",
  "FactorDiagnostics",
  "FactorLayout",
  "KroneckerStatsState",
  "KroneckerUpdate",
  "LayoutRule",
  "Moment",
  "RotatedAdafactorState",
  "RotatedAdamState",
  "ShampooPreconditionState",
  "WeightDecayAfterStepState",
  "abstract_state",
  "add_decayed_weights_after_step",
  "diagnostics",
  "eigen_adafactor",
  "ema_momentum",
  "eigenbasis_optimizer",
  "eigenbasis_refresh",
  "eigenvalue_corrected",
  "eshampoo",
  "kronecker_stats",
  "merge_dims",
  "off_diagonal_ratio",
  "rotated_adafactor",
  "rotated_adam",
  "shampoo",
  "shampoo_precondition",
  "skip_nonfinite_steps",
  "soap",
)
