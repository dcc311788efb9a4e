"""Training throughput and MFU against transformers (PyTorch), same machine, shapes and dtype.

  python benchmarks/train_throughput.py --json=results.json --markdown=results.md
  python benchmarks/train_throughput.py --shapes=tiny,baby --repeats=3 --steps=20

For each shape, full train steps (forward, backward, AdamW) of decoderjax's GPT-2-shaped model
(as the train binary runs it: `mesh.cpu_devices=-1` splits the CPU into one JAX device per core
for models under 20M matmul parameters, data parallel) and of transformers' GPT2LMHeadModel with
torch.optim.AdamW, each in its own process (so peak resident memory is per run), the two
frameworks alternating run by run so that a shared machine's drift hits both. Reports tokens/s
(median of the repeats, with min-max), the speedup (median of each back-to-back pair's
ratio, with min-max), compile time, MFU
(model FLOPs per token x tokens/s over the measured matmul peak), peak RSS, and the machine's
ceilings: the best float32 matmul rate through XLA and through PyTorch, and memory copy
bandwidth. Random token batches: throughput does not depend on the data.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from decoderjax.data import batches, data_config

SHAPES = {  # name: model and batch (nanoGPT's CPU recipe and baby char model, GPT-2 124M)
  "tiny": dict(layers=2, heads=4, width=128, vocab=256, batch=8, seq=64),
  "recipe": dict(layers=4, heads=4, width=128, vocab=65, batch=12, seq=64),
  "baby": dict(layers=6, heads=6, width=384, vocab=65, batch=8, seq=256),
  "gpt2": dict(layers=12, heads=12, width=768, vocab=50257, batch=2, seq=512),
}


def model_config(shape: dict, scan: bool | None = None):
  """decoderjax's GPT-2-shaped config; layers scanned above 4 unless `scan` says otherwise."""
  from decoderjax.model.config import ModelConfig

  scan = shape["layers"] > 4 if scan is None else scan
  return ModelConfig(
    vocab_size=shape["vocab"], max_seq_len=shape["seq"], num_layers=shape["layers"],
    num_heads=shape["heads"], embed_dim=shape["width"], mlp_dim=4 * shape["width"],
    position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True,
    scan_layers=scan,
  )  # fmt: skip


def peak_rss() -> float:
  """This process's resident high-water mark (VmHWM; ru_maxrss would include the forked
  parent's memory from before exec)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return float(line.split()[1]) * 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def time_steps(step, steps: int) -> list[float]:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def compiled_train_step(cfg, batch_size: int, seq: int, mesh_config=None, next_batch=None):
  """(step() -> loss as a float, compile seconds): decoderjax's full train step (forward,
  backward, AdamW) on random tokens, sharded and jitted as the train binary does it.
  `next_batch(i) -> packed batch`: each step then builds and sends the next batch while the
  device computes, as the trainer does (else one random batch serves every step)."""
  import functools

  import jax
  import numpy as np

  from decoderjax.runtime import sharding
  from decoderjax.training import experiment
  from decoderjax.training import state as state_lib
  from decoderjax.training.optimizer import OptimizerConfig, make_optimizer, make_schedule
  from decoderjax.training.steps import LossConfig, train_step

  exp = experiment.Experiment(
    cfg, data_config.DataConfig(seq_len=seq), OptimizerConfig(), LossConfig(),
    experiment.TrainConfig(batch_size=batch_size), experiment.EvalConfig(),
    experiment.CheckpointConfig(), mesh_config or sharding.MeshConfig(),
  )  # fmt: skip
  mesh = sharding.make_mesh(exp.mesh)
  optimizer = make_optimizer(exp.optimizer, 1000)
  with sharding.activate(mesh, exp.mesh.rules):
    layout = state_lib.state_shardings(exp, optimizer, mesh)
    state, frozen = state_lib.init_state(exp, optimizer, mesh)
    fn = jax.jit(
      functools.partial(
        train_step, cfg=cfg, optimizer=optimizer, loss_cfg=exp.loss,
        schedule=make_schedule(exp.optimizer, 1000),
      ),
      in_shardings=(layout["state"], sharding.batch_sharding(mesh), layout["frozen"]),
      out_shardings=(layout["state"], None),
      donate_argnums=0,
    )  # fmt: skip
    window = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch_size, seq + 1))
    batch = sharding.global_batch(mesh, batches.pack_window(window, None))
    start = time.perf_counter()
    compiled = fn.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - start
  holder = [state, batch, 0]

  def step() -> float:
    holder[0], metrics = compiled(holder[0], holder[1], frozen)
    if next_batch is not None:
      holder[2] += 1
      holder[1] = sharding.global_batch(mesh, next_batch(holder[2]))
    return float(metrics["loss"])  # wait, as the trainer does

  return step, compile_s


def run_decoderjax(shape: dict, steps: int, scan: bool | None = None) -> dict:
  from decoderjax.runtime import hostmem, sharding
  from decoderjax.training import metrics

  cfg = model_config(shape, scan)
  # as the train binary does, before JAX starts
  hostmem.keep_freed_memory()
  sharding.split_cpu(-1, (shape["batch"],), metrics.matmul_params(cfg))
  import jax

  step, compile_s = compiled_train_step(cfg, shape["batch"], shape["seq"])
  step()  # warm-up
  times = time_steps(step, steps)
  return {"step_s": times, "compile_s": compile_s, "devices": jax.device_count()}


def run_transformers(shape: dict, steps: int) -> dict:
  import torch
  import transformers

  torch.manual_seed(0)
  config = transformers.GPT2Config(
    vocab_size=shape["vocab"], n_positions=shape["seq"], n_embd=shape["width"],
    n_layer=shape["layers"], n_head=shape["heads"], resid_pdrop=0.0, embd_pdrop=0.0,
    attn_pdrop=0.0,
  )  # fmt: skip
  model = transformers.GPT2LMHeadModel(config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"]))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    float(loss)

  start = time.perf_counter()
  step()  # warm-up (eager: nothing to compile)
  first_s = time.perf_counter() - start
  times = time_steps(step, steps)
  return {"step_s": times, "compile_s": first_s, "threads": torch.get_num_threads()}


def ceilings() -> dict:
  """Best float32 matmul rate through XLA and PyTorch, and memory copy bandwidth."""
  import numpy as np
  import torch

  from decoderjax.training.metrics import matmul_flops

  n, best = 2048, {}
  best["xla_matmul_flops"] = matmul_flops(n, repeats=10)
  t = torch.ones(n, n)
  torch.mm(t, t)
  best["torch_matmul_flops"] = 2 * n**3 / min(time_steps(lambda: torch.mm(t, t), 10))
  src, dst = np.ones(2**27, np.float32), np.empty(2**27, np.float32)  # 512 MiB
  np.copyto(dst, src)
  copy_s = min(time_steps(lambda: np.copyto(dst, src), 5))
  best["copy_bytes_per_s"] = 2 * src.nbytes / copy_s  # read + write
  return best


def child(framework: str, shape_name: str, steps: int, scan: bool | None) -> None:
  shape = SHAPES[shape_name]
  if framework == "decoderjax":
    out = run_decoderjax(shape, steps, scan)
  else:
    out = run_transformers(shape, steps)
  out["peak_rss"] = peak_rss()
  print("RESULT " + json.dumps(out))


def measure(framework: str, shape_name: str, steps: int, layers: str) -> dict:
  command = [sys.executable, os.path.abspath(__file__), f"--child={framework}:{shape_name}",
             f"--steps={steps}", f"--layers={layers}"]  # fmt: skip
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise SystemExit(f"{framework} {shape_name} failed:\n{result.stderr[-3000:]}")
  line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
  return json.loads(line[len("RESULT ") :])


def summarize(runs: list[dict], peak: float, flops_per_token: float, tokens: int):
  rates = [tokens / statistics.median(r["step_s"]) for r in runs]
  rate = statistics.median(rates)
  return {
    "tokens_per_s": rate,
    "tokens_per_s_min": min(rates),
    "tokens_per_s_max": max(rates),
    "ms_per_step": 1e3 * tokens / rate,
    "compile_s": statistics.median(r["compile_s"] for r in runs),
    "mfu": flops_per_token * rate / peak,
    "peak_rss_gib": max(r["peak_rss"] for r in runs) / 2**30,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="tiny,recipe,baby,gpt2")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--markdown", help="write the table here")
  parser.add_argument(
    "--layers", default="auto", choices=["auto", "scan", "unrolled"],
    help="decoderjax's layers: nn.scan, an unrolled loop, or auto (scan above 4 layers)",
  )  # fmt: skip
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    framework, shape = args.child.split(":")
    return child(framework, shape, args.steps, {"scan": True, "unrolled": False}.get(args.layers))

  from decoderjax.training.metrics import flops_per_token

  limits = ceilings()
  results = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count()}
  results["ceilings"] = limits
  rows = []
  for name in args.shapes.split(","):
    shape = SHAPES[name]
    tokens = shape["batch"] * shape["seq"]
    fpt = flops_per_token(model_config(shape), shape["seq"])
    peaks = {"decoderjax": limits["xla_matmul_flops"], "transformers": limits["torch_matmul_flops"]}
    runs = {framework: [] for framework in peaks}
    for repeat in range(args.repeats):  # pairs, alternating who runs first: drift hits both
      for framework in list(peaks)[:: 1 if repeat % 2 == 0 else -1]:
        runs[framework].append(measure(framework, name, args.steps, args.layers))
    per = {}
    for framework, peak in peaks.items():
      per[framework] = summarize(runs[framework], peak, fpt, tokens)
      print(f"{name} {framework}: {per[framework]}", flush=True)
    ratios = [
      statistics.median(theirs["step_s"]) / statistics.median(ours["step_s"])
      for ours, theirs in zip(runs["decoderjax"], runs["transformers"], strict=True)
    ]
    per["speedup"] = statistics.median(ratios)  # of each pair's ratio
    per["speedup_min"], per["speedup_max"] = min(ratios), max(ratios)
    results[name] = {"shape": shape, "flops_per_token": fpt, **per}
    rows.append((name, shape, per))

  lines = [
    f"Machine: {results['machine']}, {results['cores']} cores; float32 matmul peak "
    f"{limits['xla_matmul_flops'] / 1e9:.0f} GFLOP/s (XLA), "
    f"{limits['torch_matmul_flops'] / 1e9:.0f} GFLOP/s (PyTorch); copy bandwidth "
    f"{limits['copy_bytes_per_s'] / 1e9:.1f} GB/s. Medians of {args.repeats} runs "
    f"({args.steps} steps each), min-max in brackets; the speedup is the median of each "
    "back-to-back pair's ratio.",
    "",
    "| shape | batch x seq | decoderjax tokens/s | transformers tokens/s | speedup | "
    "MFU ours / theirs | compile s | peak RSS GiB ours / theirs |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
  ]
  for name, shape, per in rows:
    ours, theirs = per["decoderjax"], per["transformers"]
    lines.append(
      f"| {name} | {shape['batch']} x {shape['seq']} | {ours['tokens_per_s']:,.0f} "
      f"({ours['tokens_per_s_min']:,.0f}-{ours['tokens_per_s_max']:,.0f}) | "
      f"{theirs['tokens_per_s']:,.0f} ({theirs['tokens_per_s_min']:,.0f}-"
      f"{theirs['tokens_per_s_max']:,.0f}) | {per['speedup']:.2f}x ({per['speedup_min']:.2f}-"
      f"{per['speedup_max']:.2f}) | "
      f"{ours['mfu']:.0%} / {theirs['mfu']:.0%} | {ours['compile_s']:.1f} | "
      f"{ours['peak_rss_gib']:.2f} / {theirs['peak_rss_gib']:.2f} |"
    )
  table = "\n".join(lines)
  print(table)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
