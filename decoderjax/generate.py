"""Generates text: python -m decoderjax.generate --checkpoint=DIR --prompt=TEXT.

Sampling defaults come from the model directory's generation.json; flags override them.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import flags

from decoderjax import cli, modeldir, sharding
from decoderjax.sampling import generate_tokens, left_pad

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write [{prompt, text, tokens}] here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def main(argv):
  del argv
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise ValueError("give --prompt=TEXT or --prompt_file=FILE")
  for flag, ok, rule in (
    (_TEMPERATURE, lambda v: v >= 0, ">= 0"),
    (_TOP_P, lambda v: 0 < v <= 1, "in (0, 1]"),
    (_TOP_K, lambda v: v >= 0, ">= 0"),
    (_MAX_NEW, lambda v: v > 0, "> 0"),
  ):
    if flag.value is not None and not ok(flag.value):
      raise ValueError(f"--{flag.name} must be {rule}, got {flag.value}")
  mesh = _MESH()
  model = modeldir.load_model_dir(_CHECKPOINT.value, mesh)
  gen = model.generation
  options = {
    "max_new_tokens": _MAX_NEW.value if _MAX_NEW.value is not None else gen["max_new_tokens"],
    "temperature": _TEMPERATURE.value if _TEMPERATURE.value is not None else gen["temperature"],
    "top_k": _TOP_K.value if _TOP_K.value is not None else gen["top_k"],
    "top_p": _TOP_P.value if _TOP_P.value is not None else gen["top_p"],
  }
  tok = model.tokenizer
  encoded = [tok.encode(p) for p in prompts]
  if any(not e for e in encoded):
    raise ValueError("empty prompt: every prompt needs at least one token")
  longest = max(map(len, encoded)) + options["max_new_tokens"]
  if longest > model.config.max_seq_len:
    raise ValueError(
      f"prompt plus max_new_tokens is {longest} tokens, over the model's context "
      f"max_seq_len={model.config.max_seq_len}"
    )
  tokens, mask = left_pad(encoded)
  eos = tok.eos_id if tok.eos_id is not None else -1
  start = time.perf_counter()
  with sharding.activate(mesh):  # parameters sharded by their logical axes; XLA does the rest
    out, lengths = generate_tokens(
      model.params,
      model.config,
      tokens,
      mask,
      jax.random.key(_SEED.value),
      options["max_new_tokens"],
      options["temperature"],
      options["top_k"],
      options["top_p"],
      eos,
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
  seconds = time.perf_counter() - start
  results = []
  for prompt, row, n in zip(prompts, out, lengths, strict=True):
    new = [int(t) for t in row[:n] if t != eos]
    results.append({"prompt": prompt, "text": tok.decode(new), "tokens": new})
    print(prompt + results[-1]["text"], flush=True)
  print(f"[{int(lengths.sum())} tokens in {seconds:.2f}s, compile included]", flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
