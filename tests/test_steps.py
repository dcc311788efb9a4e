"""The pure train and eval steps: the loss against a direct NumPy computation, gradient
accumulation against one big batch, adversarial perturbations on the embeddings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax import data, experiment, sharding
from decoderjax import state as state_lib
from decoderjax.config import get_preset
from decoderjax.optimizer import OptimizerConfig, make_optimizer, make_schedule
from decoderjax.steps import LossConfig, adversarial_delta, cross_entropy, train_step


def test_cross_entropy_with_z_loss_and_label_smoothing():

  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
  targets = rng.integers(0, 5, (2, 3))
  weights = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
  smooth = -log_p.mean(-1)
  expected = ((0.9 * nll + 0.1 * smooth + 1e-3 * log_z**2) * weights).sum()
  total, count = cross_entropy(logits, targets, weights, z_loss=1e-3, label_smoothing=0.1)
  assert float(total) == pytest.approx(expected, rel=1e-5) and float(count) == 4


def test_gradient_accumulation_matches_one_big_batch():
  cfg = get_preset("tiny-llama", vocab_size=32, max_seq_len=16)
  window = np.random.default_rng(0).integers(0, 31, (8, 17))
  batch = data.pack_window(window, eos_id=31)
  exp = experiment.Experiment(
    cfg, data.DataConfig(), OptimizerConfig(), LossConfig(), experiment.TrainConfig(),
    experiment.EvalConfig(), experiment.CheckpointConfig(), sharding.MeshConfig(),
  )  # fmt: skip
  opt = make_optimizer(exp.optimizer, 10)
  mesh = sharding.make_mesh(exp.mesh)
  results = []
  for accum in (1, 4):
    step = functools.partial(train_step, cfg=cfg, optimizer=opt, schedule=make_schedule(
      exp.optimizer, 10), loss_cfg=LossConfig(grad_accum_steps=accum))  # fmt: skip
    state, frozen = state_lib.init_state(exp, opt, mesh)
    for _ in range(3):
      state, metrics = jax.jit(step)(state, batch, frozen)
    results.append((state, metrics))
  (a, ma), (b, mb) = results
  assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-6)


@pytest.mark.parametrize("kind", ["fgm", "pgd"])
def test_adversarial_perturbations_stay_in_the_ball_and_raise_the_loss(kind):
  cfg = LossConfig(adversarial=kind, adv_epsilon=0.3, adv_steps=4, adv_step_size=0.2)
  target = jax.random.normal(jax.random.key(0), (3, 5, 8))
  loss = lambda d: jnp.sum(jnp.sin(d + target) ** 2)
  delta = adversarial_delta(loss, (3, 5, 8), cfg)
  norms = jnp.sqrt(jnp.sum(delta**2, axis=(1, 2)))
  assert np.all(norms <= 0.3 * (1 + 1e-5)) and np.all(norms > 0.25)
  assert float(loss(delta)) > float(loss(jnp.zeros_like(delta)))
