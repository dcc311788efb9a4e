"""Log-likelihoods of token sequences, as evaluation harnesses define them.

A request is (context ids, continuation ids): the continuation's summed log-probability given
the context, and whether greedy decoding would have produced it. Requests run sorted by length
in fixed-size batches padded to a few bucket lengths, so a handful of compiled programs serves a
whole evaluation. Long texts are scored in windows (`text_windows`) with every token predicted
once; `perplexities` turns the total into the token-, word- and byte-level figures.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.inference import sampling
from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import Decoder
from decoderjax.model.kv_cache import init_cache
from decoderjax.runtime import sharding

Request = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def _logp_and_greedy(logits_BTV, targets_BT, weights_BT):
  """Per row: summed log p of the weighted targets, and whether each is the arg-max."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  greedy_BT = sampling.greedy_tokens(logits_BTV) == targets_BT
  real_BT = weights_BT > 0  # `where`, not a product: a padding row's NaN stays out
  logp_B = jnp.sum(jnp.where(real_BT, target_BT - log_z_BT, 0.0), axis=-1)
  return logp_B, jnp.all(greedy_BT | ~real_BT, axis=-1)


@functools.partial(jax.jit, static_argnames="cfg")
def score_rows(params, cfg: ModelConfig, inputs_BT, at_BN, targets_BN, weights_BN):
  """Per row: (summed log p of the weighted targets, every weighted target the greedy pick);
  target n is the token after input position at_BN[:, n].

  Rows are right-padded; causal attention keeps padding out of the real positions, so no
  segment ids are needed."""
  logits_BNV, _ = Decoder(cfg).apply({"params": params}, inputs_BT, logits_at_BN=at_BN)
  return _logp_and_greedy(logits_BNV, targets_BN, weights_BN)


SHARED = -1  # the segment id of a shared context: every continuation of its row sees it


@functools.partial(jax.jit, static_argnames=("cfg", "length"))
def prefill_contexts(params, cfg: ModelConfig, context_BT, mask_BT, length: int):
  """Left-padded contexts into a fresh cache of `length` slots, as shared prefixes -> (the
  cache, the float32 logits after each context's last token)."""
  cache = init_cache(cfg, context_BT.shape[0], length)
  positions_BT = sampling.prompt_positions(mask_BT)
  logits_BTV, cache = sampling.cached_forward(
    params, cfg, context_BT, positions_BT, SHARED * mask_BT, cache, True,
    sampling.last_position(context_BT),
  )  # fmt: skip
  return cache, logits_BTV[:, -1].astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "choices"))
def score_continuations(params, cfg: ModelConfig, cache, last_BV, side_by_side, choices: int):
  """Each row's continuations side by side after its cached context (`side_by_side`, as
  `SideBySide.arrays` lays them out): they see the context and themselves, never each other
  -> per (row, continuation) the summed log p and whether every token is the greedy pick,
  [B, choices] each."""
  cont_BT, choice_BT, positions_BT, at_BN, source_BT = side_by_side
  logits_BNV, _ = sampling.cached_forward(
    params, cfg, cont_BT, positions_BT, choice_BT, cache, logits_at_BN=at_BN
  )
  logits_BSV = jnp.concatenate([last_BV[:, None], logits_BNV.astype(jnp.float32)], axis=1)
  b, s, v = logits_BSV.shape
  log_z_BT = jnp.take_along_axis(jax.nn.logsumexp(logits_BSV, axis=-1), source_BT, axis=1)
  greedy_BT = jnp.take_along_axis(sampling.greedy_tokens(logits_BSV), source_BT, axis=1)
  flat_BT = source_BT * v + cont_BT  # logits_BSV[b, source, token], read as one gather
  target_BT = jnp.take_along_axis(logits_BSV.reshape(b, s * v), flat_BT, axis=1)
  member_BTK = choice_BT[..., None] == jnp.arange(1, choices + 1)[None, None, :]
  logp_BK = jnp.sum(jnp.where(member_BTK, (target_BT - log_z_BT)[..., None], 0.0), axis=1)
  return logp_BK, jnp.all((greedy_BT == cont_BT)[..., None] | ~member_BTK, axis=1)


def side_by_side(groups, batch_size: int, t: int):
  """Continuation rows for `score_continuations`: each group's continuations one after another
  (choice ids 1, 2, ...; positions from the context's end), the slots whose outputs predict a
  next token of the same continuation (`at`), and for each token where its prediction comes
  from (`source`: 0 the context's last logits, n the output at at[n - 1]); `t` slots a row."""
  cont, choice, positions, source = np.zeros((4, batch_size, t), np.int32)
  ats = []
  for g, group in enumerate(groups):
    slot, at = 0, []
    for m, (context, continuation) in enumerate(group):
      span = slice(slot, slot + len(continuation))
      cont[g, span], choice[g, span] = continuation, m + 1
      positions[g, span] = len(context) + np.arange(len(continuation))
      source[g, span] = [0] + list(range(len(at) + 1, len(at) + len(continuation)))
      at += range(span.start, span.stop - 1)
      slot = span.stop
    ats.append(at)
  n = sampling.bucket_length(max(map(len, ats)) or 1, t, fine=True)
  at_BN = np.zeros((batch_size, n), np.int32)
  for g, at in enumerate(ats):
    at_BN[g, : len(at)] = at
  return cont, choice, positions, at_BN, source


def request_row(context: Sequence[int], continuation: Sequence[int], length: int):
  """(inputs, targets, weights) of one request, cut from the left to `length` inputs."""
  if not continuation:
    raise ValueError("a request needs at least one continuation token")
  whole = (list(context) + list(continuation))[-(length + 1) :]
  weights = np.zeros(len(whole) - 1, np.float32)
  weights[-len(continuation) :] = 1.0
  return np.asarray(whole[:-1]), np.asarray(whole[1:]), weights


class Scorer:
  """Scores requests with a model: sorted by length, `batch_size` rows a call, bucketed lengths.

  Requests that share a context (a multiple-choice question's choices) run it once: the
  contexts prefill a KV cache and each continuation is scored against it. `length` is the
  longest row (the model's room, or less); a request longer than that loses context from the
  left, as the harness's `hf` backend does, and `on_truncate(n)` hears how many did."""

  def __init__(self, params, cfg: ModelConfig, batch_size: int, length: int, mesh=None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= length <= cfg.text_len:
      raise ValueError(f"score length {length} must be in [1, {cfg.text_len}] for this model")
    self.params, self.cfg, self.mesh = params, cfg, mesh
    self.batch_size, self.length = batch_size, length

  def __call__(self, requests: list[Request], on_truncate=None, progress=None):
    """[(log p, is_greedy)] in the order of `requests`; `progress(n)` hears of each batch."""
    cut = sum(len(c) + len(x) - 1 > self.length for c, x in requests)
    if cut and on_truncate is not None:
      on_truncate(cut)
    groups = self.shared_contexts(requests)
    shared = {i for group in groups for i in group}
    plain = [i for i in range(len(requests)) if i not in shared]
    results = [None] * len(requests)
    rows = [request_row(*requests[i], self.length) for i in plain]
    for i, out in zip(plain, self.score(rows, progress), strict=True):
      results[i] = out
    for first in range(0, len(groups), self.batch_size):
      chunk = groups[first : first + self.batch_size]
      scores = self.score_shared([[requests[i] for i in group] for group in chunk])
      for (g, m), out in scores:
        results[chunk[g][m]] = out
      if progress is not None:
        progress(sum(map(len, chunk)))
    return results

  def shared_contexts(self, requests: list[Request]) -> list[list[int]]:
    """Groups of two or more requests with one context and no truncation, longest first."""
    if self.cfg.prompt_tokens:
      return []  # a soft prompt comes before every context: rows take the plain path
    by_context = {}
    for i, (context, continuation) in enumerate(requests):
      if context and len(context) + len(continuation) - 1 <= self.length:
        by_context.setdefault(tuple(context), []).append(i)
    groups = [group for group in by_context.values() if len(group) > 1]
    return sorted(groups, key=lambda group: -len(requests[group[0]][0]))

  def score_shared(self, groups: list[list[Request]]):
    """Up to batch_size groups sharing a context each -> ((group, member), result) pairs: the
    contexts prefill a cache, then one call scores every continuation, side by side."""
    members = [(g, m) for g, group in enumerate(groups) for m in range(len(group))]
    contexts = [list(group[0][0]) for group in groups]
    width = max(sum(len(x) for _, x in group) for group in groups)
    tx = sampling.bucket_length(width, self.cfg.max_seq_len, fine=True)
    tc = sampling.bucket_length(max(map(len, contexts)), self.cfg.max_seq_len - tx, fine=True)
    if tc + tx > self.cfg.max_seq_len:  # no bucketed cache fits: score them as plain rows
      rows = [request_row(*groups[g][m], self.length) for g, m in members]
      return zip(members, self.score(rows), strict=True)
    contexts += [contexts[0]] * (self.batch_size - len(contexts))
    tokens, mask = sampling.left_pad(contexts, tc)
    rows = side_by_side(groups, self.batch_size, tx)
    k = max(map(len, groups))
    slots = sampling.bucket_length(tc + tx, self.cfg.max_seq_len)  # coarse: few programs
    with sharding.activate(self.mesh):
      cache, last_BV = prefill_contexts(self.params, self.cfg, tokens, mask, slots)
      logp_BK, greedy_BK = jax.device_get(
        score_continuations(self.params, self.cfg, cache, last_BV, rows, k)
      )
    return (((g, m), (float(logp_BK[g, m]), bool(greedy_BK[g, m]))) for g, m in members)

  def score(self, rows, progress: Callable[[int], None] | None = None):
    """(inputs, targets, weights) rows -> [(log p, is_greedy)] in their order; run longest
    first, so each batch pads little."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    for first in range(0, len(order), self.batch_size):
      chunk = order[first : first + self.batch_size]
      for i, out in zip(chunk, self.score_batch([rows[i] for i in chunk]), strict=True):
        results[i] = out
      if progress is not None:
        progress(len(chunk))
    return results

  def score_batch(self, rows) -> list[tuple[float, bool]]:
    """One padded batch of (inputs, targets, weights) rows -> [(log p, is_greedy)] per row."""
    t = sampling.bucket_length(max(len(i) for i, _, _ in rows), self.length, fine=True)
    scored = [np.flatnonzero(weights) for _, _, weights in rows]  # the head reads these alone
    n = sampling.bucket_length(max(map(len, scored)), t, fine=True)
    inputs_BT = np.zeros((self.batch_size, t), np.int32)
    at_BN, targets_BN = np.zeros((2, self.batch_size, n), np.int32)
    weights_BN = np.zeros((self.batch_size, n), np.float32)
    for row, ((inputs, targets, _), at) in enumerate(zip(rows, scored, strict=True)):
      inputs_BT[row, : len(inputs)] = inputs
      at_BN[row, : len(at)], targets_BN[row, : len(at)], weights_BN[row, : len(at)] = (
        at, targets[at], 1.0
      )  # fmt: skip
    with sharding.activate(self.mesh):
      arrays = (inputs_BT, at_BN, targets_BN, weights_BN)
      logp_B, greedy_B = jax.device_get(score_rows(self.params, self.cfg, *arrays))
    return [(float(logp_B[i]), bool(greedy_B[i])) for i in range(len(rows))]


def text_windows(tokens: Sequence[int], prefix: int | None, length: int, stride: int):
  """Windows over a text that predict each token once: [(inputs, targets, weights)].

  The text reads after `prefix` (BOS or end-of-text), so its first token is predicted too; with
  no prefix the first token is context only. Window k starts at token k * stride and scores the
  tokens the windows before it did not, with the rest of the window as their context; a stride
  equal to `length` gives disjoint windows (the harness's rolling windows)."""
  if not 1 <= stride <= length:
    raise ValueError(f"stride must be in [1, {length}], got {stride}")
  full = ([prefix] if prefix is not None else []) + list(tokens)
  if len(full) < 2:
    raise ValueError("the text has no token to predict")
  windows, scored = [], 0  # scored: index in `full` of the last predicted token
  for begin in range(0, len(full) - 1, stride):
    end = min(begin + length, len(full) - 1)  # inputs full[begin:end], targets one further
    weights = (np.arange(begin + 1, end + 1) > scored).astype(np.float32)
    windows.append((np.asarray(full[begin:end]), np.asarray(full[begin + 1 : end + 1]), weights))
    scored = end
    if end == len(full) - 1:
      break
  return windows


def perplexities(logp: float, tokens: int, text: str) -> dict:
  """The harness's wikitext figures from a text's summed log-likelihood over `tokens`."""
  words, nbytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
  exp = lambda x: math.exp(min(x, 700.0))
  return {
    "tokens": tokens,
    "words": words,
    "bytes": nbytes,
    "loss": -logp / tokens,
    "perplexity": exp(-logp / tokens),
    "word_perplexity": exp(-logp / words),
    "byte_perplexity": exp(-logp / nbytes),
    "bits_per_byte": -logp / nbytes / math.log(2),
  }
