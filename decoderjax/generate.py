"""Generates text: python -m decoderjax.generate --checkpoint=DIR --prompt=TEXT.

Sampling defaults come from the model directory's generation.json; flags override them. One
prompt streams to the terminal as it is produced; --interactive reads prompts from stdin.
"""

from __future__ import annotations

import json
import sys
import time

import jax
import numpy as np
from absl import flags

from decoderjax import cli, modeldir, sampling, sharding, tasks
from decoderjax import model as model_lib
from decoderjax.config import KV_CACHES
from decoderjax.sampling import SamplingConfig

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string(
  "prompt_file", None, "One prompt per line, or JSONL with a 'prompt' field."
)
_PROMPT_TOKENS = flags.DEFINE_string("prompt_tokens", None, "Raw token ids: 1,2,3.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template.")
_INTERACTIVE = flags.DEFINE_bool(
  "interactive", False, "A prompt loop on stdin (with --chat: a chat)."
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: all).")
_MIN_P = flags.DEFINE_float("min_p", None, "Drop tokens below min_p x the top probability.")
_REPETITION = flags.DEFINE_float("repetition_penalty", None, "> 1 discourages repeats.")
_FREQUENCY = flags.DEFINE_float("frequency_penalty", None, "Minus this per earlier occurrence.")
_PRESENCE = flags.DEFINE_float("presence_penalty", None, "Minus this once a token occurred.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1: off).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam score = log p / length**this.")
_EARLY_STOPPING = flags.DEFINE_enum(
  "early_stopping", "false", ["true", "false", "never"], "Beam search stopping rule."
)
_STOP = flags.DEFINE_multi_string("stop", None, "Stop when the text contains this (repeatable).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Always generate max_new_tokens (benchmarks).")
_STREAM = flags.DEFINE_bool("stream", True, "Print tokens as they come (one prompt at a time).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_KV_CACHE = flags.DEFINE_enum(
  "kv_cache", "auto", KV_CACHES, "KV cache storage: the compute dtype, or int8 (long contexts)."
)
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write [{prompt, text, tokens}] here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")

STREAM_CHUNK = 8  # tokens per trip to the host while streaming or watching stop strings


def read_prompts() -> list[str]:
  """Prompt texts from --prompt and --prompt_file (lines, or JSONL objects with "prompt")."""
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if _PROMPT_FILE.value.endswith(".jsonl"):
          record = json.loads(line)
          if "prompt" not in record:
            raise ValueError(f"{_PROMPT_FILE.value}:{n}: no 'prompt' field")
          prompts.append(str(record["prompt"]))
        else:
          prompts.append(line.rstrip("\n"))
  return prompts


def stop_ids(tok, generation) -> list[int]:
  if _IGNORE_EOS.value:
    return []
  ids = generation.get("stop_ids") or ([] if tok.eos_id is None else [tok.eos_id])
  return [int(i) for i in ids]


class StopStrings:
  """Cuts each row's text at the first stop string; holds back text that may begin one."""

  def __init__(self, tok, stops: list[str], ignore: list[int]):
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


class Generator:
  """Compiles once per (batch, prompt bucket) and generates, streaming when asked."""

  def __init__(self, model, mesh, config: SamplingConfig, max_new: int, stops: list[int]):
    self.model, self.mesh, self.config = model, mesh, config
    self.max_new, self.stops = max_new, stops
    self.strings = StopStrings(model.tokenizer, _STOP.value or [], stops)
    self.programs = {}
    self.rng = jax.random.key(_SEED.value)

  def check_length(self, encoded: list[list[int]]) -> None:
    if any(not e for e in encoded):
      raise ValueError("empty prompt: every prompt needs at least one token")
    cfg = self.model.config
    longest = max(map(len, encoded)) + self.max_new + cfg.prompt_tokens
    if longest > cfg.max_seq_len:
      soft = f" (with {cfg.prompt_tokens} soft-prompt slots)" if cfg.prompt_tokens else ""
      raise ValueError(
        f"prompt plus max_new_tokens is {longest} tokens{soft}, over the model's context "
        f"max_seq_len={cfg.max_seq_len}"
      )

  def __call__(self, encoded: list[list[int]], stream) -> tuple[list[dict], dict]:
    """Token lists -> ([{"text", "tokens"}], timings); `stream(text)` prints as rows go."""
    self.check_length(encoded)
    cfg, params = self.model.config, self.model.params
    room = cfg.max_seq_len - self.max_new - cfg.prompt_tokens
    tokens, mask = sampling.left_pad(encoded, sampling.bucket_length(max(map(len, encoded)), room))
    self.rng, rng = jax.random.split(self.rng)
    key = tokens.shape
    compile_s = 0.0
    with sharding.activate(self.mesh):  # parameters sharded by their logical axes
      if key not in self.programs:
        start = time.perf_counter()
        if _NUM_BEAMS.value > 1:
          self.programs[key] = self.compile_beam(tokens, mask)
        else:
          self.programs[key] = sampling.compile_programs(
            params, cfg, tokens, mask, rng, self.max_new, self.config, self.stops
          )
        compile_s = time.perf_counter() - start
      if _NUM_BEAMS.value > 1:
        start = time.perf_counter()
        out, lengths, _ = jax.block_until_ready(self.programs[key](params, tokens, mask))
        out, lengths = np.asarray(out), np.asarray(lengths)
        timings = {"prefill_s": 0.0, "decode_s": time.perf_counter() - start}
      else:
        out, lengths, timings = self.sample(tokens, mask, rng, stream)
    timings.update(compile_s=compile_s, prompt_tokens=int(mask.sum()), steps=int(lengths.max()))
    results = []
    for row, n in zip(out, lengths, strict=True):
      text, _ = self.strings.text(row[:n])
      results.append({"text": text, "tokens": sampling.new_tokens(row, n, self.stops)})
    timings["new_tokens"] = int(lengths.sum())
    return results, timings

  def compile_beam(self, tokens, mask):
    stop = sampling.stop_array(self.stops)
    early = {"true": True, "false": False}.get(_EARLY_STOPPING.value, _EARLY_STOPPING.value)
    args = (self.max_new, _NUM_BEAMS.value, _LENGTH_PENALTY.value, early)
    program = sampling.beam_search.lower(
      self.model.params, self.model.config, tokens, mask, stop, *args
    ).compile()
    return lambda params, tokens, mask: program(params, tokens, mask, stop)

  def sample(self, tokens, mask, rng, stream):
    prefill_fn, decode_fn = self.programs[tokens.shape]
    watch = stream is not None or self.strings.stops
    printed = [0] * len(tokens)
    counted = [0] * len(tokens)
    stopped_at = {}

    def on_chunk(out, lengths):
      stopped = np.zeros(len(out), bool)
      for row, n in enumerate(lengths):
        text, hit = self.strings.text(out[row, :n])
        if hit:
          stopped[row] = True
          if row not in stopped_at:  # the first token count whose text holds the stop string
            stopped_at[row] = next(
              m for m in range(counted[row] + 1, n + 1) if self.strings.text(out[row, :m])[1]
            )
        counted[row] = n
        if stream is not None and row == 0:
          shown = self.strings.safe(text, final=hit)
          stream(shown[printed[0] :])
          printed[0] = max(printed[0], len(shown))
      return stopped

    timings = {}
    start = time.perf_counter()
    state = jax.block_until_ready(prefill_fn(self.model.params, tokens, mask, rng))
    timings["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
    out, lengths = sampling.run_decode(
      self.model.params, state, decode_fn, self.max_new, self.stops,
      chunk=STREAM_CHUNK if watch else 0, on_chunk=on_chunk if watch else None,
    )  # fmt: skip
    timings["decode_s"] = time.perf_counter() - start
    for row, n in stopped_at.items():
      lengths[row] = min(lengths[row], n)
    if stream is not None:
      text, _ = self.strings.text(out[0, : lengths[0]])
      stream(text[printed[0] :])
    return out, lengths, timings


def report(timings: dict) -> str:
  t = timings
  prefill_s, decode_s, steps = max(t["prefill_s"], 1e-9), max(t["decode_s"], 1e-9), t["steps"]
  return (
    f"[prefill {t['prompt_tokens']} tokens {t['prefill_s']:.3f}s "
    f"({t['prompt_tokens'] / prefill_s:,.0f} tok/s); decode {t['new_tokens']} tokens "
    f"{t['decode_s']:.3f}s ({t['new_tokens'] / decode_s:,.1f} tok/s, {steps / decode_s:,.1f} "
    f"steps/s); first token {t['prefill_s'] + t['decode_s'] / max(steps, 1):.3f}s; "
    f"compile {t['compile_s']:.1f}s]"
  )


def write_out(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def main(argv):
  del argv
  if _MAX_NEW.value is not None and _MAX_NEW.value <= 0:
    raise ValueError(f"--max_new_tokens must be > 0, got {_MAX_NEW.value}")
  if _NUM_BEAMS.value < 1:
    raise ValueError(f"--num_beams must be >= 1, got {_NUM_BEAMS.value}")
  mesh = _MESH()
  model = modeldir.load_model_dir(_CHECKPOINT.value, mesh)
  model.params, model.config = model_lib.for_generation(model.params, model.config)
  model.config = model.config.replace(kv_cache=_KV_CACHE.value)
  gen, tok = model.generation, model.tokenizer
  option = lambda flag, key, default=None: (
    flag.value if flag.value is not None else gen.get(key, default)
  )
  config = SamplingConfig(
    temperature=option(_TEMPERATURE, "temperature", 1.0),
    top_k=option(_TOP_K, "top_k", 0),
    top_p=option(_TOP_P, "top_p", 1.0),
    min_p=option(_MIN_P, "min_p", 0.0),
    repetition_penalty=option(_REPETITION, "repetition_penalty", 1.0),
    frequency_penalty=option(_FREQUENCY, "frequency_penalty", 0.0),
    presence_penalty=option(_PRESENCE, "presence_penalty", 0.0),
  )
  if _NUM_BEAMS.value > 1 and config.penalized:
    raise ValueError("--num_beams does not combine with repetition/frequency/presence penalties")
  generator = Generator(model, mesh, config, option(_MAX_NEW, "max_new_tokens"), stop_ids(tok, gen))
  template = gen.get("chat_template")
  if _CHAT.value and not template:
    raise ValueError(f"{_CHECKPOINT.value} has no chat template (generation.json)")
  if _INTERACTIVE.value:
    return interactive(generator, tok, template if _CHAT.value else None)

  if _PROMPT_TOKENS.value:
    try:
      ids = [int(x) for x in _PROMPT_TOKENS.value.split(",") if x.strip()]
    except ValueError:
      message = f"--prompt_tokens must be comma-separated integers: {_PROMPT_TOKENS.value}"
      raise ValueError(message) from None
    prompts, encoded = [tok.decode(ids)], [ids]
  else:
    prompts = read_prompts()
    if not prompts:
      raise ValueError(
        "give --prompt=TEXT, --prompt_file=FILE, --prompt_tokens=IDS or --interactive"
      )
    if _CHAT.value:
      encoded = [
        tok.encode(tasks.render_chat(template, [{"role": "user", "content": p}], tok))
        for p in prompts
      ]
    else:
      encoded = [tok.encode(p) for p in prompts]
  streaming = _STREAM.value and len(prompts) == 1 and _NUM_BEAMS.value == 1
  if streaming:
    write_out(prompts[0])
  results, timings = generator(encoded, write_out if streaming else None)
  for prompt, result in zip(prompts, results, strict=True):
    result["prompt"] = prompt
    print("" if streaming else prompt + result["text"], flush=True)
  print(report(timings), flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump([{k: r[k] for k in ("prompt", "text", "tokens")} for r in results], f, indent=2)


def interactive(generator: Generator, tok, template: str | None) -> None:
  """Reads a prompt per line until EOF (or an empty line); with a template, keeps the chat."""
  messages = []
  while True:
    sys.stdout.write("> ")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
      print()
      return
    messages.append({"role": "user", "content": line.rstrip("\n")})
    text = tasks.render_chat(template, messages, tok) if template else line.rstrip("\n")
    try:
      results, timings = generator([tok.encode(text)], write_out if _STREAM.value else None)
    except ValueError as e:  # e.g. the chat outgrew the context: say so, keep the loop
      print(f"error: {e}", flush=True)
      messages.pop()
      continue
    if not _STREAM.value:
      write_out(results[0]["text"])
    print(f"\n{report(timings)}", flush=True)
    messages.append({"role": "assistant", "content": results[0]["text"]})
    if not template:
      messages.clear()


if __name__ == "__main__":
  cli.run(main)
