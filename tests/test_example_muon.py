"""The LM example's Muon baseline: `optax.contrib.muon` on the hidden kernels, Adam on the rest,
on one device and on a (simulated) explicit-sharding mesh."""

import json
import os
import subprocess
import sys
import textwrap

import environment
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples")
sys.path.insert(0, EXAMPLES)

import train_lm  # noqa: E402
from flax import nnx  # noqa: E402
from runner import assert_close  # noqa: E402

TINY = dict(d_model=16, num_layers=2, num_heads=2, seq_len=8)


def _params():
  config = train_lm.TrainConfig(optimizer="muon", **TINY)
  _, state = nnx.split(train_lm.make_model(config))
  return nnx.to_pure_dict(state)


def _flat(tree):
  leaves, _ = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
  )
  return {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}


def test_muon_takes_the_hidden_kernels_and_adam_the_embeddings_and_vectors():
  params = _flat(_params())
  dims = _flat(train_lm.muon_dimension_numbers(_params()))
  assert sorted(dims) == sorted(params)
  muon = sorted(k for k, d in dims.items() if d is not None)
  # Two blocks, four kernels each; the tied embedding (also the output head) and the position
  # embedding are matrices but go to Adam, with every bias and LayerNorm parameter.
  assert len(muon) == 2 * 4
  assert all(k.startswith("blocks/") and k.endswith("/kernel") for k in muon), muon
  for key in ("embed/embedding", "pos_embed", "ln_f/scale", "blocks/0/attn/qkv/bias"):
    assert dims[key] is None, key


def test_a_separate_output_head_goes_to_adam():
  params = {"head": jnp.ones((8, 4)), "blocks": {"0": {"kernel": jnp.ones((4, 4))}}}
  dims = train_lm.muon_dimension_numbers(params)
  assert dims["head"] is None
  assert dims["blocks"]["0"]["kernel"] == optax.contrib.MuonDimensionNumbers(0, 1)


def test_first_update_is_adams_step_on_the_embedding_and_orthogonal_on_a_kernel():
  """Adam's first step is a sign step of one magnitude; Muon's orthogonalised step has its
  singular values gathered near one value and entries of unequal magnitude."""
  config = train_lm.TrainConfig(optimizer="muon", weight_decay=0.0, **TINY)
  tx = train_lm.make_muon(config, 0.1)
  params = _params()
  key = jax.random.key(0)
  grads = jax.tree.map(
    lambda x: jax.random.normal(jax.random.fold_in(key, x.size), x.shape, x.dtype), params
  )
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  flat = _flat(updates)

  # Nesterov Adam's first step (Dozat, 2016), bias-corrected: m_hat = (1 + b1 / (1 + b1)) g and
  # v_hat = g^2, so the update is -lr m_hat / (|g| + eps), one magnitude for every entry.
  g = np.asarray(grads["embed"]["embedding"], np.float64)
  b1, eps = config.b1, 1e-8
  want = -0.1 * (1 + b1 / (1 + b1)) * g / (np.abs(g) + eps)
  assert_close(np.asarray(flat["embed/embedding"], np.float64), want, rtol=1e-5, atol=1e-7)

  kernel = np.asarray(flat["blocks/0/mlp/up/kernel"], np.float64)
  singular = np.linalg.svd(kernel, compute_uv=False)
  assert singular.min() > 0.3 * singular.max()  # Newton-Schulz's (0.5, 1.5) band, with slack
  assert np.std(np.abs(kernel)) > 0.2 * np.mean(np.abs(kernel))  # not a sign step


_MESH_SCRIPT = textwrap.dedent(
  """
  import json, sys
  import jax, jax.numpy as jnp
  sys.path.insert(0, sys.argv[1])
  import train_lm
  from flax import nnx

  config = train_lm.TrainConfig(optimizer="muon", d_model=16, num_layers=1, num_heads=2,
                                seq_len=8, steps=10, warmup_steps=0)
  _, state = nnx.split(train_lm.make_model(config))
  params = nnx.to_pure_dict(state)
  grads = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)),
                       params)

  def one_step(params):
    tx = train_lm.make_optimizer(config)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, updates)

  single = one_step(params)
  mesh = train_lm.make_mesh("fsdp:4,tp:2")
  with jax.set_mesh(mesh):
    sharded = one_step(train_lm.shard_params(params, mesh))
    kernel = sharded["blocks"][0]["mlp"]["up"]["kernel"]
    spec = str(jax.typeof(kernel).sharding.spec)
  diff = max(float(jnp.max(jnp.abs(jax.device_get(a) - b)))
             for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)))
  scale = max(float(jnp.max(jnp.abs(b - a))) for a, b in
              zip(jax.tree.leaves(params), jax.tree.leaves(single)))
  print(json.dumps({"diff": diff, "scale": scale, "spec": spec}))
  """
)


def test_muon_on_an_explicit_mesh_steps_as_on_one_device_and_keeps_the_shardings():
  """Muon's `x @ x.T` with a kernel sharded along the contracted axis raises ShardingTypeError
  under explicit sharding unless the example runs it in an automatic-sharding region."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": environment.xla_flags("--xla_force_host_platform_device_count=8"),
  }
  result = subprocess.run(
    [sys.executable, "-c", _MESH_SCRIPT, EXAMPLES],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["scale"] > 1e-4  # the step moved the parameters
  assert report["diff"] <= 1e-5 * max(report["scale"], 1.0) + 1e-6
  assert "fsdp" in report["spec"] and "tp" in report["spec"]
