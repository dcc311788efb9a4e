"""Peak memory of converting a large Hugging Face checkpoint: is it held only once?

  python benchmarks/convert_memory.py --preset=llama-3.2-1b --workdir=/tmp/convmem
  python benchmarks/convert_memory.py --preset=mistral-7b --workdir=/tmp/convmem  # ~30 GB disk

Writes a random checkpoint of the preset's shape as sharded bfloat16 safetensors (one shard per
layer, never the whole model in memory), converts it
(`decoderjax.checkpoints.exchange.convert_hf`, what `python -m decoderjax.convert --from=hf
--dtype=bfloat16` runs) in a child process, and prints
the child's peak memory beside the model's bytes: anonymous memory (what the conversion holds)
and file-backed memory (the memory-mapped safetensors pages: page cache, reclaimable), sampled
every 10 ms from /proc/self/status, and the kernel's peak RSS of both. No weights are downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import ml_dtypes
import numpy as np

from decoderjax.checkpoints import hf_config
from decoderjax.model.presets import get_preset


def hf_shapes(cfg) -> dict[str, dict[str, tuple]]:
  """Hugging Face Llama tensor shapes, grouped by shard (embeddings, each layer, the rest)."""
  d, f, n, k, h = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
  shards = {"embed": {"model.embed_tokens.weight": (cfg.vocab_size, d)}}
  for i in range(cfg.num_layers):
    p = f"model.layers.{i}."
    shards[f"layer{i}"] = {
      p + "self_attn.q_proj.weight": (n * h, d),
      p + "self_attn.k_proj.weight": (k * h, d),
      p + "self_attn.v_proj.weight": (k * h, d),
      p + "self_attn.o_proj.weight": (d, n * h),
      p + "mlp.gate_proj.weight": (f, d),
      p + "mlp.up_proj.weight": (f, d),
      p + "mlp.down_proj.weight": (d, f),
      p + "input_layernorm.weight": (d,),
      p + "post_attention_layernorm.weight": (d,),
    }
  shards["final"] = {"model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shards["final"]["lm_head.weight"] = (cfg.vocab_size, d)
  return shards


def write_checkpoint(cfg, directory: str, seed: int = 0) -> int:
  """Random bfloat16 safetensors shards + index + config.json; returns the weight bytes."""
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(seed)
  weight_map, total = {}, 0
  for shard, shapes in hf_shapes(cfg).items():
    tensors = {
      name: (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
      for name, shape in shapes.items()
    }
    save_file(tensors, os.path.join(directory, f"{shard}.safetensors"))
    total += sum(t.nbytes for t in tensors.values())
    weight_map.update({name: f"{shard}.safetensors" for name in tensors})
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  config = hf_config.config_to_hf(cfg)
  config.update(torch_dtype="bfloat16", eos_token_id=0, bos_token_id=0)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
  tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
  with open(os.path.join(directory, "tokenizer.json"), "w") as f:
    json.dump(tokenizer, f)
  return total


def child(source: str, output: str) -> None:
  """Converts while a thread samples this process's anonymous and file-backed resident memory."""
  from decoderjax.checkpoints import exchange

  peak = {"RssAnon": 0, "RssFile": 0}
  done = threading.Event()

  def watch():
    while not done.is_set():
      with open("/proc/self/status") as f:
        for line in f:
          key = line.split(":")[0]
          if key in peak:
            peak[key] = max(peak[key], int(line.split()[1]) * 1024)
      time.sleep(0.01)

  thread = threading.Thread(target=watch)
  thread.start()
  start = time.perf_counter()
  exchange.convert_hf(source, output, "bfloat16")
  seconds = time.perf_counter() - start
  done.set()
  thread.join()
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print("RESULT " + json.dumps({"anon": peak["RssAnon"], "file": peak["RssFile"], "rss": rss,
                                "seconds": seconds}))  # fmt: skip


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama-3.2-1b")
  parser.add_argument("--workdir", help="scratch folder (the checkpoint and its conversion)")
  parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(*args.child)
  if not args.workdir:
    parser.error("--workdir is required")
  cfg = get_preset(args.preset)
  source = os.path.join(args.workdir, "hf")
  output = os.path.join(args.workdir, "converted")
  shutil.rmtree(args.workdir, ignore_errors=True)
  start = time.perf_counter()
  weights = write_checkpoint(cfg, source)
  print(f"{args.preset}: wrote {weights / 2**30:.2f} GiB of bfloat16 weights "
        f"in {time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
  command = [sys.executable, os.path.abspath(__file__), "--child", source, output]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(result.stderr[-3000:])
  line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
  got = json.loads(line[len("RESULT ") :])
  summary = {
    "preset": args.preset,
    "weight_gib": weights / 2**30,
    "peak_anon_gib": got["anon"] / 2**30,
    "peak_file_gib": got["file"] / 2**30,
    "peak_rss_gib": got["rss"] / 2**30,
    "anon_over_weights": got["anon"] / weights,
    "convert_s": got["seconds"],
  }
  print(json.dumps(summary))
  print(f"held: {got['anon'] / 2**30:.2f} GiB anonymous = {got['anon'] / weights:.2f}x the "
        f"weights ({weights / 2**30:.2f} GiB); mapped checkpoint pages {got['file'] / 2**30:.2f} "
        f"GiB; peak RSS {got['rss'] / 2**30:.2f} GiB; {got['seconds']:.0f} s")  # fmt: skip
  if not args.keep:
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
