"""The accelerator MFU benchmark runs end to end (on CPU, with a tiny preset)."""

import json
import os
import subprocess
import sys

import numpy as np

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
