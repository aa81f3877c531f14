"""Smoke tests: the LM example trains in-process, its loss falls and it writes its outputs."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples"))

import train_lm  # noqa: E402

# A model and corpus small enough to train for a few dozen steps in seconds on a CPU.
TINY = dict(
  steps=40,
  batch_size=8,
  seq_len=32,
  d_model=32,
  num_layers=1,
  num_heads=2,
  warmup_steps=5,
  eval_every=20,
  eval_batches=2,
  log_every=20,
  max_files=40,
  progress=False,
)


def _check_outputs(out_dir, steps):
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(steps + 1))
  train = [r["train_loss"] for r in records if "train_loss" in r]
  val = [r["val_loss"] for r in records if "val_loss" in r]
  assert len(val) == 3  # Step 0, the middle evaluation and the last step.
  # Untrained, the loss is about ln(256) = 5.5 nats; a few dozen steps of
  # byte statistics should remove a large part of that.
  assert sum(train[-10:]) / 10 < sum(train[:5]) / 5 - 0.5
  assert val[-1] < val[0] - 0.5
  assert all(r["step_time"] > 0 for r in records[1:])
  assert os.path.getsize(os.path.join(out_dir, "loss.png")) > 0
  with open(os.path.join(out_dir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["steps"] == steps and not summary["diverged"]
  assert summary["final_val_loss"] == pytest.approx(val[-1])
  assert summary["compile_time_s"] > 0 and summary["wall_time_s"] > 0
  return summary


def test_adamw_through_command_line_flags(tmp_path):
  """Runs main() exactly as `python examples/train_lm.py --flags...` would."""
  argv = ["train_lm.py", "--optimizer=adamw", "--learning_rate=0.01", f"--out={tmp_path}"]
  argv += [f"--{k}={v}" for k, v in TINY.items()]
  train_lm.FLAGS(argv)
  try:
    train_lm.main(argv[:1])
  finally:
    train_lm.FLAGS.unparse_flags()
  summary = _check_outputs(tmp_path, TINY["steps"])
  assert summary["optimizer"] == "adamw"
  assert summary["config"]["max_files"] == 40


def test_soap(tmp_path):
  soap_optax = pytest.importorskip("soap_optax")
  if getattr(soap_optax, "soap", None) is None:
    pytest.skip("soap_optax.soap is not available yet")
  config = train_lm.TrainConfig(optimizer="soap", learning_rate=0.01, out=str(tmp_path), **TINY)
  result = train_lm.train(config)
  _check_outputs(tmp_path, TINY["steps"])
  assert result.summary["optimizer"] == "soap"
  assert len(result.history) == TINY["steps"] + 1


def test_unknown_optimizer_is_rejected():
  with pytest.raises(ValueError, match="Unknown optimizer"):
    train_lm.make_optimizer(train_lm.TrainConfig(optimizer="sgd"))


@pytest.mark.parametrize("name", train_lm.OPTIMIZERS)
def test_make_optimizer_builds_and_updates(name):
  """Every optimizer the example offers builds from its flags and takes a finite step."""
  if name in train_lm.SOAP_OPTIMIZERS:
    soap_optax = pytest.importorskip("soap_optax")
    if getattr(soap_optax, name, None) is None:
      pytest.skip(f"soap_optax.{name} is not available yet")
  config = train_lm.TrainConfig(optimizer=name, steps=10, warmup_steps=2, refresh_tolerance=None)
  tx = train_lm.make_optimizer(config)
  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  grads = {"w": jnp.full((4, 3), 0.1), "b": jnp.full((3,), -0.1)}
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
