"""Generation as a library: a loaded model, compiled once per (batch, prompt bucket), turning
token lists into text with stop tokens, stop strings, streaming and beam search.

The generate binary, the server and the evaluation harness all call `Generator`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np

from decoderjax import beam, layout, modeldir, sampling, sharding
from decoderjax.sampling import SamplingConfig

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

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.num_beams > 1 and self.sampling.penalized:
      raise ValueError("num_beams does not combine with repetition/frequency/presence penalties")
    if self.early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping}")


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


def fit_prompts(encoded: list[list[int]], length: int, max_new_tokens: int):
  """Prompts cut from the left to leave `max_new_tokens` of `length` (as lm-eval's hf backend
  cuts them) -> (the prompts, how many were cut)."""
  room = length - max_new_tokens
  if room < 1:
    raise ValueError(f"{max_new_tokens} new tokens leave no room for a prompt in {length}")
  return [e[-room:] for e in encoded], sum(len(e) > room for e in encoded)


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
    self.counted = [0] * rows  # tokens of each row checked so far
    self.stopped_at = {}  # row -> the first token count whose text holds a stop string

  def __call__(self, out, lengths) -> np.ndarray:
    """One chunk: which rows a stop string has ended."""
    stopped = np.zeros(len(out), bool)
    for row, n in enumerate(lengths):
      text, hit = self.strings.text(out[row, :n])
      if hit:
        stopped[row] = True
        if row not in self.stopped_at:
          self.stopped_at[row] = next(
            m for m in range(self.counted[row] + 1, n + 1) if self.strings.text(out[row, :m])[1]
          )
      self.counted[row] = n
      if self.stream is not None and row == 0:
        shown = self.strings.safe(text, final=hit)
        self.stream(shown[self.printed :])
        self.printed = max(self.printed, len(shown))
    return stopped


class Generator:
  """Continues token lists with a loaded model; compiles once per (batch, prompt bucket)."""

  def __init__(self, model: modeldir.ModelDir, config: GenerateConfig, mesh=None):
    self.model, self.config, self.mesh = model, config, mesh
    self.strings = StopStrings(model.tokenizer, config.stop_strings, config.stop_ids)
    self.programs = {}
    self.rng = jax.random.key(config.seed)

  def check_length(self, encoded: list[list[int]]) -> None:
    """Every prompt has a token, and the longest plus max_new_tokens fits the context."""
    if any(not e for e in encoded):
      raise ValueError("empty prompt: every prompt needs at least one token")
    cfg = self.model.config
    longest = max(map(len, encoded)) + self.config.max_new_tokens
    if longest > cfg.text_len:
      soft = f" (with {cfg.prompt_tokens} soft-prompt slots)" if cfg.prompt_tokens else ""
      raise ValueError(
        f"prompt plus max_new_tokens is {longest + cfg.prompt_tokens} tokens{soft}, over the "
        f"model's context max_seq_len={cfg.max_seq_len}"
      )

  def __call__(self, encoded: list[list[int]], stream=None) -> tuple[list[dict], dict]:
    """Token lists -> ([{"text", "tokens"}], timings); `stream(text)` gets row 0 as it grows."""
    self.check_length(encoded)
    room = self.model.config.text_len - self.config.max_new_tokens
    tokens, mask = sampling.left_pad(encoded, sampling.bucket_length(max(map(len, encoded)), room))
    self.rng, rng = jax.random.split(self.rng)
    with sharding.activate(self.mesh):  # parameters sharded by their logical axes
      compile_s = self._compile(tokens, mask, rng)
      if self.config.num_beams > 1:
        out, lengths, timings = self._beams(tokens, mask)
      else:
        out, lengths, timings = self._sample(tokens, mask, rng, stream)
    timings.update(compile_s=compile_s, prompt_tokens=int(mask.sum()), steps=int(lengths.max()))
    results = []
    for row, n in zip(out, lengths, strict=True):
      text, _ = self.strings.text(row[:n])
      results.append({"text": text, "tokens": sampling.new_tokens(row, n, self.config.stop_ids)})
    timings["new_tokens"] = int(lengths.sum())
    return results, timings

  def batched(self, encoded: list[list[int]], batch_size: int, progress=None):
    """Many prompts, `batch_size` a call, longest first (a short last batch is filled with
    copies, so each prompt bucket compiles once) -> (results in order, summed timings);
    `progress(n)` hears of each batch."""
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results, totals = [None] * len(encoded), {"compile_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
    for first in range(0, len(order), batch_size):
      chunk = order[first : first + batch_size]
      rows = [encoded[i] for i in chunk]
      out, timings = self(rows + [rows[0]] * (batch_size - len(rows)))
      for i, result in zip(chunk, out, strict=False):
        results[i] = result
      for key in totals:
        totals[key] += timings[key]
      if progress is not None:
        progress(len(chunk))
    totals["new_tokens"] = sum(len(r["tokens"]) for r in results)
    return results, totals

  def _compile(self, tokens, mask, rng) -> float:
    """Compiles this shape's programs unless compiled already; returns the seconds it took."""
    if tokens.shape in self.programs:
      return 0.0
    start = time.perf_counter()
    c, params, cfg = self.config, self.model.params, self.model.config
    if c.num_beams > 1:
      stop = sampling.stop_array(c.stop_ids)
      args = (c.max_new_tokens, c.num_beams, c.length_penalty, c.early_stopping)
      program = beam.beam_search.lower(params, cfg, tokens, mask, stop, *args).compile()
      self.programs[tokens.shape] = lambda params, tokens, mask: program(params, tokens, mask, stop)
    else:
      self.programs[tokens.shape] = sampling.compile_programs(
        params, cfg, tokens, mask, rng, c.max_new_tokens, c.sampling, c.stop_ids
      )
    return time.perf_counter() - start

  def _beams(self, tokens, mask):
    start = time.perf_counter()
    out, lengths, _ = jax.block_until_ready(
      self.programs[tokens.shape](self.model.params, tokens, mask)
    )
    timings = {"prefill_s": 0.0, "decode_s": time.perf_counter() - start}
    return np.asarray(out), np.asarray(lengths), timings

  def _sample(self, tokens, mask, rng, stream):
    prefill_fn, decode_fn = self.programs[tokens.shape]
    watching = stream is not None or self.strings.stops
    watch = _Watch(self.strings, len(tokens), stream)
    timings = {}
    start = time.perf_counter()
    state = jax.block_until_ready(prefill_fn(self.model.params, tokens, mask, rng))
    timings["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out, lengths = sampling.run_decode(
      self.model.params, state, decode_fn, self.config.max_new_tokens, self.config.stop_ids,
      chunk=STREAM_CHUNK if watching else 0, on_chunk=watch if watching else None,
    )  # fmt: skip
    timings["decode_s"] = time.perf_counter() - start
    for row, n in watch.stopped_at.items():
      lengths[row] = min(lengths[row], n)
    if stream is not None:
      text, _ = self.strings.text(out[0, : lengths[0]])
      stream(text[watch.printed :])
    return out, lengths, timings


def report(timings: dict) -> str:
  """One line of a call's timings: prefill and decode rates, first-token latency, compile."""
  t = timings
  prefill_s, decode_s, steps = max(t["prefill_s"], 1e-9), max(t["decode_s"], 1e-9), t["steps"]
  return (
    f"[prefill {t['prompt_tokens']} tokens {t['prefill_s']:.3f}s "
    f"({t['prompt_tokens'] / prefill_s:,.0f} tok/s); decode {t['new_tokens']} tokens "
    f"{t['decode_s']:.3f}s ({t['new_tokens'] / decode_s:,.1f} tok/s, {steps / decode_s:,.1f} "
    f"steps/s); first token {t['prefill_s'] + t['decode_s'] / max(steps, 1):.3f}s; "
    f"compile {t['compile_s']:.1f}s]"
  )
