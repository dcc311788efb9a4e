"""Greedy decoding speed against transformers (PyTorch, CPU, float32), same model and machine.

A SmolLM2-135M-shaped Llama (random weights, converted through `decoderjax.convert`), prompt of
128 tokens, 128 new tokens, batch 1 and 8. Prints prefill and decode tokens/s for both, and the
bandwidth bound of batch-1 decode: float32 weight bytes over the measured memory copy rate.

  python benchmarks/generate_vs_transformers.py [--json=FILE]
"""

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from decoderjax import convert, modeldir, sampling
from decoderjax.sampling import SamplingConfig

SMOLLM2_135M = dict(
  vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
  num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
  rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)  # fmt: skip


def copy_bandwidth(nbytes: int = 1 << 29) -> float:
  """Bytes/s of a large memcpy (read + write counted once each), best of 5."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  best = min(_timed(functools.partial(np.copyto, dst, src)) for _ in range(5))
  return 2 * nbytes / best


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def bench_transformers(model, prompt: np.ndarray, new: int, repeats: int) -> dict:
  ids = torch.from_numpy(prompt).long()
  mask = torch.ones_like(ids)
  kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=mask)
  with torch.no_grad():
    model.generate(ids, max_new_tokens=2, **kwargs)  # warm-up
    prefill = statistics.median(_timed(lambda: model(ids, attention_mask=mask)) for _ in range(3))
    total = statistics.median(
      _timed(lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs))
      for _ in range(repeats)
    )
  return _figures(prompt.size, prefill, new * len(prompt), total - prefill)


def bench_decoderjax(params, cfg, prompt: np.ndarray, new: int, repeats: int) -> dict:
  tokens, mask = prompt.astype(np.int32), np.ones_like(prompt, np.int32)
  config, rng = SamplingConfig(temperature=0), jax.random.key(0)
  start = time.perf_counter()
  prefill_fn, decode_fn = sampling.compile_programs(
    params, cfg, tokens, mask, rng, new, config, stop_ids=[]
  )
  compile_s = time.perf_counter() - start
  stop = sampling.stop_array([])
  prefills, decodes = [], []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(prefill_fn(params, tokens, mask, rng))
    prefills.append(time.perf_counter() - start)
    start = time.perf_counter()
    state = jax.block_until_ready(decode_fn(params, state, new, stop))
    decodes.append(time.perf_counter() - start)
    assert int(state.step) == new
  figures = _figures(prompt.size, statistics.median(prefills), new * len(prompt),
                     statistics.median(decodes))  # fmt: skip
  return {**figures, "compile_s": compile_s}


def _figures(prompt_tokens, prefill_s, new_tokens, decode_s) -> dict:
  return {
    "prefill_tok_s": prompt_tokens / prefill_s,
    "decode_tok_s": new_tokens / decode_s,
    "prefill_s": prefill_s,
    "decode_s": decode_s,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="write the figures here")
  args = parser.parse_args()
  torch.manual_seed(0)
  config = transformers.LlamaConfig(**SMOLLM2_135M)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf_model.save_pretrained(os.path.join(tmp, "hf"), safe_serialization=True)
    with open(os.path.join(tmp, "hf", "tokenizer.json"), "w") as f:
      f.write(_tokenizer_json())
    convert.convert_hf(os.path.join(tmp, "hf"), os.path.join(tmp, "ours"))
    ours = modeldir.load_model_dir(os.path.join(tmp, "ours"))
  weight_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(ours.params))
  bandwidth = copy_bandwidth()
  bound = bandwidth / weight_bytes  # batch-1 steps/s if every step reads all weights once
  rows = []
  rng = np.random.default_rng(0)
  for batch in [int(b) for b in args.batches.split(",")]:
    prompt = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
    theirs = bench_transformers(hf_model, prompt, args.new_tokens, args.repeats)
    mine = bench_decoderjax(ours.params, ours.config, prompt, args.new_tokens, args.repeats)
    rows.append({"batch": batch, "transformers": theirs, "decoderjax": mine,
                 "bound_decode_tok_s": bound * batch})  # fmt: skip
  print(f"weights {weight_bytes / 1e6:.0f} MB float32; copy bandwidth {bandwidth / 1e9:.1f} GB/s;"
        f" batch-1 decode bound {bound:.1f} tok/s; {os.cpu_count()} CPUs")  # fmt: skip
  print("| batch | decoderjax decode tok/s | transformers decode tok/s | ratio | bound tok/s | "
        "decoderjax prefill tok/s | transformers prefill tok/s |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    d, t = r["decoderjax"], r["transformers"]
    print(f"| {r['batch']} | {d['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
          f"{d['decode_tok_s'] / t['decode_tok_s']:.2f}x | {r['bound_decode_tok_s']:.1f} | "
          f"{d['prefill_tok_s']:,.0f} | {t['prefill_tok_s']:,.0f} |")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump(
        {"weight_bytes": weight_bytes, "copy_bandwidth": bandwidth, "rows": rows}, f, indent=2
      )


def _tokenizer_json() -> str:
  """A minimal byte-level BPE tokenizer (generation here runs on token ids only)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<eos>": 256}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  return tok.to_str()


if __name__ == "__main__":
  main()
