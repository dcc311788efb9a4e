"""bfloat16 training MFU of a Llama-shaped model on an accelerator, in one call.

  python benchmarks/accelerator_mfu.py                     # llama-3.2-1b, batch 8 x 2048
  python benchmarks/accelerator_mfu.py --preset=tiny-llama --batch=2 --seq=64 --peak_size=512

First the device's measured matmul peak (best of square bfloat16 matmuls, float32 accumulation),
then full train steps (forward, backward, AdamW; float32 weights, bfloat16 compute) of the preset
with random tokens, built and sharded as the train binary does (`--fsdp=-1`: parameters and
optimizer state sharded over every device). Prints tokens/s, MFU (model FLOPs per token x tokens/s
over the measured peak, and over the published peak where known), compile time and peak device
memory, one JSON line. Meant for the H200 of the device tool; the second line is the CPU smoke run.
`--projection=REPORT.json` (written by `python -m decoderjax.compile --output_json` for the same
preset, batch and mesh, e.g. `--topology=h200:1`) puts its roofline MFU beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from train_throughput import compiled_train_step, peak_rss, time_steps


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="llama-3.2-1b")
  parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--steps", type=int, default=10, help="timed steps after one warm-up")
  parser.add_argument("--remat", default="none", help="ModelConfig.remat: none, dots, full, ...")
  parser.add_argument("--fsdp", type=int, default=-1, help="mesh fsdp axis (-1: every device)")
  parser.add_argument("--peak_size", type=int, default=8192, help="matmul side for the peak")
  parser.add_argument("--json", help="write the figures here too")
  parser.add_argument("--projection", help="a decoderjax.compile --output_json report to compare")
  args = parser.parse_args()

  import jax

  from decoderjax.model.presets import get_preset
  from decoderjax.runtime import sharding
  from decoderjax.training.metrics import flops_per_token, matmul_flops, peak_flops

  cfg = get_preset(
    args.preset, dtype="bfloat16", param_dtype="float32", max_seq_len=args.seq, remat=args.remat
  )
  fsdp = jax.device_count() if args.fsdp == -1 else args.fsdp
  mesh = sharding.MeshConfig(data=-1, fsdp=fsdp)
  device = jax.devices()[0]
  # best of square matmuls of side peak_size and twice that
  sizes = (args.peak_size, 2 * args.peak_size)
  peak = max(matmul_flops(n, "bfloat16", 10) for n in sizes) * jax.device_count()
  published = peak_flops("bfloat16") if device.platform != "cpu" else None  # per device
  step, compile_s = compiled_train_step(cfg, args.batch, args.seq, mesh)
  first_loss = step()  # warm-up
  times = time_steps(step, args.steps)
  tokens_per_s = args.batch * args.seq / statistics.median(times)
  model_flops = flops_per_token(cfg, args.seq) * tokens_per_s
  memory = device.memory_stats() or {}
  result = {
    "device": device.device_kind,
    "devices": jax.device_count(),
    "preset": args.preset,
    "batch_x_seq": f"{args.batch} x {args.seq}",
    "remat": args.remat,
    "step_s_median": statistics.median(times),
    "step_s_min": min(times),
    "step_s_max": max(times),
    "tokens_per_s": tokens_per_s,
    "compile_s": compile_s,
    "bf16_matmul_peak_flops": peak,
    "mfu_measured_peak": model_flops / peak,
    "mfu_published_peak": model_flops / (published * jax.device_count()) if published else None,
    "peak_device_bytes": memory.get("peak_bytes_in_use"),
    "peak_rss_bytes": peak_rss(),
    "loss_first_last": [first_loss, step()],
    "at": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  if args.projection:
    with open(args.projection) as f:
      roofline = json.load(f)["roofline"]
    result["projected_mfu"] = roofline["mfu"]
    result["projected_mfu_no_overlap"] = roofline["mfu_no_overlap"]
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
