"""Greedy decoding speed against transformers (PyTorch, CPU, float32), same model and machine.

A SmolLM2-135M-shaped Llama (random weights, converted through `decoderjax.convert`), prompt of
128 tokens, 128 new tokens, batch 1 and 8, float32, bfloat16 and int8 weights (ours from
`python -m decoderjax.quantize`, theirs from PyTorch's dynamic int8 quantization of every
nn.Linear; their embedding table stays float32). Each figure is measured
in a process of its own (PyTorch's and XLA's thread pools never share the cores). Prints prefill
and decode tokens/s for both, and the bandwidth bound of decode: the weight bytes over the
measured memory copy rate, per row.

  python benchmarks/generate_vs_transformers.py [--json=FILE]
"""

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from decoderjax.checkpoints import exchange, modeldir
from decoderjax.inference import sampling
from decoderjax.inference.sampling import SamplingConfig
from decoderjax.model import int_weights, layout

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
  import torch

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


def bench_decoderjax(
  params, cfg, prompt: np.ndarray, new: int, repeats: int, keep_tokens=False
) -> dict:
  """Greedy decoding speed (medians of `repeats`); `keep_tokens`: the generated ids too
  ("generated")."""
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
  figures["compile_s"] = compile_s
  if keep_tokens:
    figures["generated"] = np.asarray(state.tokens).tolist()
  return figures


def _figures(prompt_tokens, prefill_s, new_tokens, decode_s) -> dict:
  return {
    "prefill_tok_s": prompt_tokens / prefill_s,
    "decode_tok_s": new_tokens / decode_s,
    "prefill_s": prefill_s,
    "decode_s": decode_s,
  }


def worker(args) -> dict:
  """One framework, batch and dtype, alone in this process (no other runtime's threads)."""
  prompt = np.random.default_rng(args.batch).integers(0, SMOLLM2_135M["vocab_size"],
                                                      (args.batch, args.prompt_len))  # fmt: skip
  if args.worker == "transformers":
    import torch
    import transformers

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = transformers.LlamaForCausalLM.from_pretrained(args.dir, dtype=dtype).eval()
    if args.dtype == "int8":  # PyTorch's own weight int8 for CPU inference: dynamic quantization
      model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return bench_transformers(model, prompt, args.new_tokens, args.repeats)
  ours = modeldir.load_model_dir(args.dir)
  params, cfg = layout.for_generation(ours.params, ours.config)  # as the generate binary does
  return bench_decoderjax(params, cfg, prompt, args.new_tokens, args.repeats)


def run_worker(kind: str, directory: str, batch: int, dtype: str, args) -> dict:
  command = [sys.executable, __file__, f"--worker={kind}", f"--dir={directory}",
             f"--batch={batch}", f"--dtype={dtype}", f"--prompt_len={args.prompt_len}",
             f"--new_tokens={args.new_tokens}", f"--repeats={args.repeats}"]  # fmt: skip
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{kind} batch {batch} {dtype} failed:\n{out.stderr[-3000:]}")
  result = next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))
  return json.loads(result.removeprefix("RESULT "))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--dtypes", default="float32,bfloat16,int8")  # int8 after float32
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="write the figures here")
  parser.add_argument("--worker", choices=["decoderjax", "transformers"], help=argparse.SUPPRESS)
  parser.add_argument("--dir", help=argparse.SUPPRESS)
  parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args)))
    return
  import torch  # PyTorch is imported only where it runs (the decoderjax workers never load it)
  import transformers

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**SMOLLM2_135M)
  hf_model = transformers.LlamaForCausalLM(config).eval()
  bandwidth = copy_bandwidth()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    hf_model.save_pretrained(hf_dir, safe_serialization=True)
    with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
      f.write(_tokenizer_json())
    for dtype in args.dtypes.split(","):
      ours_dir = os.path.join(tmp, dtype)
      if dtype == "int8":  # python -m decoderjax.quantize of the float32 conversion
        modeldir.export_model_dir(
          os.path.join(tmp, "float32"), ours_dir, int_weights.quantizer("int8")
        )
      else:
        exchange.convert_hf(hf_dir, ours_dir, dtype)
      params = modeldir.load_model_dir(ours_dir).params
      weight_bytes = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
      for batch in [int(b) for b in args.batches.split(",")]:
        theirs = run_worker("transformers", hf_dir, batch, dtype, args)
        mine = run_worker("decoderjax", ours_dir, batch, dtype, args)
        rows.append({"dtype": dtype, "batch": batch, "transformers": theirs, "decoderjax": mine,
                     "weight_bytes": weight_bytes,
                     "bound_decode_tok_s": bandwidth / weight_bytes * batch})  # fmt: skip
  print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s; {os.cpu_count()} CPUs; each figure from its "
        "own process; bound: batch x copy bandwidth / weight bytes")  # fmt: skip
  print("| dtype | batch | decoderjax decode tok/s | transformers decode tok/s | ratio | "
        "bound tok/s | decoderjax prefill tok/s | transformers prefill tok/s |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    d, t = r["decoderjax"], r["transformers"]
    print(f"| {r['dtype']} | {r['batch']} | {d['decode_tok_s']:.1f} | {t['decode_tok_s']:.1f} | "
          f"{d['decode_tok_s'] / t['decode_tok_s']:.2f}x | {r['bound_decode_tok_s']:.1f} | "
          f"{d['prefill_tok_s']:,.0f} | {t['prefill_tok_s']:,.0f} |")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"copy_bandwidth": bandwidth, "rows": rows}, f, indent=2)


def _tokenizer_json() -> str:
  """A minimal byte-level BPE tokenizer (generation here runs on token ids only)."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.BPE(vocab={chr(i): i for i in range(256)} | {"<eos>": 256}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  return tok.to_str()


if __name__ == "__main__":
  main()
