"""nanoGPT's CPU recipe on tiny Shakespeare, through our train binary: loss and ms/iteration.

nanoGPT's README: 4 layers, 4 heads, width 128, block 64, batch 12, 2,000 iterations, lr 1e-3
decayed to 1e-4, dropout 0 -> validation loss 1.88; its PyTorch code took about 42 ms/iteration
on a 2-core machine here (1.886 at step 2,000).

  python benchmarks/nanogpt_cpu_recipe.py --data=../shared/data/tinyshakespeare.txt
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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--json", help="write the figures here")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable, "-m", "decoderjax.train",
      f"--config={REPO}/configs/shakespeare_char_cpu.py", f"--workdir={workdir}",
      "--config.data.source=text", f"--config.data.path={os.path.abspath(args.data)}",
      f"--config.train.steps={args.steps}", "--config.train.log_every=50",
      f"--config.eval.every_steps={args.steps}", f"--config.checkpoint.every_steps={args.steps}",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
  tokens_per_step = 12 * 64
  # Steady state: skip the first window (compilation) and the final one (evaluation, sample).
  ms = [1000 * tokens_per_step / r["tokens_per_sec"] for r in records[1:-1]]
  result = {
    "val_loss": records[-1]["val_loss"],
    "ms_per_iter_median": statistics.median(ms),
    "ms_per_iter_min": min(ms),
    "ms_per_iter_max": max(ms),
    "wall_seconds": wall,
    "nanogpt": NANOGPT,
  }
  print(f"decoderjax  val_loss {result['val_loss']:.4f}   {result['ms_per_iter_median']:.1f} "
        f"ms/iter (median; {min(ms):.1f}-{max(ms):.1f})   wall {wall:.0f}s")  # fmt: skip
  print(f"nanoGPT     val_loss {NANOGPT['val_loss']:.4f}   {NANOGPT['ms_per_iter']:.1f} ms/iter")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
