"""Peak resident memory of training nanoGPT's "baby GPT" (configs/shakespeare_char.py: 6 layers,
6 heads, width 384, batch 64 x 256, dropout 0.2) through the train binary, against the PyTorch
re-implementation of nanoGPT (`nanogpt_torch_reference.py`) at the same shape and batch.

Each run is its own process; its peak RSS is the kernel's (`wait4`'s ru_maxrss; this parent
loads no framework, so the high-water mark Linux carries through exec is small). Our runs vary
what the train binary sets up on a CPU: the CPU as one device or two (`mesh.cpu_devices`), glibc
keeping freed memory (`--keep_freed_memory`) and what the backward pass recomputes
(`model.remat`).

  python benchmarks/train_memory.py --data=../shared/data/tinyshakespeare.txt --steps=8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OURS = {  # name -> extra flags of the train binary
  "as shipped": [],
  "one CPU device": ["--config.mesh.cpu_devices=1"],
  "freed memory returned": ["--nokeep_freed_memory"],
  "remat=none": ["--config.model.remat=none"],  # the config recomputes with remat=dots
  "remat=full": ["--config.model.remat=full"],
}


def run(command: list[str]) -> tuple[float, float, str]:
  """(peak RSS in GiB, wall seconds, stdout): the child waited for with wait4."""
  start = time.perf_counter()
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = proc.stdout.read(), proc.stderr.read()
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command[:4])} failed:\n{err[-3000:]}")
  return usage.ru_maxrss / 2**20, time.perf_counter() - start, out


def tokens_per_sec(out: str, torch_batch: int = 0) -> float:
  """Training speed from a run's output: the median of the train binary's log lines (one a
  step), or of the PyTorch script's milliseconds per step."""
  if torch_batch:
    return (
      torch_batch * 256 / (json.loads(out.strip().splitlines()[-1])["ms_per_iter_median"] / 1e3)
    )
  rates = [float(line.split("tokens_per_sec=")[1].split()[0])
           for line in out.splitlines() if "tokens_per_sec=" in line]  # fmt: skip
  return statistics.median(rates[1:] or rates)  # the first step compiles


def torch_command(args) -> list[str]:
  return [
    sys.executable, os.path.join(REPO, "benchmarks", "nanogpt_torch_reference.py"),
    f"--data={args.data}", f"--steps={args.steps}", "--layers=6", "--heads=6", "--width=384",
    "--block=256", f"--batch={args.batch}", "--dropout=0.2", "--no_eval",
  ]  # fmt: skip


def ours_command(args, workdir: str, extra: list[str]) -> list[str]:
  return [
    sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/shakespeare_char.py",
    f"--workdir={workdir}", "--config.data.source=text", f"--config.data.path={args.data}",
    f"--config.train.steps={args.steps}", f"--config.train.batch_size={args.batch}",
    "--config.train.log_every=1", "--config.train.sample_every=0",
    "--config.train.sample_tokens=0", "--config.eval.every_steps=0", "--config.eval.max_batches=1",
    "--config.checkpoint.every_steps=0", "--config.checkpoint.async_save=False",
    "--config.optimizer.warmup_steps=2", "--compilation_cache=none", *extra,
  ]  # fmt: skip


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
  parser.add_argument("--steps", type=int, default=6)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--runs", default=",".join(OURS), help="which of our runs, comma-separated")
  parser.add_argument("--json")
  args = parser.parse_args()
  unknown = sorted(set(args.runs.split(",")) - set(OURS))
  if unknown:
    parser.error(f"unknown runs {unknown}; choose from {list(OURS)}")
  rows = []
  gib, seconds, out = run(torch_command(args))
  speed = tokens_per_sec(out, args.batch)
  rows.append(
    {"run": "PyTorch nanoGPT", "peak_rss_gib": gib, "seconds": seconds, "tokens_per_sec": speed}
  )
  print(f"PyTorch nanoGPT: peak RSS {gib:.2f} GiB, {speed:,.0f} tokens/s", flush=True)
  for name in args.runs.split(","):
    with tempfile.TemporaryDirectory() as workdir:
      gib, seconds, out = run(ours_command(args, os.path.join(workdir, "w"), OURS[name]))
    speed = tokens_per_sec(out)
    rows.append({"run": name, "peak_rss_gib": gib, "seconds": seconds, "tokens_per_sec": speed})
    print(f"decoderjax, {name}: peak RSS {gib:.2f} GiB, {speed:,.0f} tokens/s", flush=True)
  theirs = rows[0]["peak_rss_gib"]
  print(f"\n| run (batch {args.batch} x 256, {args.steps} steps) | peak RSS GiB | x PyTorch "
        "| tokens/s | wall s |")  # fmt: skip
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['run']} | {r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / theirs:.2f} | "
          f"{r['tokens_per_sec']:,.0f} | {r['seconds']:.0f} |")  # fmt: skip
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
