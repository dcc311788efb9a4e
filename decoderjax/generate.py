"""Generates text: python -m decoderjax.generate --checkpoint=DIR --prompt=TEXT.

Sampling defaults come from the model directory's generation.json; flags override them. One
prompt streams to the terminal as it is produced; --interactive reads prompts from stdin.
A cross-attention (seq2seq) model generates from --source=TEXT (its target starts from the start
token, then the optional --prompt); --interactive then reads sources.
"""

from __future__ import annotations

import json
import sys

from absl import flags

from decoderjax import cli
from decoderjax.data import chat_template, examples
from decoderjax.inference import offline as generator_lib
from decoderjax.inference.offline import GenerateConfig, Generator, report
from decoderjax.model.config import KV_CACHES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string(
  "prompt_file", None, "One prompt per line, or JSONL with a 'prompt' field."
)
_PROMPT_TOKENS = flags.DEFINE_string("prompt_tokens", None, "Raw token ids: 1,2,3.")
_SOURCE = flags.DEFINE_multi_string(
  "source", None, "A cross-attention model's source text; repeat for a batch."
)
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
_WINDOW = flags.DEFINE_integer(
  "window",
  None,
  "Positions generation uses; a full window goes on from its last half, prefilled afresh "
  "(default: the row length the model trained on, else its context; 0: stop at the context).",
)
_TRUNCATE = cli.define_truncate_flag()
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write [{prompt, text, tokens}] here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


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


def write_out(text: str) -> None:
  sys.stdout.write(text)
  sys.stdout.flush()


def generate_config(model) -> GenerateConfig:
  """The flags over the model directory's generation.json."""
  gen = model.generation
  sampling = generator_lib.sampling_config(
    gen,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    min_p=_MIN_P.value,
    repetition_penalty=_REPETITION.value,
    frequency_penalty=_FREQUENCY.value,
    presence_penalty=_PRESENCE.value,
  )
  max_new = _MAX_NEW.value if _MAX_NEW.value is not None else gen.get("max_new_tokens")
  return GenerateConfig(
    max_new_tokens=max_new,
    sampling=sampling,
    stop_ids=() if _IGNORE_EOS.value else generator_lib.stop_ids(model.tokenizer, gen),
    stop_strings=tuple(_STOP.value or ()),
    num_beams=_NUM_BEAMS.value,
    length_penalty=_LENGTH_PENALTY.value,
    early_stopping={"true": True, "false": False}.get(_EARLY_STOPPING.value, "never"),
    seed=_SEED.value,
    window=generator_lib.trained_window(model) if _WINDOW.value is None else _WINDOW.value,
  )


def encode_prompts(tok, template: str | None) -> tuple[list[str], list[list[int]]]:
  """(prompt texts, their token ids) from --prompt_tokens, else --prompt and --prompt_file."""
  if _PROMPT_TOKENS.value:
    try:
      ids = [int(x) for x in _PROMPT_TOKENS.value.split(",") if x.strip()]
    except ValueError:
      message = f"--prompt_tokens must be comma-separated integers: {_PROMPT_TOKENS.value}"
      raise ValueError(message) from None
    return [tok.decode(ids)], [ids]
  prompts = read_prompts()
  if not prompts:
    raise ValueError("give --prompt=TEXT, --prompt_file=FILE, --prompt_tokens=IDS or --interactive")
  if template:
    chats = [
      chat_template.render_chat(template, [{"role": "user", "content": p}], tok) for p in prompts
    ]
    return prompts, [tok.encode(c) for c in chats]
  return prompts, [tok.encode(p) for p in prompts]


def main(argv):
  del argv
  if _MAX_NEW.value is not None and _MAX_NEW.value <= 0:
    raise ValueError(f"--max_new_tokens must be > 0, got {_MAX_NEW.value}")
  if _NUM_BEAMS.value < 1:
    raise ValueError(f"--num_beams must be >= 1, got {_NUM_BEAMS.value}")
  mesh = _MESH()
  model = generator_lib.load(_CHECKPOINT.value, mesh, _KV_CACHE.value)
  generator = Generator(model, generate_config(model), mesh)
  tok, template = model.tokenizer, model.generation.get("chat_template")
  if _CHAT.value and not template:
    raise ValueError(f"{_CHECKPOINT.value} has no chat template (generation.json)")
  template = template if _CHAT.value else None
  seq2seq = model.config.cross_attention
  if _SOURCE.value and not seq2seq:
    raise ValueError("--source is for a cross-attention model (cross_attention=True)")
  if _INTERACTIVE.value:
    return interactive(generator, tok, template, seq2seq)
  if seq2seq:
    prompts, encoded, sources = encode_sources(tok)
  else:
    (prompts, encoded), sources = encode_prompts(tok, template), None
  encoded, dropped = generator.fit(encoded, truncate=_TRUNCATE.value)
  cli.note_truncated(dropped)
  streaming = _STREAM.value and len(prompts) == 1 and _NUM_BEAMS.value == 1
  echo = not template  # a completion prints its prompt first; a chat prints the reply alone
  if streaming and echo:
    write_out(prompts[0])
  results, timings = generator(encoded, write_out if streaming else None, sources=sources)
  for prompt, result in zip(prompts, results, strict=True):
    result["prompt"] = prompt
    print("" if streaming else prompt * echo + result["text"], flush=True)
  print(report(timings), flush=True)
  if _OUTPUT_JSON.value:
    keys = ("prompt", "text", "tokens")
    records = [{k: r[k] for k in keys} for r in results]
    for record, source in zip(records, _SOURCE.value or [], strict=False):
      record["source"] = source
    cli.write_json(_OUTPUT_JSON.value, records)


def encode_sources(tok) -> tuple[list[str], list[list[int]], list[list[int]]]:
  """A seq2seq model's (prompts, targets' first tokens, sources): each --source, with the
  --prompt of the same place (if any) after the start token."""
  if not _SOURCE.value:
    raise ValueError("a cross-attention model generates from a source: give --source=TEXT")
  if _CHAT.value or _PROMPT_TOKENS.value or _PROMPT_FILE.value:
    raise ValueError("a cross-attention model takes --source (and --prompt), not chats or files")
  prompts = list(_PROMPT.value or [""] * len(_SOURCE.value))
  if len(prompts) != len(_SOURCE.value):
    raise ValueError(f"{len(_SOURCE.value)} --source for {len(prompts)} --prompt: give one each")
  start = examples.start_id(tok)
  encoded = [[start, *tok.encode(p)] for p in prompts]
  return prompts, encoded, [tok.encode(s) for s in _SOURCE.value]


def interactive(generator: Generator, tok, template: str | None, seq2seq=False) -> None:
  """Reads a prompt per line until EOF (or an empty line); with a template, keeps the chat; a
  seq2seq model reads a source per line."""
  messages = []
  while True:
    sys.stdout.write("> ")
    sys.stdout.flush()
    line = sys.stdin.readline()
    if not line.strip():
      print()
      return
    messages.append({"role": "user", "content": line.rstrip("\n")})
    text = chat_template.render_chat(template, messages, tok) if template else line.rstrip("\n")
    encoded, sources = [tok.encode(text)], None
    if seq2seq:
      encoded, sources = [[examples.start_id(tok)]], encoded
    try:
      encoded, dropped = generator.fit(encoded, truncate=_TRUNCATE.value)
      cli.note_truncated(dropped)
      results, timings = generator(encoded, write_out if _STREAM.value else None, sources=sources)
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
