"""Smoke tests: the LM example trains in-process, its loss falls and it writes its outputs; it
resumes exactly from its checkpoints; and it trains on a (simulated) device mesh."""

import json
import os
import subprocess
import sys

import aliases
import environment
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runner import assert_equal

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


def test_soap_logs_its_diagnostics_and_plots_their_staleness(tmp_path):
  config = train_lm.TrainConfig(
    optimizer="soap", learning_rate=0.01, out=str(tmp_path), diagnostics_every=10, **TINY
  )
  result = train_lm.train(config)
  _check_outputs(tmp_path, TINY["steps"])
  assert result.summary["optimizer"] == "soap"
  logged = [r for r in result.history if "diagnostics" in r]
  assert [r["step"] for r in logged] == [10, 20, 30, 40]
  for record in logged:
    factors = record["diagnostics"]["factors"]
    assert factors, "no factor diagnostics logged"
    assert record["diagnostics"]["skipped_steps"] == 0
    for key, factor in factors.items():
      assert 0 <= factor["staleness"] < 1, key
      # precondition_frequency 10: the first basis at step 1 (which takes no Adam step, as in the
      # reference), then a refresh at steps 11, 21, 31.
      assert factor["refreshes"] == 1 + (record["step"] - 1) // 10, key
  assert os.path.getsize(os.path.join(tmp_path, "diagnostics.png")) > 0


def test_unknown_optimizer_is_rejected():
  with pytest.raises(ValueError, match="Unknown optimizer"):
    train_lm.make_optimizer(train_lm.TrainConfig(optimizer="sgd"))


def test_the_example_offers_every_alias_and_optax_s_baselines():
  assert set(train_lm.SOAP_OPTIMIZERS) == set(aliases.ALIASES)
  assert set(train_lm.OPTIMIZERS) == set(aliases.ALIASES) | {"adamw", "adafactor", "muon"}


@pytest.mark.parametrize("name", train_lm.OPTIMIZERS)
def test_make_optimizer_builds_and_takes_real_steps(name):
  """Every optimizer the example offers builds from its flags and, past the warm-up (whose first
  learning rate is 0) and the Kronecker optimizers' initialising first call, takes a finite,
  non-zero step on every parameter that lowers a quadratic loss."""
  config = train_lm.TrainConfig(optimizer=name, steps=10, warmup_steps=2, refresh_tolerance=None)
  tx = train_lm.make_optimizer(config)
  target = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), "b": jnp.array([0.5, -0.5, 1.0])}

  def loss(params):
    return sum(jnp.sum((params[k] - target[k]) ** 2) for k in target)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state, updates

  params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
  state = tx.init(params)
  start = loss(params)
  for _ in range(4):  # learning rates 0, lr/2, lr, then the cosine decay
    params, state, updates = step(params, state)
  assert config.warmup_steps < 4
  leaves = jax.tree.leaves(updates)
  assert len(leaves) == 2
  for u in leaves:
    assert np.all(np.isfinite(u)) and np.any(np.asarray(u) != 0), u
  assert float(loss(params)) < float(start), (float(loss(params)), float(start))


# -- checkpoints -----------------------------------------------------------------------------


def _restore_state(path):
  """The params and optimizer state of one of the example's checkpoints, as a flat dict."""
  import orbax.checkpoint as ocp

  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  leaves, _ = jax.tree_util.tree_flatten_with_path(state)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _losses(result):
  """Every step's (train loss, validation loss), None where a step has no such entry."""
  return [(e.get("train_loss"), e.get("val_loss")) for e in result.history]


def test_a_resumed_run_ends_exactly_as_the_uninterrupted_run(tmp_path):
  """A run stopped after its checkpoint at step 8 and run again continues exactly.

  The stop is simulated by moving the uninterrupted run's last checkpoint (step 12) away: the
  directory then holds what a run killed between steps 8 and 12 leaves, and the metrics file
  holds steps past the checkpoint, which the resumed run must replace.
  """
  checkpoints = tmp_path / "checkpoints"
  settings = {**TINY, "steps": 12, "eval_every": 6}
  config = train_lm.TrainConfig(
    optimizer="soap",
    out=str(tmp_path / "run"),
    checkpoint_dir=str(checkpoints),
    checkpoint_every=4,
    **settings,
  )
  full = train_lm.train(config)
  os.rename(checkpoints / "12", tmp_path / "uninterrupted")
  resumed = train_lm.train(config)

  assert resumed.summary["start_step"] == 8
  assert all(np.isfinite(v) for pair in _losses(full) for v in pair if v is not None)
  assert _losses(resumed) == _losses(full)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == list(range(13))
  uninterrupted = _restore_state(tmp_path / "uninterrupted")
  final = _restore_state(checkpoints / "12")
  assert sorted(final) == sorted(uninterrupted) and any("opt_state" in k for k in final)
  for key, value in uninterrupted.items():
    assert_equal(final[key], value, err_msg=key)


# -- device mesh -----------------------------------------------------------------------------

TRAIN_LM = os.path.join(os.path.dirname(os.path.dirname(__file__)), "examples", "train_lm.py")


def test_a_run_on_a_simulated_mesh_trains_with_a_sharded_optimizer_state(tmp_path):
  """The README's mesh command, shortened, on 8 simulated CPU devices in a fresh process."""
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": environment.xla_flags("--xla_force_host_platform_device_count=8"),
  }
  flags = {**TINY, "steps": 20, "log_every": 10}
  argv = [TRAIN_LM, "--optimizer=soap", "--mesh=fsdp:4,tp:2", f"--out={tmp_path}", "--noprogress"]
  argv += [f"--{k}={v}" for k, v in flags.items() if k != "progress"]
  result = subprocess.run(
    [sys.executable, *argv], env=env, capture_output=True, text=True, timeout=600
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

  with open(os.path.join(tmp_path, "summary.json")) as f:
    summary = json.load(f)
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    train = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
  assert len(train) == 20 and np.all(np.isfinite(train))
  assert np.mean(train[-5:]) < np.mean(train[:3]) - 0.3
  assert summary["sharding"]["mesh"] == {"fsdp": 4, "tp": 2}
  state = summary["sharding"]["optimizer_state"]
  assert 0 < state["max_bytes_per_device"] <= 1.5 * state["bytes"] / 8
