"""nanoGPT's CPU recipe on tiny Shakespeare, through our train binary: loss and ms/iteration.

nanoGPT's README: 4 layers, 4 heads, width 128, block 64, batch 12, 2,000 iterations, lr 1e-3
decayed to 1e-4, dropout 0 -> validation loss 1.88; its PyTorch code took about 42 ms/iteration
on a 2-core machine here (1.886 at step 2,000, from 20 random validation batches). Runs
`configs/shakespeare_char_cpu.py` (our RoPE/RMSNorm/SwiGLU block) and the same config with
nanoGPT's GPT-2 block; `--torch` adds `nanogpt_torch_reference.py` scored the same way (the mean
loss over the whole validation split).

  python benchmarks/nanogpt_cpu_recipe.py --data=../shared/data/tinyshakespeare.txt --torch
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NANOGPT = {"val_loss": 1.886, "ms_per_iter": 42.0}
GPT2_BLOCK = [
  "--config.model.position=learned",
  "--config.model.norm=layernorm",
  "--config.model.mlp=gelu",
  "--config.model.mlp_dim=512",
]


def run_decoderjax(data: str, steps: int, overrides: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable, "-m", "decoderjax.train",
      f"--config={REPO}/configs/shakespeare_char_cpu.py", f"--workdir={workdir}",
      "--config.data.source=text", f"--config.data.path={os.path.abspath(data)}",
      f"--config.train.steps={steps}", "--config.train.log_every=50",
      f"--config.eval.every_steps={steps}", f"--config.checkpoint.every_steps={steps}", *overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
  tokens_per_step = 12 * 64
  # Steady state: skip the first window (compilation) and the final one (evaluation, sample).
  ms = [1000 * tokens_per_step / r["tokens_per_sec"] for r in records[1:-1]]
  return {
    "val_loss": records[-1]["val_loss"],
    "ms_per_iter_median": statistics.median(ms),
    "ms_per_iter_min": min(ms),
    "ms_per_iter_max": max(ms),
    "wall_seconds": wall,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--torch", action="store_true", help="also run the PyTorch reference")
  parser.add_argument("--json", help="write the figures here")
  args = parser.parse_args()
  results = {
    "decoderjax (RoPE, RMSNorm, SwiGLU)": run_decoderjax(args.data, args.steps, []),
    "decoderjax (GPT-2 block)": run_decoderjax(args.data, args.steps, GPT2_BLOCK),
  }
  if args.torch:
    out = subprocess.run(
      [sys.executable, os.path.join(REPO, "benchmarks", "nanogpt_torch_reference.py"),
       f"--data={args.data}", f"--steps={args.steps}"],
      check=True, capture_output=True, text=True,
    )  # fmt: skip
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    results["PyTorch nanoGPT re-implementation"] = {
      "val_loss": ref["val_loss_full"],
      "ms_per_iter_median": ref["ms_per_iter_median"],
    }
  print("| run | val loss (whole split) | ms/iteration (median) |")
  print("| --- | --- | --- |")
  for name, r in results.items():
    print(f"| {name} | {r['val_loss']:.4f} | {r['ms_per_iter_median']:.1f} |")
  print(f"| nanoGPT README / its code here | {NANOGPT['val_loss']} (20 random batches) | "
        f"{NANOGPT['ms_per_iter']} |")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump({**results, "nanogpt": NANOGPT}, f, indent=2)


if __name__ == "__main__":
  main()
