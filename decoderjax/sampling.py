"""Autoregressive sampling over the KV cache: one routine for training samples and `generate`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.config import ModelConfig
from decoderjax.model import Decoder, init_cache

Array = jax.Array


def sample_logits(logits_BV: Array, rng: Array, temperature, top_k: int, top_p) -> Array:
  """Greedy when temperature == 0, else sampling restricted to the top-k / top-p set."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  big_neg = jnp.finfo(jnp.float32).min
  if top_k:
    kth_B1 = jax.lax.top_k(scaled_BV, top_k)[0][:, -1:]
    scaled_BV = jnp.where(scaled_BV < kth_B1, big_neg, scaled_BV)
  # top-p: keep the smallest set of most likely tokens whose probability reaches top_p.
  sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
  cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
  cutoff_index_B1 = jnp.sum(cum_BV < top_p, axis=-1, keepdims=True)
  cutoff_B1 = jnp.take_along_axis(
    sorted_BV, jnp.minimum(cutoff_index_B1, sorted_BV.shape[-1] - 1), -1
  )
  scaled_BV = jnp.where(scaled_BV < cutoff_B1, big_neg, scaled_BV)
  sampled_B = jax.random.categorical(rng, scaled_BV, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B)


@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def prefill(params, cfg: ModelConfig, prompt_BT: Array, prompt_mask_BT: Array, cache_len: int):
  """Left-padded prompts into a fresh cache -> (last logits [B, V], cache, last positions [B])."""
  b = prompt_BT.shape[0]
  cache = init_cache(cfg, b, cache_len)
  positions_BT = jnp.maximum(jnp.cumsum(prompt_mask_BT, axis=1) - 1, 0)
  logits_BTV, cache = Decoder(cfg).apply(
    {"params": params}, prompt_BT, positions_BT, prompt_mask_BT.astype(jnp.int32), cache=cache
  )
  return logits_BTV[:, -1], cache, positions_BT[:, -1]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "top_k"))
def decode(
  params,
  cfg: ModelConfig,
  cache,
  logits_BV: Array,
  last_pos_B: Array,
  rng: Array,
  max_new_tokens: int,
  temperature=1.0,
  top_k: int = 0,
  top_p=1.0,
  eos_id=-1,
) -> tuple[Array, Array]:
  """Samples up to `max_new_tokens` per row in a while_loop -> (tokens [B, N], lengths [B]).

  Rows stop independently at `eos_id` (kept in the output); later slots hold `eos_id`.
  """
  model = Decoder(cfg)
  b = logits_BV.shape[0]

  def step(state):
    i, cache, logits_BV, rng, out_BN, done_B = state
    rng, key = jax.random.split(rng)
    token_B = sample_logits(logits_BV, key, temperature, top_k, top_p)
    token_B = jnp.where(done_B, eos_id, token_B)
    out_BN = out_BN.at[:, i].set(token_B)
    done_B |= token_B == eos_id
    logits_B1V, cache = model.apply(
      {"params": params},
      token_B[:, None],
      (last_pos_B + i + 1)[:, None],
      jnp.ones((b, 1), jnp.int32),
      cache=cache,
    )
    return i + 1, cache, logits_B1V[:, 0], rng, out_BN, done_B

  def keep_going(state):
    i, done_B = state[0], state[-1]
    return (i < max_new_tokens) & ~jnp.all(done_B)

  out_BN = jnp.full((b, max_new_tokens), eos_id, jnp.int32)
  done_B = jnp.zeros((b,), bool)
  state = (0, cache, logits_BV, rng, out_BN, done_B)
  _, _, _, _, out_BN, _ = jax.lax.while_loop(keep_going, step, state)
  stopped = jnp.cumsum(out_BN == eos_id, axis=1) > 0
  first_eos = jnp.argmax(stopped, axis=1) + 1
  lengths_B = jnp.where(jnp.any(stopped, axis=1), first_eos, max_new_tokens)
  return out_BN, lengths_B


def generate_tokens(
  params,
  cfg: ModelConfig,
  prompt_BT,
  prompt_mask_BT,
  rng,
  max_new_tokens: int,
  temperature=1.0,
  top_k: int = 0,
  top_p=1.0,
  eos_id=-1,
):
  """Prefill then decode: left-padded prompts -> (new tokens [B, N], lengths [B])."""
  cache_len = prompt_BT.shape[1] + max_new_tokens
  logits_BV, cache, last_pos_B = prefill(params, cfg, prompt_BT, prompt_mask_BT, cache_len)
  return decode(
    params, cfg, cache, logits_BV, last_pos_B, rng, max_new_tokens, temperature, top_k, top_p,
    eos_id,
  )  # fmt: skip


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> left-padded [B, T] ids and a [B, T] mask of real tokens."""
  t = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, t - len(p) :] = p
    mask[row, t - len(p) :] = 1
  return tokens, mask
