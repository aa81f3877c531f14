"""The parameters of a small transformer layer, sharded the ways a model's are, for the mesh tests.

Keyed by the mesh's rank: FSDP and tensor-parallel kernels, an FSDP-only kernel, a replicated
matrix, a sharded and a replicated vector. Every axis divides into blocks of 32 (the 16 × 16
matrix is one block of 16).
"""

from jax.sharding import PartitionSpec as P

PARAMS = {
  2: {
    "qkv": ((64, 192), P("fsdp", "tp")),
    "proj": ((64, 64), P("tp", "fsdp")),
    "down": ((256, 64), P("fsdp", None)),
    "embed": ((32, 64), P(None, "tp")),
    "replicated": ((16, 16), P()),
    "bias": ((64,), P("tp")),
    "scale": ((64,), P()),
  },
  1: {
    "rows": ((64, 32), P("data", None)),
    "columns": ((32, 64), P(None, "data")),
    "replicated": ((16, 8), P()),
    "bias": ((64,), P("data")),
    "scale": ((8,), P()),
  },
}
