"""Generation as a library: a loaded model, compiled once per (batch, prompt bucket), turning
token lists into text with stop tokens, stop strings, streaming and beam search.

The generate binary, the server and the evaluation harness all call `Generator`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.checkpoints import modeldir
from decoderjax.inference import beam, prompts, sampling
from decoderjax.inference.sampling import SamplingConfig
from decoderjax.model import layout
from decoderjax.runtime import sharding

STREAM_CHUNK = 8  # tokens per trip to the host while streaming or watching stop strings
SAMPLING_DEFAULTS = {  # what generation.json leaves out
  "temperature": 1.0,
  "top_k": 0,
  "top_p": 1.0,
  "min_p": 0.0,
  "repetition_penalty": 1.0,
  "frequency_penalty": 0.0,
  "presence_penalty": 0.0,
}


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """How a Generator continues prompts."""

  max_new_tokens: int
  sampling: SamplingConfig = SamplingConfig()
  stop_ids: tuple[int, ...] = ()  # a row ends at any of these tokens (kept out of its text)
  stop_strings: tuple[str, ...] = ()  # ... or once its text holds one of these (cut before it)
  num_beams: int = 1  # > 1: beam search (no penalties)
  length_penalty: float = 1.0  # beam score = sum(log p) / length ** length_penalty
  early_stopping: bool | str = False  # beam search stopping rule: True, False or "never"
  seed: int = 0
  window: int = 0  # > 0: positions stay below this; a full window re-prefills its last half

  @property
  def keep(self) -> int:
    """Tokens a full window keeps (re-prefilled from the text) when it slides."""
    return self.window // 2

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.num_beams > 1 and self.sampling.penalized:
      raise ValueError("num_beams does not combine with repetition/frequency/presence penalties")
    if self.early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping}")
    if self.window == 1 or self.window < 0:
      raise ValueError(f"window must be 0 (no sliding) or at least 2 tokens, got {self.window}")


def sampling_config(generation: dict, **overrides) -> SamplingConfig:
  """generation.json's sampling settings, each replaced by an override that is not None."""
  values = {
    key: overrides[key] if overrides.get(key) is not None else generation.get(key, default)
    for key, default in SAMPLING_DEFAULTS.items()
  }
  unknown = set(overrides) - set(values)
  if unknown:
    raise ValueError(f"unknown sampling settings {sorted(unknown)}")
  return SamplingConfig(**values)


def stop_ids(tokenizer, generation: dict) -> tuple[int, ...]:
  """generation.json's stop ids, else the tokenizer's EOS (none for a tokenizer without one)."""
  ids = generation.get("stop_ids") or ([] if tokenizer.eos_id is None else [tokenizer.eos_id])
  return tuple(int(i) for i in ids)


def load(directory: str, mesh=None, kv_cache: str = "auto") -> modeldir.ModelDir:
  """A model directory in the layout generation reads fastest (layout.for_generation)."""
  return for_generation(modeldir.load_model_dir(directory, mesh), kv_cache)


def for_generation(model: modeldir.ModelDir, kv_cache: str = "auto") -> modeldir.ModelDir:
  """`model` switched, in place, to the generation layout and the KV-cache kind given."""
  model.params, model.config = layout.for_generation(model.params, model.config)
  model.config = model.config.replace(kv_cache=kv_cache)
  return model


def trained_window(model: modeldir.ModelDir) -> int:
  """The positions the model trained on (a training workdir records them: its rows, or for a
  fine-tune its base's), else its context."""
  trained = model.metadata.get("trained_len") or model.config.text_len
  return min(trained, model.config.text_len)


class StopStrings:
  """Cuts each row's text at the first stop string; holds back text that may begin one."""

  def __init__(self, tok, stops, ignore):
    self.tok, self.stops, self.ignore = tok, [s for s in stops if s], set(ignore)
    self.hold = max((len(s) - 1 for s in self.stops), default=0)

  def text(self, tokens) -> tuple[str, bool]:
    """(text so far, ended by a stop string)."""
    text = self.tok.decode([int(t) for t in tokens if int(t) not in self.ignore])
    hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)

  def safe(self, text: str, final: bool) -> str:
    """The part of `text` that can be printed now."""
    if final:
      return text
    text = text[: len(text) - self.hold] if self.hold else text
    return text.rstrip("\ufffd")  # an incomplete multi-byte character waits for its bytes


class _Watch:
  """Host-side view of the rows while they decode: stop strings and row 0's stream."""

  def __init__(self, strings: StopStrings, rows: int, stream: Callable[[str], None] | None):
    self.strings, self.stream = strings, stream
    self.printed = 0  # characters of row 0 streamed so far
    self.window(np.ones(rows, bool), [[] for _ in range(rows)])

  def window(self, active: np.ndarray, before: list[list[int]]) -> None:
    """A new window: only `active` rows decode; `before[row]`, its tokens of earlier windows."""
    self.active, self.before = active, before
    self.counted = [0] * len(before)  # tokens of each row checked so far in this window
    self.stopped_at = {}  # row -> the first token count whose text holds a stop string

  def __call__(self, out, lengths) -> np.ndarray:
    """One chunk: which rows a stop string has ended."""
    stopped = np.zeros(len(out), bool)
    for row in np.flatnonzero(self.active):
      n, tokens = lengths[row], lambda m, row=row: [*self.before[row], *out[row, :m]]
      text, hit = self.strings.text(tokens(n))
      if hit:
        stopped[row] = True
        if row not in self.stopped_at:
          self.stopped_at[row] = next(
            m for m in range(self.counted[row] + 1, n + 1) if self.strings.text(tokens(m))[1]
          )
      self.counted[row] = n
      if self.stream is not None and row == 0:
        shown = self.strings.safe(text, final=hit)
        self.stream(shown[self.printed :])
        self.printed = max(self.printed, len(shown))
    return stopped


class Generator:
  """Continues token lists with a loaded model; compiles once per (batch, prompt bucket).

  With `config.window`, a row whose text fills the window goes on from the window's last half,
  prefilled afresh at positions from 0: generation runs past the context (or the length the
  model trained on) and never attends beyond the window (as nanoGPT crops its context).
  """

  def __init__(self, model: modeldir.ModelDir, config: GenerateConfig, mesh=None):
    self.model, self.config, self.mesh = model, config, mesh
    self.strings = StopStrings(model.tokenizer, config.stop_strings, config.stop_ids)
    self.programs = {}
    self.rng = jax.random.key(config.seed)
    self.limit = config.window or model.config.text_len  # positions a window's tokens use
    if self.limit > model.config.text_len:
      raise ValueError(
        f"window={config.window} exceeds the model's context of {model.config.text_len} tokens"
      )

  def fit(self, encoded: list[list[int]], truncate: bool = False):
    """`prompts.fit_prompts` for this generator: a sliding window needs room for the first new
    token (generation goes on past it); beam search, or no window, for max_new_tokens. Returns
    (the prompts, tokens each lost to `truncate`)."""
    c, context = self.config, self.model.config.text_len
    where = None
    if self.limit < context:
      where = f"the window of {self.limit} tokens (the model's context is {context})"
    if c.window and c.num_beams == 1:
      reserve, name = 1, "the first new token"
    else:
      reserve, name = c.max_new_tokens, "max_new_tokens"
      if c.window:
        where = f"the window of {self.limit} tokens, which beam search does not slide"
    return prompts.fit_prompts(
      encoded, self.limit, reserve, truncate=truncate, reserve_name=name, where=where
    )

  def __call__(
    self, encoded: list[list[int]], stream=None, rng=None, sources=None
  ) -> tuple[list[dict], dict]:
    """Token lists -> ([{"text", "tokens"}], timings); `stream(text)` gets row 0 as it grows.
    `rng` (a key) replaces the generator's own sequence of keys for this call. A
    cross-attention model continues each row reading its source (`sources`: token lists)."""
    self.fit(encoded)
    source = self.source_arrays(sources, len(encoded))
    if rng is None:
      self.rng, rng = jax.random.split(self.rng)
    with sharding.activate(self.mesh):  # parameters sharded by their logical axes
      if self.config.num_beams > 1:
        new, timings = self._beams(encoded)
      else:
        new, timings = self._sample(encoded, rng, stream, source)
    results = []
    for row in new:
      text, _ = self.strings.text(row)
      results.append(
        {"text": text, "tokens": sampling.new_tokens(row, len(row), self.config.stop_ids)}
      )
    timings["new_tokens"] = sum(map(len, new))
    return results, timings

  def source_arrays(self, sources, rows: int) -> tuple:
    """() for a decoder-only model; a cross-attention model's (source ids [B, M], mask [B, M]),
    right-padded to a bucket length."""
    cfg = self.model.config
    if not cfg.cross_attention:
      if sources is not None:
        raise ValueError("sources are for a cross-attention model; this one continues prompts")
      return ()
    if sources is None or len(sources) != rows or any(not s for s in sources):
      raise ValueError("a cross-attention model generates from a source: give one per prompt")
    if self.config.num_beams > 1:
      raise ValueError("beam search does not take sources: use num_beams=1")
    longest = max(map(len, sources))
    if longest > cfg.max_seq_len:
      raise ValueError(f"a source of {longest} tokens, over max_seq_len={cfg.max_seq_len}")
    m = sampling.bucket_length(longest, cfg.max_seq_len)
    ids, mask = np.zeros((rows, m), np.int32), np.zeros((rows, m), np.int32)
    for row, source in enumerate(sources):
      ids[row, : len(source)], mask[row, : len(source)] = source, 1
    return jnp.asarray(ids), jnp.asarray(mask)

  def batched(self, encoded: list[list[int]], batch_size: int, progress=None, sources=None):
    """Many prompts (and a seq2seq model's sources), `batch_size` a call, longest first (a short
    last batch is filled with copies, so each bucket compiles once) -> (results in order, summed
    timings); `progress(n)` hears of each batch."""
    length = lambda i: len(encoded[i]) if sources is None else len(sources[i])
    order = sorted(range(len(encoded)), key=lambda i: -length(i))
    results, totals = [None] * len(encoded), {"compile_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
    fill = lambda rows: rows + [rows[0]] * (batch_size - len(rows))
    for first in range(0, len(order), batch_size):
      chunk = order[first : first + batch_size]
      rows = [encoded[i] for i in chunk]
      some = None if sources is None else fill([sources[i] for i in chunk])
      out, timings = self(fill(rows), sources=some)
      for i, result in zip(chunk, out, strict=False):
        results[i] = result
      for key in totals:
        totals[key] += timings[key]
      if progress is not None:
        progress(len(chunk))
    totals["new_tokens"] = sum(len(r["tokens"]) for r in results)
    return results, totals

  def _padded(self, contexts: list[list[int]], steps: int):
    """Left-padded [B, T] ids and mask, T a bucket that leaves `steps` of the window."""
    return sampling.left_pad(
      contexts, sampling.bucket_length(max(map(len, contexts)), self.limit - steps)
    )

  def _compile(self, tokens, mask, rng, source=()) -> float:
    """Compiles this shape's programs unless compiled already; returns the seconds it took.
    The cache holds what is left of the window after the prompt bucket."""
    key = (tokens.shape, *(s.shape for s in source))
    if key in self.programs:
      return 0.0
    start = time.perf_counter()
    c, params, cfg = self.config, self.model.params, self.model.config
    max_new = min(c.max_new_tokens, self.limit - tokens.shape[1])
    if c.num_beams > 1:
      stop = sampling.stop_array(c.stop_ids)
      args = (max_new, c.num_beams, c.length_penalty, c.early_stopping)
      program = beam.beam_search.lower(params, cfg, tokens, mask, stop, *args).compile()
      self.programs[key] = lambda params, tokens, mask: program(params, tokens, mask, stop)
    else:
      self.programs[key] = sampling.compile_programs(
        params, cfg, tokens, mask, rng, max_new, c.sampling, c.stop_ids, source
      )
    return time.perf_counter() - start

  def _beams(self, encoded):
    tokens, mask = self._padded(encoded, self.config.max_new_tokens)
    timings = {"compile_s": self._compile(tokens, mask, None), "prefill_s": 0.0}
    start = time.perf_counter()
    out, lengths, _ = jax.block_until_ready(
      self.programs[(tokens.shape,)](self.model.params, tokens, mask)
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    timings.update(decode_s=time.perf_counter() - start, windows=1)
    timings.update(prompt_tokens=int(mask.sum()), steps=int(lengths.max()))
    return [[int(t) for t in row[:n]] for row, n in zip(out, lengths, strict=True)], timings

  def _sample(self, encoded, rng, stream, source=()):
    """Decodes window after window until every row stopped or has max_new_tokens."""
    c, rows = self.config, len(encoded)
    texts, new, starts = [list(e) for e in encoded], [[] for _ in encoded], [0] * rows
    active = np.ones(rows, bool)
    watch = _Watch(self.strings, rows, stream)
    timings = dict(compile_s=0.0, prefill_s=0.0, decode_s=0.0, windows=0)
    timings["prompt_tokens"] = sum(map(len, encoded))
    decoded = 0  # steps so far: the rows still going advance together
    while active.any() and decoded < c.max_new_tokens:
      for row in np.flatnonzero(active):
        if len(texts[row]) - starts[row] >= self.limit:  # a full window slides
          starts[row] = len(texts[row]) - c.keep
      contexts = [texts[r][starts[r] :] if active[r] else texts[r][-1:] for r in range(rows)]
      room = min(self.limit - len(contexts[r]) for r in np.flatnonzero(active))
      steps = min(c.max_new_tokens - decoded, room, self._until_long_rope(contexts, active))
      tokens, mask = self._padded(contexts, steps)
      key = rng if not timings["windows"] else jax.random.fold_in(rng, timings["windows"])
      watch.window(active.copy(), [list(n) for n in new])
      out, lengths = self._window(tokens, mask, key, steps, watch, timings, source)
      for row in np.flatnonzero(active):
        made = [int(t) for t in out[row, : lengths[row]]]
        new[row] += made
        texts[row] += made
        if row in watch.stopped_at or (made and made[-1] in c.stop_ids):
          active[row] = False
      decoded += steps
      timings["windows"] += 1
    timings["steps"] = max(map(len, new))
    if stream is not None:
      text, _ = self.strings.text(new[0])
      stream(text[watch.printed :])
    return new, timings

  def _until_long_rope(self, contexts, active) -> int:
    """Steps left before a LongRoPE model (Phi-3 128k) passes its original context. There it
    switches to the long factors, and transformers recomputes every earlier key with them: the
    window ends, and the next one prefills the whole text afresh, at the long factors."""
    s = self.model.config.rope_scaling
    if s is None or s.kind != "longrope":
      return self.config.max_new_tokens
    longest = max(len(contexts[r]) for r in np.flatnonzero(active))
    switch = s.original_max_position + 1  # the length whose prefill takes the long factors
    return switch - longest if longest < switch else self.config.max_new_tokens

  def _window(self, tokens, mask, rng, steps, watch, timings, source=()):
    """One window: prefill, then `steps` decode steps -> (new tokens [B, N], lengths [B])."""
    timings["compile_s"] += self._compile(tokens, mask, rng, source)
    prefill_fn, decode_fn = self.programs[(tokens.shape, *(s.shape for s in source))]
    watching = watch.stream is not None or self.strings.stops
    start = time.perf_counter()
    state = jax.block_until_ready(prefill_fn(self.model.params, tokens, mask, rng, *source))
    timings["prefill_s"] += time.perf_counter() - start
    start = time.perf_counter()
    out, lengths = sampling.run_decode(
      self.model.params, state, decode_fn, steps, self.config.stop_ids,
      chunk=STREAM_CHUNK if watching else 0, on_chunk=watch if watching else None,
    )  # fmt: skip
    timings["decode_s"] += time.perf_counter() - start
    for row, n in watch.stopped_at.items():
      lengths[row] = min(lengths[row], n)
    return out, lengths


def report(timings: dict) -> str:
  """One line of a call's timings: prefill and decode rates, first-token latency, compile."""
  t = timings
  prefill_s, decode_s, steps = max(t["prefill_s"], 1e-9), max(t["decode_s"], 1e-9), t["steps"]
  return (
    f"[prefill {t['prompt_tokens']} tokens {t['prefill_s']:.3f}s "
    f"({t['prompt_tokens'] / prefill_s:,.0f} tok/s); decode {t['new_tokens']} tokens "
    f"{t['decode_s']:.3f}s ({t['new_tokens'] / decode_s:,.1f} tok/s, {steps / decode_s:,.1f} "
    f"steps/s); first token {t['prefill_s'] + t['decode_s'] / max(steps, 1):.3f}s; "
    f"compile {t['compile_s']:.1f}s"
    + (f"; {t['windows']} windows" if t.get("windows", 1) > 1 else "")
    + "]"
  )
