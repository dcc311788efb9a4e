"""Pure, jit-able train and eval steps over a TrainState pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from decoderjax.config import ModelConfig
from decoderjax.model import Decoder

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  z_loss: float = 0.0  # weight of log(Z)^2, keeps the softmax normalizer near 1
  label_smoothing: float = 0.0
  grad_accum_steps: int = 1  # the batch is split into this many sequential microbatches
  skip_nonfinite: bool = False  # set from train.on_nonfinite='skip': drop non-finite updates


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  opt_state: Any
  rng: Array  # raw uint32 key data, so checkpoints hold plain arrays


def cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss=0.0, label_smoothing=0.0):
  """Weighted token cross entropy in float32 -> (loss sum, weight sum)."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  nll_BT = log_z_BT - target_logit_BT
  if label_smoothing:
    uniform_BT = log_z_BT - jnp.mean(logits_BTV, axis=-1)
    nll_BT = (1 - label_smoothing) * nll_BT + label_smoothing * uniform_BT
  if z_loss:
    nll_BT += z_loss * jnp.square(log_z_BT)
  return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)


def batch_loss(params, cfg: ModelConfig, batch, rng, loss_cfg: LossConfig, deterministic: bool):
  logits_BTV, _ = Decoder(cfg).apply(
    {"params": params},
    batch["inputs"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=deterministic,
    rngs=None if deterministic else {"dropout": rng},
  )
  return cross_entropy(
    logits_BTV, batch["targets"], batch["weights"], loss_cfg.z_loss, loss_cfg.label_smoothing
  )


def train_step(state: TrainState, batch, *, cfg, optimizer, loss_cfg: LossConfig, schedule):
  """One optimizer step over (possibly accumulated) microbatches; returns (state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  deterministic = not (cfg.embed_dropout or cfg.attn_dropout or cfg.resid_dropout)
  a = loss_cfg.grad_accum_steps

  def micro(carry, xs):
    grads, loss_sum, weight_sum = carry
    micro_batch, i = xs
    grad_fn = jax.value_and_grad(batch_loss, has_aux=True)
    (micro_loss, micro_weight), g = grad_fn(
      state.params, cfg, micro_batch, jax.random.fold_in(rng, i), loss_cfg, deterministic
    )
    carry = (jax.tree.map(jnp.add, grads, g), loss_sum + micro_loss, weight_sum + micro_weight)
    return carry, None

  # Microbatch i takes rows i, i + a, ...: each device's rows stay on that device.
  micro_batches = jax.tree.map(
    lambda x: x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1), batch
  )
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  (grads, loss_sum, weight_sum), _ = jax.lax.scan(
    micro, (zeros, 0.0, 0.0), (micro_batches, jnp.arange(a))
  )
  denom = jnp.maximum(weight_sum, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  loss = loss_sum / denom
  grad_norm = optax.global_norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if loss_cfg.skip_nonfinite:
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, state)
    new_state = new_state.replace(step=state.step + 1)
  metrics = {
    "loss": loss,
    "grad_norm": grad_norm,
    "param_norm": optax.global_norm(new_state.params),
    "learning_rate": schedule(state.step),
    "tokens": weight_sum,
  }
  return new_state, metrics


def eval_step(params, batch, *, cfg, loss_cfg: LossConfig):
  """Summed validation loss and token count of one batch (no z-loss, no smoothing)."""
  return batch_loss(
    params, cfg, batch, None, dataclasses.replace(loss_cfg, z_loss=0.0, label_smoothing=0.0), True
  )
