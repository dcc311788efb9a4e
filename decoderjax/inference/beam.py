"""Beam search as transformers does it, inside one `lax.while_loop` over the KV cache.

Each step keeps the top 2K (more with several stop ids) continuations of all K beams; those
ending in a stop token (or at `max_new_tokens`) compete for the K finished hypotheses with
score sum(log p) / length ** length_penalty, the rest continue as the K running beams.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from decoderjax.inference.sampling import NEG_INF, cached_forward, last_position, prompt_positions
from decoderjax.model.config import ModelConfig
from decoderjax.model.kv_cache import KVCache, init_cache

Array = jax.Array


class BeamState(NamedTuple):
  """What the search loop carries, for B rows of K beams over N new-token slots."""

  step: Array  # [] tokens generated so far
  cache: KVCache  # B * K rows, the beams of a row together
  logits: Array  # [B * K, V] next-token logits of the running beams
  running: Array  # [B, K, N] running beams' tokens
  running_scores: Array  # [B, K] their summed log probabilities
  seqs: Array  # [B, K, N] finished hypotheses
  scores: Array  # [B, K] their length-penalized scores (NEG_INF: an empty slot)
  finished: Array  # [B, K] bool: slot holds a finished hypothesis
  open: Array  # [B, 1] bool: a running beam can still beat the finished ones
  all_hit: Array  # [] bool: every continuation of the last step stopped


class _Search(NamedTuple):
  """The static settings and prompt-derived constants a step reads."""

  params: dict
  cfg: ModelConfig
  stop_ids: Array
  b: int
  k: int
  n: int
  keep: int
  length_penalty: float
  early_stopping: bool | str
  last_positions: Array  # [B] position of each row's last prompt token


def _gather(x_BK, index_BJ):
  """Beams of each row, chosen by index."""
  return x_BK[jnp.arange(x_BK.shape[0])[:, None], index_BJ]


def _finish(s: BeamState, w: _Search, top_scores, hits_BJ, candidates):
  """The stopped continuations among the top K join the finished hypotheses if good enough."""
  top_k_mask = (jnp.arange(w.keep) < w.k)[None, :]
  final = top_scores / ((s.step + 1.0) ** w.length_penalty)
  if w.early_stopping is True:
    final += jnp.all(s.finished, axis=1, keepdims=True) * NEG_INF
  final += ~s.open * NEG_INF
  final += ~(hits_BJ & top_k_mask) * NEG_INF
  best_scores, best = jax.lax.top_k(jnp.concatenate([s.scores, final], axis=1), w.k)
  seqs = _gather(jnp.concatenate([s.seqs, candidates], axis=1), best)
  finished = _gather(jnp.concatenate([s.finished, hits_BJ & top_k_mask], axis=1), best)
  return seqs, best_scores, finished


def _step(w: _Search, s: BeamState) -> BeamState:
  b, k, n = w.b, w.k, w.n
  v = s.logits.shape[-1]
  log_probs_BKV = jax.nn.log_softmax(s.logits.astype(jnp.float32), -1).reshape(b, k, v)
  flat_BKV = (log_probs_BKV + s.running_scores[:, :, None]).reshape(b, k * v)
  top_scores, top_index = jax.lax.top_k(flat_BKV, w.keep)
  beam_BJ, token_BJ = top_index // v, top_index % v
  candidates = _gather(s.running, beam_BJ).at[:, :, s.step].set(token_BJ)  # [B, 2K, N]
  hits_BJ = jnp.isin(token_BJ, w.stop_ids) | (s.step + 1 >= n)
  # The K best continuations that did not stop run on.
  live_scores, live_index = jax.lax.top_k(top_scores + hits_BJ * NEG_INF, k)
  running = _gather(candidates, live_index)
  seqs, scores, finished = _finish(s, w, top_scores, hits_BJ, candidates)
  # Reorder the cache to the surviving beams and feed their new tokens.
  rows_B1 = jnp.arange(b)[:, None]
  cache = s.cache.select_rows((rows_B1 * k + _gather(beam_BJ, live_index)).reshape(-1))
  new_X = _gather(token_BJ, live_index).reshape(-1)
  position_X = jnp.repeat(w.last_positions, k, axis=0) + s.step + 1
  ones_X1 = jnp.ones((b * k, 1), jnp.int32)
  logits_X1V, cache = cached_forward(
    w.params, w.cfg, new_X[:, None], position_X[:, None], ones_X1, cache
  )
  i = s.step + 1
  best_length = n if (w.early_stopping == "never" and w.length_penalty > 0) else i
  best_running_B1 = live_scores[:, :1] / (best_length**w.length_penalty)
  worst_BK = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG_INF)
  still_open = s.open & jnp.any(best_running_B1 > worst_BK, axis=1, keepdims=True)
  return BeamState(
    i, cache, logits_X1V[:, 0], running, live_scores, seqs, scores, finished, still_open,
    jnp.all(hits_BJ),  # every continuation stopped: nothing left to extend
  )  # fmt: skip


def _keep_going(w: _Search, s: BeamState) -> Array:
  stop_all = jnp.all(s.finished) & (w.early_stopping is True)
  return (s.step < w.n) & jnp.any(s.open) & ~stop_all & ~s.all_hit


@functools.partial(
  jax.jit,
  static_argnames=("cfg", "max_new_tokens", "num_beams", "length_penalty", "early_stopping"),
)
def beam_search(
  params,
  cfg: ModelConfig,
  prompt_BT: Array,
  mask_BT: Array,
  stop_ids: Array,
  max_new_tokens: int,
  num_beams: int,
  length_penalty: float = 1.0,
  early_stopping: bool | str = False,
  pad_id: int = 0,
) -> tuple[Array, Array, Array]:
  """-> (best tokens [B, N], lengths [B], scores [B]) of left-padded prompts.

  `early_stopping`: True stops once K hypotheses are finished; False stops when the best
  running beam can no longer beat them at its current length; "never" at its best length.
  """
  b, t = prompt_BT.shape
  k, n = num_beams, max_new_tokens
  repeat = lambda x: jnp.repeat(x, k, axis=0)  # [B, ...] -> [B * K, ...], beams of a row together
  cache = init_cache(cfg, b * k, cfg.prompt_tokens + t + n)
  positions_BT = prompt_positions(mask_BT)
  tokens_BT = repeat(prompt_BT)
  logits_BTV, cache = cached_forward(
    params, cfg, tokens_BT, repeat(positions_BT), repeat(mask_BT), cache, True,
    last_position(tokens_BT),
  )  # fmt: skip
  keep = max(2, 1 + stop_ids.shape[0]) * k
  w = _Search(
    params, cfg, stop_ids, b, k, n, keep, length_penalty, early_stopping, positions_BT[:, -1]
  )
  running = jnp.full((b, k, n), pad_id, jnp.int32)
  state = BeamState(
    step=jnp.zeros((), jnp.int32),
    cache=cache,
    logits=logits_BTV[:, -1],
    running=running,
    running_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG_INF),  # first step: one beam, no copies
    seqs=running,
    scores=jnp.full((b, k), NEG_INF),
    finished=jnp.zeros((b, k), bool),
    open=jnp.ones((b, 1), bool),
    all_hit=jnp.zeros((), bool),
  )
  final = jax.lax.while_loop(functools.partial(_keep_going, w), functools.partial(_step, w), state)
  seqs, scores = final.seqs[:, 0], final.scores[:, 0]
  stops_BN = jnp.isin(seqs, stop_ids)
  lengths = jnp.where(stops_BN.any(axis=1), jnp.argmax(stops_BN, axis=1) + 1, n)
  return seqs, lengths, scores
