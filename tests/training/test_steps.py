"""The pure train and eval steps: the loss against a direct NumPy computation, gradient
accumulation against one big batch, adversarial perturbations on the embeddings."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.data import batches, data_config
from decoderjax.data import examples as examples_lib
from decoderjax.data import rows as rows_lib
from decoderjax.model import adapters
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset
from decoderjax.runtime import sharding
from decoderjax.training import experiment
from decoderjax.training import state as state_lib
from decoderjax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule
from decoderjax.training.steps import (
  LossConfig,
  adversarial_delta,
  batch_loss,
  cross_entropy,
  eval_step,
  forward,
  pooled_logits,
  train_step,
)


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
  batch = batches.pack_window(window, eos_id=31)
  exp = experiment.Experiment(
    cfg, data_config.DataConfig(), OptimizerConfig(), LossConfig(), experiment.TrainConfig(),
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


def test_packed_classification_equals_each_example_alone():
  """Packing a classifier's batch changes neither any example's logits nor the loss and
  predictions: the head reads each example's last token, attention stays within examples."""
  cfg = get_preset("tiny-llama").replace(num_labels=3, dtype="float32")
  rng = np.random.default_rng(0)
  ids = [rng.integers(1, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 14, 12)]
  labels = rng.integers(0, 3, len(ids)).tolist()
  alone = examples_lib.classifier_rows(ids, 16, labels)
  packed = rows_lib.pack_examples(alone, 2, 16)
  assert len(packed["inputs"]) < len(ids) and packed["inputs"].shape[1] == 16
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  logits_alone = pooled_logits(forward(params, cfg, alone, None, True), alone["last"])[:, 0]
  logits_packed = pooled_logits(forward(params, cfg, packed, None, True), packed["last"])
  a = eval_step(params, alone, cfg=cfg, loss_cfg=LossConfig())
  b = eval_step(params, packed, cfg=cfg, loss_cfg=LossConfig())
  seen = []
  for r, k in zip(*np.nonzero(packed["example_weights"]), strict=True):
    at = np.flatnonzero(packed["segment_ids"][r] == k + 1)  # slot k's example, whole
    i = ids.index(packed["inputs"][r, at].tolist())
    seen.append(i)
    assert packed["last"][r, k] == at[-1] and packed["labels"][r, k] == labels[i]
    np.testing.assert_allclose(logits_packed[r, k], logits_alone[i], atol=1e-5)
    assert b["predictions"][r, k] == a["predictions"][i, 0]
  assert sorted(seen) == list(range(len(ids)))  # every example once
  np.testing.assert_allclose(a["loss_sum"], b["loss_sum"], rtol=1e-5)
  assert float(a["weight_sum"]) == float(b["weight_sum"]) == len(ids)


def test_loss_at_weighted_columns_equals_the_full_head():
  """SFT batches carry `loss_at` (their weighted columns): the LM head then runs on those alone,
  and the loss, its weight and the LoRA gradients equal the head over every position's."""
  cfg = get_preset("tiny-llama", vocab_size=32, max_seq_len=32).replace(dtype="float32")
  cfg = cfg.replace(lora_rank=4, lora_targets="q,v")
  rng = np.random.default_rng(0)
  examples = []
  for n in rng.integers(6, 16, 6):  # long prompts, completions of 1-4 tokens
    answer = int(rng.integers(1, 5))
    mask = [False] * (n - answer) + [True] * answer
    examples.append((rng.integers(1, 31, int(n)).tolist(), mask))
  rows = rows_lib.pack_examples(examples_lib.sft_rows(examples, 32)[0], 1, 32)
  n = rows_lib.loss_slots(rows["weights"])
  assert 0 < n < rows["inputs"].shape[1]
  sliced = rows_lib.with_loss_at(rows, n)
  for r in range(len(rows["inputs"])):  # the weighted columns first, in order
    weighted = np.flatnonzero(rows["weights"][r])
    assert sliced["loss_at"][r, : len(weighted)].tolist() == weighted.tolist()
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  params = jax.tree.map(lambda x: x + 0.01, params)  # LoRA B off zero: gradients reach A
  trainable, frozen = adapters.split_trainable(params, "lora")

  def loss(trainable, batch):
    return batch_loss(trainable, frozen, cfg, batch, None, LossConfig(), True)

  (full, (w_full, _, _)), g_full = jax.value_and_grad(loss, has_aux=True)(trainable, rows)
  (part, (w_part, _, _)), g_part = jax.value_and_grad(loss, has_aux=True)(trainable, sliced)
  assert float(w_full) == float(w_part) == rows["weights"].sum()
  np.testing.assert_allclose(part, full, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_full), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_lora_dropout_is_active_in_training_steps():
  """A LoRA model's train step drops the adapters' inputs (peft's lora_dropout): its gradient
  differs from the same step without dropout, which is reproducible to the bit."""
  window = np.random.default_rng(0).integers(0, 31, (4, 17))
  batch = batches.pack_window(window, eos_id=31)
  norms = []
  for dropout in (0.0, 0.0, 0.5):
    cfg = get_preset("tiny-llama", vocab_size=32, max_seq_len=16, lora_rank=4, lora_dropout=dropout)
    exp = experiment.Experiment(
      cfg, data_config.DataConfig(), OptimizerConfig(), LossConfig(), experiment.TrainConfig(),
      experiment.EvalConfig(), experiment.CheckpointConfig(), sharding.MeshConfig(),
    )  # fmt: skip
    opt = make_optimizer(exp.optimizer, 10)
    state, frozen = state_lib.init_state(exp, opt, sharding.make_mesh(exp.mesh))
    step = functools.partial(train_step, cfg=cfg, optimizer=opt, loss_cfg=LossConfig(),
                             schedule=make_schedule(exp.optimizer, 10))  # fmt: skip
    norms.append(float(jax.jit(step)(state, batch, frozen)[1]["grad_norm"]))
  assert norms[0] == norms[1]
  assert abs(norms[2] - norms[0]) > 1e-3 * norms[0]
