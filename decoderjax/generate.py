"""Generates text: python -m decoderjax.generate --checkpoint=DIR --prompt=TEXT.

Sampling defaults come from the model directory's generation.json; flags override them.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import flags

from decoderjax import cli, modeldir, sampling, sharding
from decoderjax.sampling import left_pad

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "File with one prompt per line.")
_PROMPT_TOKENS = flags.DEFINE_string("prompt_tokens", None, "Raw token ids: 1,2,3.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt in the model's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 means greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus sampling mass (1: all).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", False, "Always generate max_new_tokens (benchmarks).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write [{prompt, text, tokens}] here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def render_chat(template: str, prompt: str, tok) -> str:
  """One user turn through a Jinja chat template (as transformers renders them)."""
  import jinja2.sandbox

  def special(token_id):
    if token_id is None:
      return ""
    return tok.tok.id_to_token(token_id) if tok.kind == "hf" else tok.decode([token_id])

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
    messages=[{"role": "user", "content": prompt}],
    add_generation_prompt=True,
    bos_token=special(tok.bos_id),
    eos_token=special(tok.eos_id),
  )


def read_prompts(tok, generation) -> tuple[list[str], list[list[int]]]:
  if _PROMPT_TOKENS.value:
    try:
      ids = [int(x) for x in _PROMPT_TOKENS.value.split(",") if x.strip()]
    except ValueError:
      message = f"--prompt_tokens must be comma-separated integers: {_PROMPT_TOKENS.value}"
      raise ValueError(message) from None
    return [tok.decode(ids)], [ids]
  prompts = list(_PROMPT.value or [])
  if _PROMPT_FILE.value:
    with open(_PROMPT_FILE.value) as f:
      prompts += [line.rstrip("\n") for line in f if line.strip()]
  if not prompts:
    raise ValueError("give --prompt=TEXT, --prompt_file=FILE or --prompt_tokens=IDS")
  texts = prompts
  if _CHAT.value:
    template = generation.get("chat_template")
    if not template:
      raise ValueError(f"{_CHECKPOINT.value} has no chat template (generation.json)")
    texts = [render_chat(template, p, tok) for p in prompts]
  encoded = [tok.encode(t) for t in texts]
  if any(not e for e in encoded):
    raise ValueError("empty prompt: every prompt needs at least one token")
  return prompts, encoded


def main(argv):
  del argv
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
  gen, tok, cfg = model.generation, model.tokenizer, model.config
  option = lambda flag, key: flag.value if flag.value is not None else gen[key]
  max_new = option(_MAX_NEW, "max_new_tokens")
  prompts, encoded = read_prompts(tok, gen)
  longest = max(map(len, encoded)) + max_new
  if longest > cfg.max_seq_len:
    raise ValueError(
      f"prompt plus max_new_tokens is {longest} tokens, over the model's context "
      f"max_seq_len={cfg.max_seq_len}"
    )
  tokens, mask = left_pad(encoded)
  eos = -1 if _IGNORE_EOS.value or tok.eos_id is None else tok.eos_id
  rng = jax.random.key(_SEED.value)
  sampling_args = (option(_TEMPERATURE, "temperature"), option(_TOP_K, "top_k"),
                   option(_TOP_P, "top_p"), eos)  # fmt: skip
  with sharding.activate(mesh):  # parameters sharded by their logical axes; XLA does the rest
    start = time.perf_counter()
    cache_len = tokens.shape[1] + max_new
    pre = sampling.prefill.lower(model.params, cfg, tokens, mask, cache_len).compile()
    shapes = jax.eval_shape(sampling.prefill, model.params, cfg, tokens, mask, cache_len)
    temperature, top_k, top_p, eos_id = sampling_args
    dec = sampling.decode.lower(
      model.params, cfg, shapes[1], shapes[0], shapes[2], rng, max_new, temperature, top_k,
      top_p, eos_id,
    ).compile()  # fmt: skip
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    logits, cache, last = jax.block_until_ready(pre(model.params, tokens, mask))
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out, lengths = jax.block_until_ready(
      dec(model.params, cache, logits, last, rng, temperature, top_p, eos_id)
    )
    decode_s = time.perf_counter() - start
  out, lengths = np.asarray(out), np.asarray(lengths)
  results = []
  for prompt, row, n in zip(prompts, out, lengths, strict=True):
    new = [int(t) for t in row[:n] if t != eos]
    results.append({"prompt": prompt, "text": tok.decode(new), "tokens": new})
    print(prompt + results[-1]["text"], flush=True)
  prompt_tokens, steps = int(mask.sum()), int(lengths.max())
  print(
    f"[prefill {prompt_tokens} tokens {prefill_s:.3f}s ({prompt_tokens / prefill_s:,.0f} tok/s); "
    f"decode {int(lengths.sum())} tokens {decode_s:.3f}s "
    f"({lengths.sum() / decode_s:,.1f} tok/s, {steps / decode_s:,.1f} steps/s); "
    f"first token {prefill_s + decode_s / max(steps, 1):.3f}s; compile {compile_s:.1f}s]",
    flush=True,
  )
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  cli.run(main)
