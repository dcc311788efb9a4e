"""Autoregressive generation over the KV cache: one routine for training samples and `generate`.

`prefill` runs the (left-padded, length-bucketed) prompts into a fresh cache; `decode` samples
inside a `lax.while_loop` up to a step limit, so the host can stream tokens chunk by chunk and
stop rows on stop strings without recompiling. Beam search is beam.py.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import Decoder
from decoderjax.model.kv_cache import KVCache, init_cache

Array = jax.Array
NEG_INF = -1.0e9  # transformers' "impossible" score, kept for identical beam bookkeeping


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen (static: a change recompiles the decode loop).

  Order, as in transformers: repetition/frequency/presence penalties on the raw logits, then
  temperature, top-k, top-p and min-p. `temperature=0` is greedy (the penalties still apply).
  """

  temperature: float = 1.0
  top_k: int = 0  # 0: no limit
  top_p: float = 1.0  # nucleus mass; 1: no limit
  min_p: float = 0.0  # drop tokens below min_p x the top probability
  repetition_penalty: float = 1.0  # >1 discourages tokens of the prompt and the output so far
  frequency_penalty: float = 0.0  # subtracted per earlier occurrence in the output
  presence_penalty: float = 0.0  # subtracted once for any token already in the output

  def __post_init__(self):
    for name, ok, rule in (
      ("temperature", self.temperature >= 0, ">= 0"),
      ("top_k", self.top_k >= 0, ">= 0"),
      ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
      ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
      ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
    ):
      if not ok:
        raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")

  @property
  def penalized(self) -> bool:
    return (self.repetition_penalty, self.frequency_penalty, self.presence_penalty) != (1, 0, 0)


def greedy_tokens(logits_BV: Array) -> Array:
  """jnp.argmax over the vocabulary (the first index on ties; NaN ranks as +inf) as two plain
  reductions, which XLA CPU runs faster than its variadic arg-max reduce."""
  logits_BV = jnp.where(jnp.isnan(logits_BV), jnp.inf, logits_BV)  # NaN wins, as in argmax
  hit_BV = logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True)
  v = logits_BV.shape[-1]
  return jnp.min(jnp.where(hit_BV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def restrict(scaled_BV: Array, top_k_B: Array, top_p_B: Array, min_p_B: Array) -> Array:
  """Temperature-scaled logits with the tokens outside each row's top-k (0: no limit), top-p
  nucleus (1: no limit) and min-p floor set to NEG_INF, in that order."""
  v = scaled_BV.shape[-1]
  sorted_BV = jnp.sort(scaled_BV, axis=-1)[:, ::-1]
  k_B1 = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v).reshape(-1, 1)
  kth_B1 = jnp.take_along_axis(sorted_BV, k_B1 - 1, -1)
  scaled_BV = jnp.where(scaled_BV < kth_B1, NEG_INF, scaled_BV)
  # top-p: the smallest set of most likely tokens whose probability reaches it
  sorted_BV = jnp.where(sorted_BV < kth_B1, NEG_INF, sorted_BV)
  cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
  top_p_B1 = jnp.reshape(top_p_B, (-1, 1))
  last_B1 = jnp.minimum(jnp.sum(cum_BV < top_p_B1, axis=-1, keepdims=True), v - 1)
  cutoff_B1 = jnp.where(top_p_B1 < 1, jnp.take_along_axis(sorted_BV, last_B1, -1), -jnp.inf)
  scaled_BV = jnp.where(scaled_BV < cutoff_B1, NEG_INF, scaled_BV)
  probs_BV = jax.nn.softmax(scaled_BV, axis=-1)
  floor_B1 = jnp.reshape(min_p_B, (-1, 1)) * jnp.max(probs_BV, axis=-1, keepdims=True)
  return jnp.where(probs_BV >= floor_B1, scaled_BV, NEG_INF)


def sample_logits(logits_BV: Array, rng: Array, cfg: SamplingConfig) -> Array:
  """Greedy when cfg.temperature == 0, else sampling restricted by top-k, top-p and min-p."""
  logits_BV = logits_BV.astype(jnp.float32)
  if cfg.temperature == 0:
    return greedy_tokens(logits_BV)
  scaled_BV = logits_BV / cfg.temperature
  if cfg.top_k or cfg.top_p < 1 or cfg.min_p:
    scaled_BV = restrict(scaled_BV, jnp.int32(cfg.top_k), cfg.top_p, cfg.min_p)
  return jax.random.categorical(rng, scaled_BV, axis=-1)


def penalize(logits_BV: Array, seen_BV: Array, counts_BV: Array, cfg: SamplingConfig) -> Array:
  """Repetition penalty (transformers: tokens of prompt and output), then frequency/presence
  penalties (OpenAI: occurrences in the output)."""
  if not cfg.penalized:
    return logits_BV
  return penalize_rows(
    logits_BV, seen_BV, counts_BV, cfg.repetition_penalty, cfg.frequency_penalty,
    cfg.presence_penalty,
  )  # fmt: skip


def penalize_rows(logits_BV, seen_BV, counts_BV, repetition_B, frequency_B, presence_B):
  """`penalize` with each row's own penalties ([B] arrays, or scalars for all rows)."""
  column = lambda x: jnp.reshape(jnp.asarray(x, logits_BV.dtype), (-1, 1))
  p_B1 = column(repetition_B)
  penalized_BV = jnp.where(logits_BV > 0, logits_BV / p_B1, logits_BV * p_B1)
  logits_BV = jnp.where(seen_BV | (counts_BV > 0), penalized_BV, logits_BV)
  return (
    logits_BV
    - column(frequency_B) * counts_BV
    - column(presence_B) * (counts_BV > 0).astype(logits_BV.dtype)
  )


class DecodeState(NamedTuple):
  """Everything the decode loop carries; the host resumes it chunk by chunk."""

  step: Array  # [] tokens generated so far
  cache: KVCache
  logits: Array  # [B, V] logits for the next token
  position: Array  # [B] position of the next token
  rng: Array
  tokens: Array  # [B, N] generated tokens; stop tokens are kept, later slots hold the pad id
  done: Array  # [B] row finished (stop token, or stopped by the host)
  seen: Array  # [B, V] bool: token in the prompt ([B, 0] when no penalty is on)
  counts: Array  # [B, V] int32: occurrences in the output ([B, 0] when no penalty is on)


def bucket_length(n: int, limit: int, smallest: int = 16, fine: bool = False) -> int:
  """Prompt lengths round up to a power of two (at most `limit`): few shapes, few compiles.
  `fine` adds the midpoints (24, 48, 96, ...): at most a third of a row is padding."""
  bucket = max(smallest, 1 << max(n - 1, 0).bit_length())
  if fine and bucket > smallest and 3 * bucket // 4 >= n:
    bucket = 3 * bucket // 4
  return max(n, min(bucket, limit))


def left_pad(prompts: list[list[int]], length: int = 0, pad_id: int = 0):
  """Token lists -> left-padded [B, T] ids and a [B, T] mask of real tokens (T >= `length`)."""
  t = max(length, max(len(p) for p in prompts))
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  mask = np.zeros((len(prompts), t), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, t - len(p) :] = p
    mask[row, t - len(p) :] = 1
  return tokens, mask


def stop_array(stop_ids) -> Array:
  """Stop token ids as the [E] int32 array the decode loops take (-1, never sampled, if none)."""
  return jnp.asarray(list(stop_ids) or [-1], jnp.int32)


def new_tokens(tokens_N, length: int, stop_ids) -> list[int]:
  """A row's first `length` generated ids without its stop tokens (what users see)."""
  return [int(t) for t in tokens_N[:length] if int(t) not in stop_ids]


def prompt_positions(mask_BT: Array) -> Array:
  """Positions of left-padded prompts: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)


def cached_forward(
  params, cfg, tokens_BT, positions_BT, segments_BT, cache, start=False, logits_at_BN=None,
  source_BM=None, source_mask_BM=None,
):  # fmt: skip
  """The model over `cache` -> (logits, the cache with these tokens written). A cross-attention
  model's first call takes the source tokens (and their mask), whose memory the cache keeps."""
  return Decoder(cfg).apply(
    {"params": params},
    tokens_BT,
    positions_BT,
    segments_BT.astype(jnp.int32),
    cache=cache,
    start=start,
    logits_at_BN=logits_at_BN,
    source_BM=source_BM,
    memory_mask_BM=source_mask_BM,
  )


def last_position(tokens_BT: Array) -> Array:
  """[B, 1] index of each left-padded row's last token: the one prefill needs logits of."""
  b, t = tokens_BT.shape
  return jnp.full((b, 1), t - 1, jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "pad_id"))
def prefill(
  params,
  cfg: ModelConfig,
  prompt_BT: Array,
  mask_BT: Array,
  rng: Array,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  pad_id: int = 0,
  source_BM: Array | None = None,
  source_mask_BM: Array | None = None,
) -> DecodeState:
  """Left-padded prompts into a fresh cache of T + max_new_tokens slots -> the decode state.
  A cross-attention model's rows read their `source_BM` (right-padded ids, `source_mask_BM`)."""
  b, t = prompt_BT.shape
  cache = init_cache(cfg, b, cfg.prompt_tokens + t + max_new_tokens)
  positions_BT = prompt_positions(mask_BT)
  logits_BTV, cache = cached_forward(
    params, cfg, prompt_BT, positions_BT, mask_BT, cache, True, last_position(prompt_BT),
    source_BM, source_mask_BM,
  )  # fmt: skip
  v = logits_BTV.shape[-1] if sampling.penalized else 0
  seen_BV = jnp.zeros((b, v), bool)
  if v:
    seen_BV = seen_BV.at[jnp.arange(b)[:, None], prompt_BT].max(mask_BT.astype(bool))
  return DecodeState(
    step=jnp.zeros((), jnp.int32),
    cache=cache,
    logits=logits_BTV[:, -1],
    position=positions_BT[:, -1] + 1,
    rng=rng,
    tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
    done=jnp.zeros((b,), bool),
    seen=seen_BV,
    counts=jnp.zeros((b, v), jnp.int32),
  )


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "pad_id"), donate_argnums=2)
def decode(
  params,
  cfg: ModelConfig,
  state: DecodeState,
  until: Array,
  stop_ids: Array,
  sampling: SamplingConfig = SamplingConfig(),
  pad_id: int = 0,
) -> DecodeState:
  """Samples until every row stopped, `max_new_tokens` or step `until` (a chunk boundary).

  A row stops at any token of `stop_ids` ([E] int32; the stop token is kept).
  """
  b, n = state.tokens.shape
  rows_B = jnp.arange(b)

  def step(s: DecodeState) -> DecodeState:
    rng, key = jax.random.split(s.rng)
    logits_BV = penalize(s.logits, s.seen, s.counts, sampling)
    token_B = jnp.where(s.done, pad_id, sample_logits(logits_BV, key, sampling))
    counts_BV = s.counts
    if sampling.penalized:
      counts_BV = counts_BV.at[rows_B, token_B].add(jnp.where(s.done, 0, 1))
    logits_B1V, cache = cached_forward(
      params, cfg, token_B[:, None], s.position[:, None], jnp.ones((b, 1), jnp.int32), s.cache
    )
    return DecodeState(
      step=s.step + 1,
      cache=cache,
      logits=logits_B1V[:, 0],
      position=s.position + 1,
      rng=rng,
      tokens=s.tokens.at[:, s.step].set(token_B),
      done=s.done | jnp.isin(token_B, stop_ids),
      seen=s.seen,
      counts=counts_BV,
    )

  def keep_going(s: DecodeState):
    return (s.step < jnp.minimum(until, n)) & ~jnp.all(s.done)

  return jax.lax.while_loop(keep_going, step, state)


def output_lengths(tokens_BN: np.ndarray, steps: int, stop_ids) -> np.ndarray:
  """New tokens per row: through the first stop token, else all `steps` generated."""
  stops_BN = np.isin(tokens_BN[:, :steps], np.asarray(stop_ids, np.int32))
  return np.where(stops_BN.any(axis=1), stops_BN.argmax(axis=1) + 1, steps)


def generate_tokens(
  params,
  cfg: ModelConfig,
  prompt_BT,
  mask_BT,
  rng: Array,
  max_new_tokens: int,
  sampling: SamplingConfig = SamplingConfig(),
  stop_ids=(),
  chunk: int = 0,
  on_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
  programs: tuple | None = None,
  source: tuple = (),
) -> tuple[np.ndarray, np.ndarray]:
  """Prefill then decode (`run_decode`) -> (new tokens [B, N], lengths [B]), stop tokens
  included. `programs` are compiled (prefill, decode) from `compile_programs`. `source`: a
  cross-attention model's (source ids [B, M], their mask [B, M])."""
  prefill_fn, decode_fn = programs or (
    lambda params, prompt_BT, mask_BT, rng, *source: prefill(
      params, cfg, prompt_BT, mask_BT, rng, max_new_tokens, sampling, 0, *source
    ),
    lambda params, state, until, stop_ids: decode(params, cfg, state, until, stop_ids, sampling),
  )
  # One program in flight: XLA's in-process CPU collectives can deadlock when one device starts
  # the next program while another still runs the previous one.
  state = jax.block_until_ready(prefill_fn(params, prompt_BT, mask_BT, rng, *source))
  return run_decode(params, state, decode_fn, max_new_tokens, stop_ids, chunk, on_chunk)


def run_decode(
  params,
  state: DecodeState,
  decode_fn,
  max_new_tokens: int,
  stop_ids=(),
  chunk: int = 0,
  on_chunk: Callable[[np.ndarray, np.ndarray], np.ndarray | None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes a prefilled state to the end -> (new tokens [B, N], lengths [B]).

  With `chunk`, decoding returns to the host every `chunk` tokens and calls
  `on_chunk(tokens_BN, lengths_B)`, which may return a [B] bool array of rows to stop (stop
  strings).
  """
  stop = stop_array(stop_ids)
  while True:
    until = min(int(state.step) + (chunk or max_new_tokens), max_new_tokens)
    state = jax.block_until_ready(decode_fn(params, state, until, stop))
    steps, done = int(state.step), np.asarray(state.done)
    if on_chunk is not None:
      tokens = np.asarray(state.tokens)
      stopped = on_chunk(tokens, output_lengths(tokens, steps, stop_ids))
      if stopped is not None and np.any(stopped & ~done):
        done = done | stopped
        state = state._replace(done=jnp.asarray(done))
    if steps >= max_new_tokens or done.all():
      tokens = np.asarray(state.tokens)
      return tokens, output_lengths(tokens, steps, stop_ids)


def compile_programs(
  params, cfg, prompt_BT, mask_BT, rng, max_new_tokens, sampling, stop_ids, source=()
):  # fmt: skip
  """Ahead-of-time compiled (prefill, decode) for these shapes, so timings exclude compiling;
  prefill takes (params, prompt, mask, rng, *source)."""
  prefill_fn = prefill.lower(
    params, cfg, prompt_BT, mask_BT, rng, max_new_tokens, sampling, 0, *source
  ).compile()
  state = jax.tree.map(  # decode takes the state as prefill lays it out over the mesh
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), prefill_fn.out_info
  )
  decode_fn = decode.lower(params, cfg, state, 0, stop_array(stop_ids), sampling).compile()
  return prefill_fn, decode_fn
