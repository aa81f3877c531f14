"""soap_optax: Kronecker-factored optimizers (SOAP, Shampoo, EShampoo) as optax blocks.

Every optimizer is an ``optax.chain`` of the public blocks below::

  soap = chain(kronecker_stats, eigenbasis_refresh, rotated_adam, scale_by_learning_rate, decay)
"""

from soap_optax._alias import skip_nonfinite_steps, soap
from soap_optax._carrier import KroneckerUpdate
from soap_optax._eigenbasis import EigenbasisState, eigenbasis_refresh
from soap_optax._layout import FactorLayout, LayoutRule, merge_dims
from soap_optax._rotated import RotatedAdamState, rotated_adam
from soap_optax._stats import KroneckerStatsState, kronecker_stats
from soap_optax._weight_decay import WeightDecayAfterStepState, add_decayed_weights_after_step

__version__ = "0.1.0"

__all__ = (
  "EigenbasisState",
  "FactorLayout",
  "KroneckerStatsState",
  "KroneckerUpdate",
  "LayoutRule",
  "RotatedAdamState",
  "WeightDecayAfterStepState",
  "add_decayed_weights_after_step",
  "eigenbasis_refresh",
  "kronecker_stats",
  "merge_dims",
  "rotated_adam",
  "skip_nonfinite_steps",
  "soap",
)
