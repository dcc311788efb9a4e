"""Benchmarks that run in CI: the accelerator MFU script with a tiny preset on CPU, the
matmul-chain script's FLOP count and run, and the fine-tuning benchmark's task and schedule."""

import json
import os
import subprocess
import sys

import numpy as np

from decoderjax.training import metrics

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks")


def test_accelerator_mfu_runs_a_tiny_preset(tmp_path):
  out = tmp_path / "mfu.json"
  command = [sys.executable, "accelerator_mfu.py", "--preset=tiny-llama", "--batch=2",
             "--seq=64", "--steps=2", "--peak_size=128", f"--json={out}"]  # fmt: skip
  subprocess.run(command, cwd=BENCHMARKS, check=True, capture_output=True, text=True)
  result = json.loads(out.read_text())
  assert result["device"] == "cpu" and result["mfu_published_peak"] is None
  np.testing.assert_allclose(result["tokens_per_s"], 2 * 64 / result["step_s_median"])
  assert 0 < result["mfu_measured_peak"] < 1
  first, last = result["loss_first_last"]
  assert np.isfinite(first) and last < first  # AdamW steps moved the weights downhill


def test_matmul_chain_counts_the_step_projection_flops_and_runs(monkeypatch):
  monkeypatch.syspath_prepend(BENCHMARKS)
  import matmul_chain
  import train_throughput

  shape = train_throughput.SHAPES["recipe"]
  cfg = train_throughput.model_config(shape)
  rows = shape["batch"] * shape["seq"]
  flops = matmul_chain.step_products(rows, cfg.embed_dim, cfg.num_layers)[3]
  head = cfg.embed_dim * cfg.vocab_size
  assert flops == 6 * rows * (metrics.matmul_params(cfg) - head)  # forward, dX and dW

  command = [sys.executable, "matmul_chain.py", "--rows=32", "--width=16", "--layers=1",
             "--chain_depth=2", "--repeats=1", "--no_torch"]  # fmt: skip
  out = subprocess.run(command, cwd=BENCHMARKS, check=True, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["step_gflop"] == 3 * 2 * 32 * (16 * 48 + 16 * 16 + 2 * 16 * 64) / 1e9
  runs = [k for k in result if k != "step_gflop"]
  assert len(runs) == 4 and all(result[k]["gflops"] > 0 for k in runs)


def test_data_pipeline_benchmark_runs_small(tmp_path):
  out = tmp_path / "data.json"
  command = [sys.executable, "data_pipeline.py", "--parts=throughput,memory",
             "--throughput_mb=0.5", "--sizes_mb=1", f"--json={out}"]  # fmt: skip
  subprocess.run(command, cwd=BENCHMARKS, check=True, capture_output=True, text=True)
  result = json.loads(out.read_text())
  assert {(r["tokenizer"], r["workers"]) for r in result["throughput"]} == {
    ("byte", 1),
    ("byte", 2),
    ("hf", 1),
    ("hf", 2),
  }
  assert all(r["prepare_mb_s"] > 0 and r["library_mb_s"] > 0 for r in result["throughput"])
  (row,) = result["memory"]
  assert row["corpus_mb"] == 1 and 0 < row["pipeline_peak_rss_mb"] < 1024


def test_finetune_vs_peft_task_and_schedule_match_ours(monkeypatch):
  """The side-by-side fine-tuning benchmark: its line task as described (balanced, 40-100
  characters, no line on both sides) and its peft learning rates equal to our schedule's."""
  monkeypatch.syspath_prepend(BENCHMARKS)
  import finetune_vs_peft
  import shakespeare_tasks

  from decoderjax.training.optimizer import OptimizerConfig, make_schedule

  train, val = shakespeare_tasks.line_classification()
  assert len(train) == 2400 and len(val) == 600
  for records in (train, val):
    labels = [r["label"] for r in records]
    assert labels.count("hamlet") == labels.count("romeo_and_juliet") == len(records) // 2
    assert all(40 <= len(r["text"]) <= 100 for r in records)
  assert not {r["text"] for r in train} & {r["text"] for r in val}
  cfg = OptimizerConfig(
    learning_rate=finetune_vs_peft.LR, end_learning_rate=finetune_vs_peft.END_LR,
    warmup_steps=finetune_vs_peft.WARMUP, schedule="cosine",
  )  # fmt: skip
  ours = make_schedule(cfg, 300)
  theirs = [finetune_vs_peft._schedule(step, 300) for step in range(300)]
  np.testing.assert_allclose(theirs, [float(ours(step)) for step in range(300)], rtol=1e-5)


def test_finetune_vs_peft_feeds_peft_our_data_order(monkeypatch):
  """peft's batches are ours: the records TaskBatches picks at each step, across epochs."""
  monkeypatch.syspath_prepend(BENCHMARKS)
  import finetune_vs_peft

  from decoderjax.data.tasks import TaskBatches

  n, batch, steps, seed = 13, 4, 9, 3  # 36 picks: three epochs, two of them split by a batch
  data = {"inputs": np.ones((n, 8), np.int32), "segment_ids": np.ones((n, 8), np.int32)}
  ours = TaskBatches(data, batch, seed)
  theirs = finetune_vs_peft.example_order(n, batch, steps, seed)
  assert theirs == [ours.example_indices(step).tolist() for step in range(steps)]
