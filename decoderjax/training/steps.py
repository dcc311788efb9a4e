"""Pure, jit-able train and eval steps over a TrainState pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from decoderjax.model.adapters import combine
from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import Decoder
from decoderjax.training.preference import (
  PREFERENCE_LOSSES,
  STATISTICS,
  WITH_REFERENCE,
  preference_loss,
  segment_logps,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  z_loss: float = 0.0  # weight of log(Z)^2, keeps the softmax normalizer near 1
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1  # the batch is split into this many sequential microbatches
  skip_nonfinite: bool = False  # set from train.on_nonfinite='skip': drop non-finite updates
  # Adversarial training on the input embeddings: none, fgm (one step of size epsilon) or pgd
  # (`adv_steps` steps of `adv_step_size`, projected onto the epsilon ball); the objective is
  # clean loss + adv_weight x loss at the perturbed embeddings. Norms are L2 per sequence.
  adversarial: str = "none"
  adv_epsilon: float = 1.0
  adv_steps: int = 3
  adv_step_size: float = 0.5
  adv_weight: float = 1.0
  # Preference pairs (data.task=preference): one of preference.PREFERENCE_LOSSES (empty: dpo),
  # its beta (ORPO's lambda) and SimPO's target margin gamma; label_smoothing above is then
  # cDPO's (and SimPO's) probability that a pair's labels are flipped.
  preference: str = ""
  beta: float = 0.1
  simpo_gamma: float = 0.5

  def __post_init__(self):
    if self.adversarial not in ("none", "fgm", "pgd"):
      raise ValueError(f"loss.adversarial must be none, fgm or pgd, got {self.adversarial!r}")
    if self.adversarial != "none" and (self.adv_epsilon <= 0 or self.adv_steps < 1):
      raise ValueError("loss.adv_epsilon must be positive and loss.adv_steps >= 1")
    if self.preference not in ("", *PREFERENCE_LOSSES):
      raise ValueError(
        f"loss.preference must be one of {PREFERENCE_LOSSES}, got {self.preference!r}"
      )
    if self.beta <= 0:
      raise ValueError(f"loss.beta must be positive, got {self.beta}")


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  rng: Array  # raw uint32 key data, so checkpoints hold plain arrays


def cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss=0.0, label_smoothing=0.0, vocab_pad=0):
  """Weighted token cross entropy in float32 -> (loss sum, weight sum). Label smoothing
  spreads over the ids before the last `vocab_pad` (padding, which the model never predicts)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  if label_smoothing:
    v = logits_BTV.shape[-1] - vocab_pad
    real_V = jnp.arange(logits_BTV.shape[-1]) < v
    uniform_BT = log_z_BT - jnp.sum(jnp.where(real_V, logits_BTV, 0.0), axis=-1) / v
    nll_BT = (1 - label_smoothing) * nll_BT + label_smoothing * uniform_BT
  if z_loss:
    nll_BT += z_loss * jnp.square(log_z_BT)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def forward(params, cfg: ModelConfig, batch, rng, deterministic: bool, embed_delta_BTD=None):
  """Logits [B, T, V] of a batch's rows, or [B, N, V] at its `loss_at` columns when it has them;
  a seq2seq batch's rows attend to their `source`."""
  logits, _ = Decoder(cfg).apply(
    {"params": params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
    embed_delta_BTD=embed_delta_BTD,
    logits_at_BN=batch.get("loss_at"),
    source_BM=batch.get("source"),
    memory_mask_BM=batch.get("source_mask"),
  )
  return logits


def pooled_logits(logits_BTC, last_BK):
  """A classifier's logits at the last token of each example of each row -> [B, K, C]."""
  return jnp.take_along_axis(logits_BTC, last_BK[:, :, None], axis=1)


def task_loss(logits, batch, loss_cfg: LossConfig, vocab_pad: int = 0):
  """(loss sum, weight sum): next-token loss, or a classifier's loss per example."""
  if "labels" in batch:
    return cross_entropy(
      pooled_logits(logits, batch["last"]),
      batch["labels"],
      batch["example_weights"],
      label_smoothing=loss_cfg.label_smoothing,
    )
  targets, weights = batch["targets"], batch["weights"]
  if "loss_at" in batch:  # the logits are those columns' alone (forward)
    at = batch["loss_at"]
    targets, weights = (jnp.take_along_axis(x, at, axis=1) for x in (targets, weights))
  return cross_entropy(
    logits, targets, weights, loss_cfg.z_loss, loss_cfg.label_smoothing, vocab_pad
  )


def _per_row_norm(x_BTD):
  return jnp.sqrt(jnp.sum(jnp.square(x_BTD.astype(jnp.float32)), axis=(1, 2), keepdims=True))


def adversarial_delta(loss_of_delta, shape, loss_cfg: LossConfig):
  """The perturbation of the input embeddings that (approximately) maximizes the loss.

  FGM: epsilon along the normalized gradient. PGD: `adv_steps` normalized gradient steps of
  `adv_step_size`, each projected back onto the L2 ball of radius epsilon (per sequence).
  """
  eps, tiny = loss_cfg.adv_epsilon, 1e-12
  grad = jax.grad(loss_of_delta)
  if loss_cfg.adversarial == "fgm":
    g = grad(jnp.zeros(shape, jnp.float32))
    return jax.lax.stop_gradient(eps * g / jnp.maximum(_per_row_norm(g), tiny))

  def step(delta, _):
    g = grad(delta)
    delta = delta + loss_cfg.adv_step_size * g / jnp.maximum(_per_row_norm(g), tiny)
    return delta * jnp.minimum(1.0, eps / jnp.maximum(_per_row_norm(delta), tiny)), None

  delta, _ = jax.lax.scan(step, jnp.zeros(shape, jnp.float32), None, length=loss_cfg.adv_steps)
  return jax.lax.stop_gradient(delta)


def reference_logps(trainable, frozen, reference, cfg, batch, loss_cfg: LossConfig):
  """The frozen reference model's segment log-probabilities of a preference batch (DPO, IPO):
  `reference`'s parameters (full fine-tuning), else the model with its LoRA adapters at zero,
  which is the base exactly; None for the losses without a reference."""
  if loss_cfg.preference not in WITH_REFERENCE:
    return None
  if not reference:
    reference = combine(jax.tree.map(jnp.zeros_like, trainable), frozen)
  logits = forward(jax.lax.stop_gradient(reference), cfg, batch, None, True)
  return jax.tree.map(jax.lax.stop_gradient, segment_logps(logits, batch))


def batch_loss(
  trainable, frozen, cfg, batch, rng, loss_cfg: LossConfig, deterministic: bool, reference=None
):  # fmt: skip
  """Objective sum (gradients flow to `trainable` only) and aux (weight sum, clean loss sum,
  sums of the task's statistics). `reference`: a preference run's reference parameters."""
  params = combine(trainable, frozen)
  if loss_cfg.preference == "orpo":  # its NLL term reads every column, the prompt's too
    batch = {k: v for k, v in batch.items() if k != "loss_at"}
  logits = forward(params, cfg, batch, rng, deterministic)
  if "pair_weights" in batch:
    ref = reference_logps(trainable, frozen, reference, cfg, batch, loss_cfg)
    loss_sum, weight_sum, stats = preference_loss(logits, batch, ref, loss_cfg)
    return loss_sum, (weight_sum, loss_sum, stats)
  loss_sum, weight_sum = task_loss(logits, batch, loss_cfg, cfg.vocab_pad)
  objective = loss_sum
  if loss_cfg.adversarial != "none":
    b, t = batch["inputs"].shape

    def perturbed_loss(delta):
      logits = forward(params, cfg, batch, rng, deterministic, delta)
      return task_loss(logits, batch, loss_cfg, cfg.vocab_pad)[0]

    delta = adversarial_delta(
      lambda d: perturbed_loss(d) / jnp.maximum(weight_sum, 1.0), (b, t, cfg.embed_dim), loss_cfg
    )
    objective = loss_sum + loss_cfg.adv_weight * perturbed_loss(delta)
  return objective, (weight_sum, loss_sum, {})


def train_step(
  state: TrainState, batch, frozen, reference=None, *, cfg, optimizer, loss_cfg: LossConfig,
  schedule,
):  # fmt: skip
  """One optimizer step over (possibly accumulated) microbatches; returns (state, metrics).

  `state.params` are the trainable parameters; `frozen` the rest of the model (may be empty);
  `reference` a preference run's frozen reference parameters (empty: none, or the base of
  LoRA adapters).
  """
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  deterministic = not (
    cfg.embed_dropout or cfg.attn_dropout or cfg.resid_dropout or cfg.lora_dropout
  )
  a = loss_cfg.grad_accum_steps

  def micro(carry, xs):
    grads, objective_sum, loss_sum, weight_sum, stats = carry
    micro_batch, i = xs
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    (micro_objective, (micro_weight, micro_loss, micro_stats)), g = grad_fn(
      state.params, frozen, cfg, micro_batch, jax.random.fold_in(rng, i), loss_cfg, deterministic,
      reference,
    )  # fmt: skip
    carry = (
      jax.tree.map(jnp.add, grads, g),
      objective_sum + micro_objective,
      loss_sum + micro_loss,
      weight_sum + micro_weight,
      jax.tree.map(jnp.add, stats, micro_stats),
    )
    return carry, None

  # Microbatch i takes rows i, i + a, ...: each device's rows stay on that device.
  micro_batches = jax.tree.map(
    lambda x: x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1), batch
  )
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  no_stats = {k: 0.0 for k in STATISTICS} if "pair_weights" in batch else {}  # summed as the loss
  (grads, objective_sum, loss_sum, weight_sum, stats), _ = jax.lax.scan(
    micro, (zeros, 0.0, 0.0, 0.0, no_stats), (micro_batches, jnp.arange(a))
  )
  denom = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = loss_sum / denom  # the clean loss (the objective adds the adversarial term)
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if loss_cfg.skip_nonfinite:
    ok = jnp.isfinite(objective_sum) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    new_state = new_state.replace(step=state.step + 1)
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "param_norm": optax.global_norm(new_state.params),
    "learning_rate": schedule(state.step),
    "tokens": weight_sum,
    **{k: v / denom for k, v in stats.items()},
  }
  if "pair_weights" in batch:
    metrics["pairs"] = metrics.pop("tokens")
  return new_state, metrics


def eval_step(params, batch, frozen=None, reference=None, *, cfg, loss_cfg: LossConfig):
  """Summed validation loss and weight of one batch (no z-loss, no smoothing); a classifier's
  predicted labels too; a preference batch's statistics' sums."""
  if "pair_weights" in batch:
    loss_sum, (weight_sum, _, stats) = batch_loss(
      params, frozen or {}, cfg, batch, None, loss_cfg, True, reference
    )
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, **stats}
  params = combine(params, frozen or {})
  logits = forward(params, cfg, batch, None, True)
  plain = dataclasses.replace(loss_cfg, z_loss=0.0, label_smoothing=0.0)
  loss_sum, weight_sum = task_loss(logits, batch, plain)
  out = {"loss_sum": loss_sum, "weight_sum": weight_sum}
  if "labels" in batch:
    out["predictions"] = jnp.argmax(pooled_logits(logits, batch["last"]), axis=-1)
  return out
