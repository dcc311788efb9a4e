"""The train binary end to end: learning, exact resume after SIGKILL/SIGTERM, model directories."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO

from decoderjax.checkpoints import modeldir, orbax_layout
from decoderjax.data import data_config, pipeline
from decoderjax.runtime import hostmem
from decoderjax.training import experiment, loop

TINY = [
  "--config.model.num_layers=2",
  "--config.model.embed_dim=32",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=2",
  "--config.model.mlp_dim=64",
  "--config.model.max_seq_len=32",
  "--config.data.seq_len=32",
  "--config.train.batch_size=4",
  "--config.eval.max_batches=2",
  "--config.eval.batch_size=4",
]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  rng = np.random.default_rng(0)
  words = ["the", "king", "queen", "speaks", "and", "my", "lord", "good", "night", "sweet"]
  lines = [" ".join(rng.choice(words, 8)) + "." for _ in range(1500)]
  path = tmp_path_factory.mktemp("data") / "corpus.txt"
  path.write_text("\n".join(lines))
  return str(path)


def train_command(workdir, text_file, *extra):
  return [
    sys.executable,
    "-m",
    "decoderjax.train",
    f"--config={REPO}/configs/default.py",
    f"--workdir={workdir}",
    "--config.data.source=text",
    f"--config.data.path={text_file}",
    *TINY,
    *extra,
  ]


def run_train(workdir, text_file, *extra, wait=True):
  command = train_command(workdir, text_file, *extra)
  if not wait:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(command, capture_output=True, text=True, timeout=600)


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and max(losses(workdir), default=0) >= step:
      return
    time.sleep(0.05)
  raise AssertionError(f"training never reached step {step}: {proc.communicate()}")


def test_progress_bar_is_drawn_on_a_terminal(tmp_path, text_file):
  import pty

  leader, follower = pty.openpty()
  command = train_command(tmp_path / "w", text_file, "--config.train.steps=6",
                          "--config.train.log_every=3", "--config.eval.every_steps=0")  # fmt: skip
  proc = subprocess.Popen(command, stdout=follower, stderr=follower)
  os.close(follower)
  chunks = []
  while True:
    try:
      chunk = os.read(leader, 4096)
    except OSError:  # EIO: the child closed the terminal
      break
    if not chunk:
      break
    chunks.append(chunk)
  os.close(leader)
  assert proc.wait(timeout=300) == 0
  out = b"".join(chunks).decode()
  bars = [line for line in out.split("\r") if line.startswith("train [")]
  assert bars and "6/6 steps" in bars[-1] and "loss=" in bars[-1] and "ETA" in bars[-1], out
  assert "step=3" in out and "--- sample" in out  # log lines print above the bar


def test_interrupted_runs_resume_to_identical_losses(tmp_path, text_file):
  common = [
    "--config.train.steps=24",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=4",
    "--config.eval.every_steps=8",
    "--config.optimizer.warmup_steps=2",
    "--config.optimizer.learning_rate=1e-2",
  ]
  reference = run_train(tmp_path / "a", text_file, *common)
  assert reference.returncode == 0, reference.stderr
  assert "--- sample" in reference.stdout
  assert "\r" not in reference.stdout and "ETA" in reference.stdout  # plain lines in a pipe
  if hostmem._glibc() is not None:  # the binary set glibc's malloc up before JAX started
    assert "host memory: freed buffers kept for reuse" in reference.stdout
  expected = losses(tmp_path / "a")
  assert sorted(expected) == list(range(1, 25))
  assert expected[24] < expected[1] - 0.5  # it learns

  workdir = tmp_path / "b"
  proc = run_train(workdir, text_file, *common, wait=False)
  wait_for_step(workdir, 10, proc)
  proc.kill()  # SIGKILL, possibly in the middle of an async checkpoint write
  proc.wait()
  proc = run_train(workdir, text_file, *common, wait=False)
  wait_for_step(workdir, 14, proc)
  proc.send_signal(signal.SIGTERM)  # preemption: save and exit cleanly
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err
  assert "SIGTERM: saved step" in out
  finished = run_train(workdir, text_file, *common)
  assert finished.returncode == 0, finished.stderr
  assert "resumed from" in finished.stdout
  assert losses(workdir) == expected  # bit-identical, every step

  # The workdir is a model directory: its best checkpoint by validation loss is what loads.
  model = modeldir.load_model_dir(str(workdir))
  assert model.tokenizer.decode(model.tokenizer.encode("good night")) == "good night"
  with orbax_layout.manager(str(workdir), read_only=True) as mngr:
    assert mngr.best_step() in (8, 16, 24)
    assert mngr.latest_step() == 24


def test_mixture_run_resumes_after_sigkill_to_identical_losses(tmp_path, text_file):
  from test_data import prepared

  text = open(text_file).read()
  a = prepared(str(tmp_path / "a"), text[: len(text) // 2], tokenizer="char")
  b = prepared(str(tmp_path / "b"), text[len(text) // 2 :][::-1], tokenizer="char")
  common = [
    "--config.data.source=prepared",
    "--config.data.path=",
    f"--config.data.mixture={a}:0.8,{b}:0.2",
    "--config.train.steps=12",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=3",
    "--config.eval.every_steps=6",
  ]
  reference = run_train(tmp_path / "ref", text_file, *common)
  assert reference.returncode == 0, reference.stderr
  expected = losses(tmp_path / "ref")
  with open(tmp_path / "ref" / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  seen = (last["tokens_seen/a/prepared"], last["tokens_seen/b/prepared"])
  assert seen == (38 * 32, 10 * 32)  # 48 rows at shares 0.8 / 0.2, to the nearest row
  assert last["val_loss"] > 1.0
  proc = run_train(tmp_path / "w", text_file, *common, wait=False)
  wait_for_step(tmp_path / "w", 7, proc)
  proc.kill()
  proc.wait()
  finished = run_train(tmp_path / "w", text_file, *common)
  assert finished.returncode == 0, finished.stderr
  assert "resumed from" in finished.stdout and losses(tmp_path / "w") == expected


@pytest.mark.parametrize(
  "extra, message",
  [
    (["--config.data.path=/nonexistent/*.txt"], "no file matches"),
    (["--config.model.n_embd=3"], "n_embd"),
    (["--config.data.seq_len=64"], "data.seq_len=64 exceeds model.max_seq_len=32"),
    (["--config.optimizer.name=sgd"], "optimizer.name"),
  ],
)
def test_bad_input_is_one_line_error(tmp_path, text_file, extra, message):
  result = run_train(tmp_path / "w", text_file, "--config.train.steps=2", *extra)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_workdir_of_another_model_is_refused_and_untouched(tmp_path, text_file):
  first = run_train(tmp_path / "w", text_file, "--config.train.steps=2")
  assert first.returncode == 0, first.stderr
  before = sorted(os.listdir(tmp_path / "w" / "checkpoints"))
  second = run_train(
    tmp_path / "w", text_file, "--config.train.steps=2", "--config.model.num_layers=3"
  )
  assert second.returncode == 1
  assert "holds checkpoints of another model" in second.stderr
  assert "num_layers" in second.stderr
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == before
  # A run that stopped before its first save leaves metadata and no checkpoint: taken over.
  stale = tmp_path / "stale"
  (stale / "checkpoints").mkdir(parents=True)
  shutil.copy(tmp_path / "w" / "config.json", stale / "config.json")
  third = run_train(stale, text_file, "--config.train.steps=2", "--config.model.num_layers=3")
  assert third.returncode == 0, third.stderr
  assert json.loads((stale / "config.json").read_text())["model"]["num_layers"] == 3


def test_nonfinite_loss_stops_without_saving(tmp_path, text_file):
  result = run_train(
    tmp_path / "w",
    text_file,
    "--config.train.steps=6",
    "--config.optimizer.learning_rate=1e30",
    "--config.optimizer.clip_norm=0",
    "--config.optimizer.warmup_steps=4",
    "--config.checkpoint.every_steps=1",
  )
  # Warmup starts at learning rate 0: step 1 is sane, step 2 (lr 2.5e29) blows up.
  assert result.returncode == 1
  assert "non-finite loss" in result.stderr and "Traceback" not in result.stderr
  assert "last good checkpoint: step 1" in result.stderr
  restored = modeldir.load_model_dir(str(tmp_path / "w"))  # the last good step still loads
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_vocabulary_mismatch_is_refused(tmp_path, text_file):
  ds = pipeline.load_dataset(
    data_config.DataConfig(source="text", path=text_file, seq_len=16), str(tmp_path)
  )
  config = ml_collections.ConfigDict({"model": experiment.model_section("tiny-gpt2", vocab_size=8)})
  exp = experiment.experiment_from_config(config, ds.tokenizer.vocab_size)
  with pytest.raises(loop.TrainingError, match="exceeds model.vocab_size=8"):
    loop.train(exp, str(tmp_path / "w"), ds)
