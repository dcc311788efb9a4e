"""Continuous batching over one KV cache, as JetStream does it: a fixed decode batch of slots,
each row with its own write index. A request is prefilled alone (its prompt left-padded to a
length bucket), inserted into a free slot between decode steps, and gives its slot back the
step it finishes, so a long request never holds short ones back. Every program is compiled
once, at start-up.

`Engine.submit` is thread-safe; `Engine.run` is the loop (the server runs it in a thread).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import traceback
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.inference import prompts, sampling
from decoderjax.inference.offline import StopStrings
from decoderjax.model.config import ModelConfig
from decoderjax.model.kv_cache import KVCache, init_cache
from decoderjax.runtime import sharding

Array = jax.Array
TOP_LOGPROBS = 5  # alternatives reported per token (OpenAI's most)
SETTINGS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "frequency_penalty", "presence_penalty")  # fmt: skip


@flax.struct.dataclass
class Settings:
  """Each row's sampling settings, [S] arrays (see sampling.SamplingConfig)."""

  temperature: Array
  top_k: Array
  top_p: Array
  min_p: Array
  repetition_penalty: Array
  frequency_penalty: Array
  presence_penalty: Array
  logprobs: Array  # bool: the request reports log-probabilities (else they are not computed)


@flax.struct.dataclass
class Batch:
  """The decode batch: S slots over one cache, each slot one request (or free)."""

  cache: KVCache  # per-row write index
  tokens: Array  # [S] int32 each row's last token, the input of the next step
  positions: Array  # [S] int32 its position
  keys: Array  # [S, 2] uint32 each request's key data (step s samples with fold_in(key, s))
  steps: Array  # [S] int32 tokens sampled so far
  settings: Settings
  seen: Array  # [S, V] bool: in the prompt (repetition penalty)
  counts: Array  # [S, V] int32: occurrences in the output


def _choose(logits_BV, keys_B2, steps_B, settings: Settings, seen_BV, counts_BV):
  """Each row's next token under its own settings and key, with its log probability and the
  top alternatives under the model's distribution (before penalties and temperature). Work no
  row asks for (penalties, filters, sampling, log-probabilities) is skipped."""
  s, logits_BV = settings, logits_BV.astype(jnp.float32)
  penalties = (s.repetition_penalty, s.frequency_penalty, s.presence_penalty)
  penalized = jax.lax.cond(
    jnp.any(s.repetition_penalty != 1) | jnp.any(s.frequency_penalty != 0)
    | jnp.any(s.presence_penalty != 0),
    sampling.penalize_rows, lambda x, *_: x, logits_BV, seen_BV, counts_BV, *penalties,
  )  # fmt: skip
  t_B = s.temperature

  def sample(penalized):
    scaled = penalized / jnp.where(t_B > 0, t_B, 1.0)[:, None]
    filters = jnp.any(s.top_k > 0) | jnp.any(s.top_p < 1) | jnp.any(s.min_p > 0)
    scaled = jax.lax.cond(filters, sampling.restrict, lambda x, *_: x, scaled, s.top_k, s.top_p,
                          s.min_p)  # fmt: skip
    fold = lambda k, step: jax.random.fold_in(jax.random.wrap_key_data(k), step)
    return jax.vmap(jax.random.categorical)(jax.vmap(fold)(keys_B2, steps_B), scaled)

  greedy_B = sampling.greedy_tokens(penalized)
  sampled = jax.lax.cond(jnp.any(t_B > 0), sample, lambda _: greedy_B, penalized)
  token_B = jnp.where(t_B > 0, sampled, greedy_B).astype(jnp.int32)

  def logprobs(token_B):
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp_BV, TOP_LOGPROBS)
    return jnp.take_along_axis(logp_BV, token_B[:, None], -1)[:, 0], top_lp, top_ids

  def none(token_B):
    b = token_B.shape[0]
    zeros = jnp.zeros((b, TOP_LOGPROBS))
    return jnp.zeros((b,)), zeros, zeros.astype(jnp.int32)

  return token_B, jax.lax.cond(jnp.any(s.logprobs), logprobs, none, token_B)


def prefill(params, cfg: ModelConfig, tokens_1T, length, cache_len: int):
  """One right-padded prompt of `length` tokens into a fresh one-row cache, whose write index
  is left at `length` (the padding slots are overwritten as the row decodes) -> (the cache, the
  last real token's logits [1, V], the prompt's tokens as a [1, V] set, and the log probability
  of each prompt token given those before it [T - 1] with the top alternatives and their ids
  [T - 1, TOP_LOGPROBS])."""
  t = tokens_1T.shape[1]
  mask_1T = (jnp.arange(t) < length)[None].astype(jnp.int32)
  positions_1T = jnp.arange(t, dtype=jnp.int32)[None]
  cache = init_cache(cfg, 1, cache_len)
  logits_1TV, cache = sampling.cached_forward(
    params, cfg, tokens_1T, positions_1T, mask_1T, cache, True
  )
  cache = cache.replace(index=cfg.prompt_tokens + length)
  last_1V = jax.lax.dynamic_index_in_dim(logits_1TV[0], length - 1, 0)
  logp_TV = jax.nn.log_softmax(logits_1TV[0, :-1].astype(jnp.float32), axis=-1)
  prompt_lp = jnp.take_along_axis(logp_TV, tokens_1T[0, 1:, None], -1)[:, 0]
  top_lp, top_ids = jax.lax.top_k(logp_TV, TOP_LOGPROBS)
  v = logits_1TV.shape[-1]
  seen_1V = jnp.zeros((1, v), bool).at[0, tokens_1T[0]].max(mask_1T[0].astype(bool))
  return cache, last_1V, seen_1V, (prompt_lp, top_lp, top_ids)


def insert(batch: Batch, row: KVCache, logits_1V, seen_1V, length, slot, key_2, settings_1):
  """A prefilled request of `length` prompt tokens into slot `slot`: its cache row, settings
  and first sampled token -> (the batch, that token [1], its log-probabilities)."""
  counts_1V = jnp.zeros(seen_1V.shape, jnp.int32)
  first_1 = jnp.zeros((1,), jnp.int32)
  token_1, info = _choose(logits_1V, key_2[None], first_1, settings_1, seen_1V, counts_1V)
  put = lambda full, one: jax.lax.dynamic_update_index_in_dim(full, one[0], slot, 0)
  batch = Batch(
    cache=batch.cache.with_row(row, slot),
    tokens=put(batch.tokens, token_1),
    positions=put(batch.positions, jnp.reshape(length, (1,)).astype(jnp.int32)),
    keys=put(batch.keys, key_2[None]),
    steps=put(batch.steps, first_1 + 1),
    settings=jax.tree.map(put, batch.settings, settings_1),
    seen=put(batch.seen, seen_1V),
    counts=put(batch.counts, counts_1V.at[0, token_1[0]].add(1)),
  )
  return batch, token_1, info


def decode(params, cfg: ModelConfig, batch: Batch):
  """One step of every slot -> (the batch, each row's new token [S], their log-probabilities)."""
  s = batch.tokens.shape[0]
  logits_S1V, cache = sampling.cached_forward(
    params, cfg, batch.tokens[:, None], batch.positions[:, None], jnp.ones((s, 1), jnp.int32),
    batch.cache,
  )  # fmt: skip
  token_S, info = _choose(
    logits_S1V[:, 0], batch.keys, batch.steps, batch.settings, batch.seen, batch.counts
  )
  counts = batch.counts.at[jnp.arange(s), token_S].add(1)
  batch = batch.replace(
    cache=cache, tokens=token_S, positions=batch.positions + 1, steps=batch.steps + 1,
    counts=counts,
  )  # fmt: skip
  return batch, token_S, info


@dataclasses.dataclass
class Request:
  """One sequence to continue (one choice of a completion). `emit(event)` receives, from the
  engine's thread: {"prompt_logprobs": [...]} first when `prompt_logprobs`, then per token
  {"token", "text", "logprob", "top"}, and last {"finish_reason", "text", "prompt_tokens",
  "completion_tokens"}; finish reasons are "stop", "length", "cancelled" or "error"."""

  prompt: list[int]
  max_tokens: int  # 0: score the prompt only (with prompt_logprobs)
  emit: Callable[[dict], None]
  settings: dict = dataclasses.field(default_factory=dict)  # SETTINGS names -> values
  seed: int = 0
  stop_ids: tuple[int, ...] = ()
  stop_strings: tuple[str, ...] = ()
  logprobs: bool = False  # token events carry log-probabilities (else zeros)
  prompt_logprobs: bool = False
  cancelled: bool = False  # set from any thread: the engine frees the slot at its next step

  def cancel(self) -> None:
    self.cancelled = True


def _top(lp_K, ids_K) -> list[tuple[int, float]]:
  return [(int(i), float(x)) for i, x in zip(ids_K, lp_K, strict=True)]


class _Live:
  """A request in a slot: its tokens so far and the text already sent."""

  def __init__(self, request: Request, tokenizer):
    self.request, self.tokens, self.sent = request, [], 0
    self.strings = StopStrings(tokenizer, request.stop_strings, ())

  def add(self, token: int, logprob: float, top) -> bool:
    """Takes the next token; returns whether the request finished."""
    r = self.request
    if token in r.stop_ids:
      return self.finish("stop", counted=1)
    self.tokens.append(token)
    text, hit = self.strings.text(self.tokens)
    done = "stop" if hit else ("length" if len(self.tokens) >= r.max_tokens else None)
    shown = self.strings.safe(text, final=done is not None)
    r.emit({"token": token, "text": shown[self.sent :], "logprob": logprob, "top": top})
    self.sent = max(self.sent, len(shown))
    return self.finish(done) if done else False

  def finish(self, reason: str, counted: int = 0) -> bool:
    text, _ = self.strings.text(self.tokens)
    self.request.emit({
      "finish_reason": reason, "text": text[self.sent :], "prompt_tokens": len(self.request.prompt),
      "completion_tokens": len(self.tokens) + counted,
    })  # fmt: skip
    return True


class Engine:
  """`slots` requests decode together over one cache of `max_len` tokens per slot."""

  def __init__(self, model, slots: int = 8, max_len: int = 0, mesh=None, queue_size: int = 64):
    cfg = model.config
    if cfg.cross_attention:
      raise ValueError("the engine serves decoder-only models, not cross-attention (seq2seq) ones")
    self.model, self.cfg, self.mesh, self.slots = model, cfg, mesh, slots
    self.max_len = max_len or cfg.text_len
    if not 1 <= self.max_len <= cfg.text_len:
      raise ValueError(f"max_len={max_len} must be in [1, {cfg.text_len}] (the model's context)")
    if slots < 1:
      raise ValueError(f"slots must be >= 1, got {slots}")
    self.buckets = sorted({min(b, self.max_len) for b in _powers_of_two(16, self.max_len)})
    self.pending: queue.Queue[Request] = queue.Queue(maxsize=queue_size)
    self.live: dict[int, _Live] = {}
    self.compile_s = self._compile()

  def _compile(self) -> float:
    start = time.perf_counter()
    cfg, params, cache_len = self.cfg, self.model.params, self.cfg.prompt_tokens + self.max_len
    with sharding.activate(self.mesh):
      self.batch = self._empty_batch(cache_len)
      self.prefill_fns = {}
      for t in self.buckets:
        fn = jax.jit(lambda p, tokens, n: prefill(p, cfg, tokens, n, cache_len))
        self.prefill_fns[t] = fn.lower(params, _spec((1, t)), _spec(())).compile()
      row, logits, seen, _ = self.prefill_fns[self.buckets[0]].out_info
      settings_1 = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,), x.dtype), self.batch.settings)
      self.insert_fn = (
        jax.jit(insert, donate_argnums=0)
        .lower(
          self.batch, row, logits, seen, _spec(()), _spec(()), _spec((2,), jnp.uint32), settings_1
        )
        .compile()
      )
      self.decode_fn = jax.jit(lambda p, batch: decode(p, cfg, batch), donate_argnums=1)
      self.decode_fn = self.decode_fn.lower(params, self.batch).compile()
    return time.perf_counter() - start

  def _empty_batch(self, cache_len: int) -> Batch:
    s, v = self.slots, self.cfg.vocab_size
    cache = init_cache(self.cfg, s, cache_len)
    zeros = lambda dtype: jnp.zeros((s,), dtype)
    settings = Settings(zeros(jnp.float32), zeros(jnp.int32), zeros(jnp.float32) + 1,
                        zeros(jnp.float32), zeros(jnp.float32) + 1, zeros(jnp.float32),
                        zeros(jnp.float32), zeros(bool))  # fmt: skip
    return Batch(
      cache=cache.replace(index=zeros(jnp.int32)), tokens=zeros(jnp.int32),
      positions=zeros(jnp.int32), keys=jnp.zeros((s, 2), jnp.uint32), steps=zeros(jnp.int32),
      settings=settings, seen=jnp.zeros((s, v), bool), counts=jnp.zeros((s, v), jnp.int32),
    )  # fmt: skip

  def check(self, request: Request) -> None:
    """Raises ValueError naming the problem with a request the engine cannot run."""
    where = None
    if self.max_len < self.cfg.text_len:
      where = f"a slot's {self.max_len} tokens (serve --max_seq_len)"
    prompts.fit_prompts(
      [request.prompt], self.max_len, request.max_tokens, reserve_name="max_tokens", where=where
    )
    if any(not 0 <= t < self.cfg.vocab_size for t in request.prompt):
      raise ValueError(f"prompt token ids must be in [0, {self.cfg.vocab_size})")
    sampling.SamplingConfig(**{k: v for k, v in request.settings.items() if k in SETTINGS})

  def submit(self, request: Request) -> None:
    """Queues a checked request (thread-safe); queue.Full when the queue is at its bound."""
    self.check(request)
    self.pending.put_nowait(request)

  def run(self, stop: threading.Event) -> None:
    """The loop: admit into free slots, step every slot, until `stop` is set."""
    with sharding.activate(self.mesh):
      while not stop.is_set():
        try:
          self._admit()
          if self.live:
            self._step()
          else:
            self._wait()
        except Exception:  # a failed program: its requests end with "error", the loop goes on
          traceback.print_exc()
          for live in self.live.values():
            live.finish("error")
          self.live.clear()
          self.batch = self._empty_batch(self.cfg.prompt_tokens + self.max_len)
    self.cancel_all()

  def cancel_all(self) -> None:
    """Ends every live and pending request with finish reason "cancelled"."""
    for live in self.live.values():
      live.finish("cancelled")
    self.live.clear()
    while True:
      try:
        request = self.pending.get_nowait()
      except queue.Empty:
        return
      _Live(request, self.model.tokenizer).finish("cancelled")

  def _wait(self) -> None:
    try:
      request = self.pending.get(timeout=0.05)
    except queue.Empty:
      return
    self._start(request)

  def _admit(self) -> None:
    while len(self.live) < self.slots:
      try:
        request = self.pending.get_nowait()
      except queue.Empty:
        return
      self._start(request)

  def _start(self, request: Request) -> None:
    if request.cancelled:
      return _Live(request, self.model.tokenizer).finish("cancelled")
    n = len(request.prompt)
    bucket = next(b for b in self.buckets if b >= n)
    tokens = np.zeros((1, bucket), np.int32)
    tokens[0, :n] = request.prompt
    prefill_fn = self.prefill_fns[bucket]
    row, logits, seen, prompt_info = prefill_fn(self.model.params, tokens, np.int32(n))
    live = _Live(request, self.model.tokenizer)
    if request.prompt_logprobs:
      lp, top_lp, top_ids = (np.asarray(x)[: n - 1] for x in prompt_info)
      entries = [(request.prompt[0], None, [])]
      entries += [(request.prompt[i + 1], float(lp[i]), _top(top_lp[i], top_ids[i]))
                  for i in range(n - 1)]  # fmt: skip
      request.emit({"prompt_logprobs": entries})
    if request.max_tokens == 0:
      return live.finish("length")
    slot = next(i for i in range(self.slots) if i not in self.live)
    key = np.asarray(jax.random.key_data(jax.random.key(request.seed)), np.uint32)
    settings = {k: np.asarray([v], np.float32) for k, v in _settings(request).items()}
    settings["top_k"] = settings["top_k"].astype(np.int32)
    settings["logprobs"] = np.asarray([request.logprobs])
    self.batch, token, info = self.insert_fn(
      self.batch, row, logits, seen, np.int32(n), np.int32(slot), key, Settings(**settings)
    )
    self.live[slot] = live
    lp, top_lp, top_ids = (np.asarray(x)[0] for x in info)
    if live.add(int(np.asarray(token)[0]), float(lp), _top(top_lp, top_ids)):
      del self.live[slot]

  def _step(self) -> None:
    self.batch, tokens, info = self.decode_fn(self.model.params, self.batch)
    tokens = np.asarray(tokens)
    lp, top_lp, top_ids = (np.asarray(x) for x in info)
    for slot, live in list(self.live.items()):
      if live.request.cancelled:
        done = live.finish("cancelled")
      else:
        done = live.add(int(tokens[slot]), float(lp[slot]), _top(top_lp[slot], top_ids[slot]))
      if done:
        del self.live[slot]


def _settings(request: Request) -> dict:
  defaults = dataclasses.asdict(sampling.SamplingConfig())
  return {k: request.settings.get(k, defaults[k]) for k in SETTINGS}


def _powers_of_two(smallest: int, limit: int):
  b = smallest
  while b < limit:
    yield b
    b *= 2
  yield limit


def _spec(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(shape, dtype)
