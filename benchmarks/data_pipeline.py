"""Pretraining data pipeline: prepare throughput, memory at corpus scale, input share of a step.

  python benchmarks/data_pipeline.py --parts=throughput,memory,step --json=data.json
  python benchmarks/data_pipeline.py --parts=memory --sizes_mb=100,1024,4096

throughput: `prepare` on the same JSONL text (tiny Shakespeare's paragraphs, repeated) against
  the tokenizer library's own batch call on that text in one process (HF `tokenizers`
  encode_batch, all threads; SentencePiece on lists; numpy for bytes), for 1 and 2 workers.
memory: peak resident memory of `prepare` (byte tokenizer, plain text) and of the training
  input pipeline (open the shards, the first batch at a far step, then 200 batches of GPT-2's
  1024-token rows) for corpora of each size, each in its own process.
step: GPT-2 124M train steps fed from prepared shards, as the trainer feeds them, against the
  same steps on one synthetic batch; and the time to build one batch beside the step time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from decoderjax.data import data_config, pipeline

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHAKESPEARE = os.path.join(HERE, "..", "..", "shared", "data", "tinyshakespeare.txt")


def paragraphs() -> list[str]:
  with open(SHAKESPEARE, encoding="utf-8") as f:
    return [p for p in f.read().split("\n\n") if p.strip()]


def write_jsonl(path: str, mb: float) -> None:
  docs = paragraphs()
  written, i = 0, 0
  with open(path, "w") as f:
    while written < mb * (1 << 20):
      line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
      f.write(line)
      written, i = written + len(line), i + 1


def write_text(path: str, mb: float) -> None:
  with open(SHAKESPEARE, encoding="utf-8") as f:
    text = f.read()
  with open(path, "w") as f:
    for _ in range(int(mb * (1 << 20) // len(text)) + 1):
      f.write(text)


def hf_tokenizer(path: str) -> str:
  """A byte-level BPE of 8,192 ids trained on tiny Shakespeare (tokenizer.json)."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"])
  tok.train([SHAKESPEARE], trainer)
  tok.save(path)
  return path


def run_child(args: list[str]) -> dict:
  """A command in its own process: seconds, the peak of its process tree's summed resident
  memory (sampled every 20 ms with psutil), and its output."""
  import psutil

  start = time.perf_counter()
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  root, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    try:
      tree = [root, *root.children(recursive=True)]
      peak = max(peak, sum(p.memory_info().rss for p in tree))
    except psutil.Error:
      pass
    time.sleep(0.02)
  stdout, stderr = proc.communicate()
  if proc.returncode:
    raise RuntimeError(stderr[-2000:])
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "peak_rss_mb": peak / (1 << 20), "stdout": stdout}


def prepare_command(inputs, output, tokenizer, workers, extra=()):
  return [
    sys.executable, "-m", "decoderjax.prepare", f"--input={inputs}", f"--output={output}",
    f"--tokenizer={tokenizer}", f"--workers={workers}", *extra,
  ]  # fmt: skip


def library_rate(kind: str, path: str, tokenizer_json: str) -> float:
  """MB/s of the tokenizer library alone on the JSONL's documents (read and parsed already)."""
  with open(path) as f:
    docs = [json.loads(line)["text"] for line in f]
  mb = sum(len(d.encode()) for d in docs) / (1 << 20)
  start = time.perf_counter()
  if kind == "hf":
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    for i in range(0, len(docs), 4096):
      tok.encode_batch_fast(docs[i : i + 4096], add_special_tokens=False)
  else:
    import numpy as np

    for d in docs:
      np.frombuffer(d.encode("utf-8"), np.uint8).astype(np.int32)
  return mb / (time.perf_counter() - start)


def throughput(root: str, mb: float) -> list[dict]:
  corpus = os.path.join(root, "corpus.jsonl")
  write_jsonl(corpus, mb)
  size_mb = os.path.getsize(corpus) / (1 << 20)
  tok_json = hf_tokenizer(os.path.join(root, "tokenizer.json"))
  rows = []
  for kind, flags in (("byte", ["--tokenizer=byte"]), ("hf", ["--tokenizer=hf"])):
    extra = [f"--tokenizer_path={tok_json}"] if kind == "hf" else []
    library = library_rate(kind, corpus, tok_json)
    for workers in (1, 2):
      out = os.path.join(root, f"{kind}-{workers}")
      command = prepare_command(corpus, out, flags[0].split("=")[1], workers, extra)
      result = run_child(command)
      rate = size_mb / result["seconds"]
      rows.append({
        "tokenizer": kind, "workers": workers, "corpus_mb": round(size_mb, 1),
        "prepare_mb_s": round(rate, 1), "library_mb_s": round(library, 1),
        "ratio": round(rate / library, 2), "peak_rss_mb": round(result["peak_rss_mb"]),
      })  # fmt: skip
      print(json.dumps(rows[-1]), flush=True)
  return rows


PIPELINE = """
import json, sys, time, resource
import numpy as np
from decoderjax.data import data_config, pipeline
start = time.perf_counter()
cfg = data_config.DataConfig(source="prepared", path=sys.argv[1], tokenizer="byte", seq_len=1024)
ds = pipeline.load_dataset(cfg, "")
batches = ds.train_batches(8, seed=0)
opened = time.perf_counter() - start
start = time.perf_counter()
far = 10 ** 6
batches.batch(far)
first = time.perf_counter() - start
start = time.perf_counter()
for step in range(200):
  batches.batch(far + step)
per_batch = (time.perf_counter() - start) / 200
print(json.dumps({"open_s": opened, "first_batch_s": first, "batch_ms": per_batch * 1e3,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def memory(root: str, sizes_mb: list[float]) -> list[dict]:
  rows = []
  for mb in sizes_mb:
    corpus = os.path.join(root, f"text-{mb:g}.txt")
    write_text(corpus, mb)
    out = os.path.join(root, f"prepared-{mb:g}")
    prep = run_child(prepare_command(corpus, out, "byte", os.cpu_count() or 1))
    pipe = run_child([sys.executable, "-c", PIPELINE, out])
    stats = json.loads(pipe["stdout"])
    size = os.path.getsize(corpus) / (1 << 20)
    rows.append({
      "corpus_mb": round(size), "prepare_s": round(prep["seconds"], 1),
      "prepare_mb_s": round(size / prep["seconds"], 1),
      "prepare_peak_rss_mb": round(prep["peak_rss_mb"]),
      "pipeline_peak_rss_mb": round(stats["peak_rss_mb"]),
      "open_s": round(stats["open_s"], 3), "first_batch_s": round(stats["first_batch_s"], 4),
      "batch_ms_8x1024": round(stats["batch_ms"], 2),
    })  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    for path in (corpus,):
      os.remove(path)
    subprocess.run(["rm", "-rf", out])
  return rows


def step(root: str, steps: int, batch: int, seq: int, rounds: int) -> dict:
  """GPT-2 124M steps fed from shards (as the trainer feeds them) against one synthetic batch."""
  corpus = os.path.join(root, "step.txt")
  write_text(corpus, 8)
  out = os.path.join(root, "step-prepared")
  run_child(prepare_command(corpus, out, "byte", 1))
  from decoderjax.runtime import hostmem

  hostmem.keep_freed_memory()
  import train_throughput as tt

  cfg = tt.model_config(tt.SHAPES["gpt2"]).replace(max_seq_len=seq)
  ds = pipeline.load_dataset(
    data_config.DataConfig(source="prepared", path=out, tokenizer="byte", seq_len=seq), ""
  )
  batches = ds.train_batches(batch, seed=0)
  start = time.perf_counter()
  for s in range(50):
    batches.batch(s)
  build_ms = (time.perf_counter() - start) / 50 * 1e3
  result = {"batch": batch, "seq": seq, "build_batch_ms": round(build_ms, 3)}
  fns = {
    name: tt.compiled_train_step(cfg, batch, seq, next_batch=feed)[0]
    for name, feed in (("synthetic", None), ("prepared", batches.batch))
  }
  times = {name: [] for name in fns}
  for _ in range(rounds):  # alternating, so the machine's drift hits both
    for name, fn in fns.items():
      fn()  # warm-up (the first step after switching faults its buffers in)
      times[name] += tt.time_steps(fn, steps)
  for name, ts in times.items():
    result[f"{name}_step_s"] = round(sorted(ts)[len(ts) // 2], 3)
  result["exposed_share"] = round(result["prepared_step_s"] / result["synthetic_step_s"] - 1, 4)
  result["build_share"] = round(build_ms / 1e3 / result["synthetic_step_s"], 5)
  print(json.dumps(result), flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="throughput,memory,step")
  parser.add_argument("--throughput_mb", type=float, default=100)
  parser.add_argument("--sizes_mb", default="100,1024,4096")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=3, help="step: alternating rounds")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=1024)
  parser.add_argument("--json", default="")
  parser.add_argument("--root", default="", help="scratch directory (default: a temporary one)")
  args = parser.parse_args()
  results = {}
  with tempfile.TemporaryDirectory(dir=args.root or None) as root:
    parts = args.parts.split(",")
    if "throughput" in parts:
      results["throughput"] = throughput(root, args.throughput_mb)
    if "memory" in parts:
      results["memory"] = memory(root, [float(x) for x in args.sizes_mb.split(",")])
    if "step" in parts:
      results["step"] = step(root, args.steps, args.batch, args.seq, args.rounds)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
