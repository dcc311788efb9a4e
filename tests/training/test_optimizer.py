"""Schedules against their closed forms, and the weight-decay mask."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.training.optimizer import OptimizerConfig, decay_mask, make_schedule


def test_cosine_schedule_matches_nanogpt_formula():
  cfg = OptimizerConfig(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100)
  schedule = make_schedule(cfg, total_steps=2000)
  for step in (0, 50, 100, 500, 1999, 2000):
    if step < 100:
      expected = 1e-3 * step / 100
    else:
      ratio = (step - 100) / 1900
      expected = 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("name", ["linear", "constant", "rsqrt"])
def test_other_schedules(name):
  cfg = OptimizerConfig(schedule=name, learning_rate=1.0, end_learning_rate=0.0, warmup_steps=10)
  s = make_schedule(cfg, 110)
  assert float(s(10)) == pytest.approx(1.0)
  expected = {"linear": 0.5, "constant": 1.0, "rsqrt": math.sqrt(10 / 60)}[name]
  assert float(s(60)) == pytest.approx(expected, rel=1e-5)


def test_decay_mask_skips_norms_and_biases():
  params = {
    "embedding": jnp.zeros((4, 2)),
    "final_norm": {"scale": jnp.zeros(2)},
    "layers": {"attn": {"q": jnp.zeros((2, 2)), "q_bias": jnp.zeros(2)}},
  }
  mask = decay_mask(OptimizerConfig(decay_embeddings=False), params)
  assert mask == {
    "embedding": False,
    "final_norm": {"scale": False},
    "layers": {"attn": {"q": True, "q_bias": False}},
  }
  assert decay_mask(OptimizerConfig(), params)["embedding"] is True
  np.testing.assert_equal(OptimizerConfig().weight_decay, 0.1)


def test_bad_optimizer_config_names_field():
  with pytest.raises(ValueError, match="optimizer.schedule"):
    OptimizerConfig(schedule="step")


@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor"])
def test_each_optimizer_minimizes(name):
  import jax
  import optax

  from decoderjax.training.optimizer import make_optimizer

  target = jnp.arange(12.0).reshape(3, 4) / 10
  params = {"w": jnp.full((3, 4), 0.5), "bias": jnp.full(4, 0.5)}  # adafactor scales by |w|
  cfg = OptimizerConfig(name=name, learning_rate=0.05, warmup_steps=0, schedule="constant")
  opt = make_optimizer(cfg, total_steps=200)
  state = opt.init(params)
  loss = lambda p: jnp.sum(jnp.square(p["w"] - target)) + jnp.sum(jnp.square(p["bias"] - 1))
  first = loss(params)
  for _ in range(200):
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert loss(params) < 0.1 * first
