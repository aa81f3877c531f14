"""A small decoder-only transformer written with Flax NNX.

Pre-LayerNorm GPT-style blocks with fused QKV projection, causal self-attention,
a GELU MLP, learned position embeddings and an output head tied to the byte
embedding. Weight matrices are plain 2-D `nnx.Linear` kernels, which is the
case Kronecker-factored optimizers such as SOAP precondition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer hyperparameters."""

  vocab_size: int = 256
  max_len: int = 128
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with a fused QKV projection."""

  def __init__(self, d_model: int, num_heads: int, num_layers: int, *, rngs: nnx.Rngs):
    if d_model % num_heads:
      raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
    self.num_heads = num_heads
    self.qkv = nnx.Linear(d_model, 3 * d_model, rngs=rngs)
    # GPT-2 style: shrink residual-branch outputs by depth so the residual
    # stream's scale at initialisation does not grow with the layer count.
    self.out = nnx.Linear(
      d_model,
      d_model,
      kernel_init=nnx.initializers.normal(0.02 / (2 * num_layers) ** 0.5),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, length, d_model = x.shape
    head_dim = d_model // self.num_heads
    qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, d_model)
    return self.out(y)


class MLP(nnx.Module):
  """Two-layer GELU feed-forward block."""

  def __init__(self, d_model: int, hidden: int, num_layers: int, *, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, hidden, rngs=rngs)
    self.down = nnx.Linear(
      hidden,
      d_model,
      kernel_init=nnx.initializers.normal(0.02 / (2 * num_layers) ** 0.5),
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
  """Pre-LayerNorm transformer block."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    d = config.d_model
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.attn = CausalSelfAttention(d, config.num_heads, config.num_layers, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.mlp = MLP(d, config.mlp_ratio * d, config.num_layers, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class Transformer(nnx.Module):
  """Decoder-only byte-level language model returning next-byte logits."""

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    self.config = config
    init = nnx.initializers.normal(0.02)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Param(init(rngs.params(), (config.max_len, config.d_model)))
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.ln_f = nnx.LayerNorm(config.d_model, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    if length > self.config.max_len:
      raise ValueError(f"Sequence length {length} exceeds max_len={self.config.max_len}")
    x = self.embed(tokens) + self.pos_embed[:length]
    for block in self.blocks:
      x = block(x)
    # Tying the output head to the embedding saves a vocab x d_model matrix.
    return self.embed.attend(self.ln_f(x))


# ----------------------------------------------------------------------------
# Sharding.

# The mesh axes the sharding rule knows. Any other axis (e.g. `data`) only divides the batch.
FSDP = "fsdp"  # divides the batch and the parameters (FSDP / ZeRO-3)
TP = "tp"  # divides the kernels' wide dimension (Megatron-style tensor parallelism)
# Kernels that map the wide (TP-divided) activations back to d_model: Megatron's row-parallel
# layers. The other kernels (`qkv`, `up`) are column-parallel.
ROW_PARALLEL = frozenset({"out", "down"})


def partition_spec(
  path: Sequence[str], shape: Sequence[int], mesh_shape: Mapping[str, int]
) -> PartitionSpec:
  """How the parameter at `path` (e.g. `("blocks", "0", "mlp", "up", "kernel")`) is sharded.

  The rule, for a mesh with a `fsdp` and/or a `tp` axis:

  - column-parallel kernels (`attn.qkv`, `mlp.up`; d_model -> wider): `P(fsdp, tp)`;
  - row-parallel kernels (`attn.out`, `mlp.down`; back to d_model): `P(tp, fsdp)`;
  - the byte embedding (256 x d_model, also the tied output head): `P(tp, fsdp)`, so the
    vocabulary (the logits) is divided over `tp`;
  - the position embedding (max_len x d_model): `P(None, fsdp)`;
  - 1-D parameters (biases, LayerNorm scales and offsets): replicated; they are tiny.

  A mesh axis that the mesh lacks, or whose size does not divide the dimension, is left out
  (that dimension is replicated), so every mesh gives a valid sharding.
  """
  if len(shape) != 2:
    wanted: tuple[str | None, ...] = (None,) * len(shape)
  elif path[-1] == "pos_embed":
    wanted = (None, FSDP)
  elif path[-1] == "embedding" or (len(path) > 1 and path[-2] in ROW_PARALLEL):
    wanted = (TP, FSDP)
  else:
    wanted = (FSDP, TP)
  return PartitionSpec(
    *(
      axis if axis in mesh_shape and n % mesh_shape[axis] == 0 else None
      for axis, n in zip(wanted, shape, strict=True)
    )
  )


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
