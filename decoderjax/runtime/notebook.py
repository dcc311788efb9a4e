"""Notebook helpers: run a decoderjax binary and plot its metrics.jsonl while it trains.

  from decoderjax.runtime import notebook
  notebook.run("train", "--config=configs/default.py", "--workdir=/tmp/w", workdir="/tmp/w")

The binaries run in a child process (as a user would type them), so a notebook can start
several with different device settings; matplotlib is needed only for the plots
(`pip install decoderjax[notebooks]`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

PLOTTED = ("loss", "val_loss")  # metrics.jsonl keys drawn against the step


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` so far (a line still being written is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records


def plot_metrics(records: list[dict], title: str = "", keys=PLOTTED, ax=None):
  """Loss curves (one line per key present) against the step; returns the axes."""
  import matplotlib.pyplot as plt

  if ax is None:
    ax = plt.figure(figsize=(7, 3.5)).gca()
  for key in keys:
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points, strict=True), marker="." if key.startswith("val") else None, label=key)
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(title)
  if ax.get_legend_handles_labels()[0]:
    ax.legend()
  ax.grid(alpha=0.3)
  return ax


def run(binary: str, *args: str, workdir: str | None = None, env: dict | None = None,
        poll_s: float = 5.0, quiet: bool = False) -> str:  # fmt: skip
  """`python -m decoderjax.BINARY ARGS...`; returns its output, raises if it fails.

  With `workdir`, the loss curve is redrawn every `poll_s` seconds in the notebook cell (and
  once at the end); otherwise the output is printed when the command ends (unless `quiet`).
  """
  command = [sys.executable, "-m", f"decoderjax.{binary}", *args]
  child_env = {**os.environ, **(env or {})}
  proc = subprocess.Popen(
    command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env
  )
  lines: list[str] = []
  reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout))
  reader.start()
  while proc.poll() is None:
    if workdir is not None:
      _redraw(workdir, binary, lines)
    time.sleep(poll_s)
  reader.join()
  if workdir is not None:
    _redraw(workdir, binary, lines)
  output = "\n".join(lines)
  if proc.returncode:
    raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
  if workdir is None and not quiet:
    print(output)
  return output


def run_python(code: str, env: dict | None = None) -> str:
  """Runs `python -c CODE` in a child process and prints its output (e.g. what JAX sees, without
  this process taking the accelerator: a TPU is held by one process at a time)."""
  child_env = {**os.environ, **(env or {})}
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=child_env, check=False
  )
  if out.returncode:
    raise RuntimeError(f"python -c {code!r} failed:\n{out.stderr[-3000:]}")
  print(out.stdout, end="")
  return out.stdout


def _redraw(workdir: str, title: str, lines: list[str]) -> None:
  import matplotlib.pyplot as plt
  from IPython.display import clear_output, display

  records = read_metrics(workdir)
  clear_output(wait=True)
  if records:
    ax = plot_metrics(records, title=f"{title}: {os.path.basename(workdir.rstrip('/'))}")
    display(ax.figure)
    plt.close(ax.figure)
  print("\n".join(lines[-3:]))
