"""Fine-tuning end to end through the binaries a user types: a small pretrained model, then
LoRA / prompt tuning / full fine-tuning on real tasks built from the Shakespeare corpus."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import shakespeare_tasks  # noqa: E402

from decoderjax.checkpoints import modeldir, orbax_layout
from decoderjax.model import adapters, sparsity
from decoderjax.training.steps import forward  # noqa: E402

PLAYS = ("hamlet", "macbeth")


def run(module, *args, timeout=600):
  result = subprocess.run(
    [sys.executable, "-m", f"decoderjax.{module}", *args],
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  return result


def train(workdir, config, base, *extra):
  result = run(
    "train",
    f"--config={REPO}/configs/{config}.py",
    f"--workdir={workdir}",
    f"--config.init_from={base}",
    "--config.data.seq_len=48",
    "--config.train.batch_size=8",
    "--config.eval.batch_size=16",
    *extra,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def finetune(workdir, config, base, task_files, task, *extra, drop=0.02):
  """Trains `config` from `base` on `task` ("cls" or "sft": their train and validation files;
  "text": the plays), checks that the validation loss fell by more than `drop` (None: no
  check), and returns (the evaluations, the run)."""
  if task == "text":
    data = [f"--config.data.path={task_files['text']}"]
  else:
    data = [
      f"--config.data.path={task_files[task + '_train']}",
      f"--config.data.eval_path={task_files[task + '_val']}",
    ]
  result = train(workdir, config, base, *data, *extra)
  evals = [r for r in metrics(workdir) if "val_loss" in r]
  if drop is not None:
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - drop, evals
  return evals, result


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("tasks")
  train, val = shakespeare_tasks.classification(PLAYS, 120, speaker=True)
  sft_train, sft_val = shakespeare_tasks.instructions(PLAYS, 150)
  files = {}
  for name, records in (
    ("cls_train", train),
    ("cls_val", val[:48]),
    ("sft_train", sft_train),
    ("sft_val", sft_val[:32]),
  ):
    files[name] = str(root / f"{name}.jsonl")
    shakespeare_tasks.write_jsonl(files[name], records)
  text = root / "plays.txt"
  text.write_text(
    "\n\n".join("\n".join([w, *s]) for p in PLAYS for w, s in shakespeare_tasks.speeches(p))
  )
  files["text"] = str(text)
  return files


@pytest.fixture(scope="module")
def base(tmp_path_factory, task_files):
  """A small char-level Llama-style model pretrained briefly (about 15 s) on the two plays."""
  workdir = tmp_path_factory.mktemp("base") / "m"
  result = run(
    "train",
    f"--config={REPO}/configs/default.py",
    f"--workdir={workdir}",
    "--config.data.source=text",
    f"--config.data.path={task_files['text']}",
    "--config.data.seq_len=64",
    "--config.model.max_seq_len=96",
    "--config.model.num_layers=2",
    "--config.train.steps=150",
    "--config.train.batch_size=8",
    "--config.train.sample_tokens=8",
    "--config.eval.every_steps=0",
    "--config.eval.max_batches=2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return str(workdir)


def param_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def disk_bytes(path) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def assert_base_untouched(workdir, base, method):
  """Every base parameter of the fine-tuned model is bit-identical to the base model's."""
  tuned = modeldir.load_model_dir(workdir, merge_lora=False)
  trainable, frozen = adapters.split_trainable(tuned.params, method)
  base_params = modeldir.load_model_dir(base).params
  shared, _ = adapters.partition_like(base_params, frozen)
  assert jax.tree.structure(shared) == jax.tree.structure(frozen)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(frozen), strict=True):
    np.testing.assert_array_equal(a, b)
  return tuned, trainable


def test_lora_classification_end_to_end(tmp_path, base, task_files):
  workdir = str(tmp_path / "lora")
  log, _ = finetune(
    workdir, "finetune_classify_lora", base, task_files, "cls",
    "--config.train.steps=30", "--config.eval.every_steps=15",
    "--config.checkpoint.every_steps=15", drop=0.05,
  )  # fmt: skip
  assert log[0]["step"] == 0 and log[-1]["step"] == 30
  assert log[-1]["val_accuracy"] > 0.6

  # Only adapters (and the new head) trained; they are saved on their own, and small.
  tuned, trainable = assert_base_untouched(workdir, base, "lora")
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  assert names and all("_lora_" in n or "cls_head" in n for n in names)
  assert any(np.abs(x).max() > 0 for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]
             if "lora_b" in jax.tree_util.keystr(p))  # fmt: skip
  base_size = param_bytes(modeldir.load_model_dir(base).params)
  best = orbax_layout.manager(workdir, read_only=True).best_step()
  adapter_dir = os.path.join(workdir, "checkpoints", str(best), "params")
  assert disk_bytes(adapter_dir) < 0.05 * base_size, (disk_bytes(adapter_dir), base_size)
  assert tuned.labels == list(PLAYS)

  # evaluate and predict agree with training's own validation numbers.
  out = tmp_path / "eval.json"
  result = run(
    "evaluate", f"--checkpoint={workdir}", f"--data_path={task_files['cls_val']}",
    f"--output_json={out}",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  scores = json.loads(out.read_text())
  at_best = next(r for r in log if r["step"] == best)
  assert scores["examples"] == 48
  assert scores["accuracy"] == pytest.approx(at_best["val_accuracy"])
  assert scores["macro_f1"] == pytest.approx(at_best["val_macro_f1"])
  preds = tmp_path / "pred.json"
  result = run(
    "predict", f"--checkpoint={workdir}", f"--input_file={task_files['cls_val']}",
    f"--output_json={preds}",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  labels = [json.loads(line)["label"] for line in open(task_files["cls_val"])]
  predicted = [p["label"] for p in json.loads(preds.read_text())]
  assert np.mean(np.equal(predicted, labels)) == pytest.approx(scores["accuracy"])

  # Merging for export: a plain model whose logits equal the adapted model's.
  merged_dir = str(tmp_path / "merged")
  result = run("convert", "--to=decoderjax", f"--input={workdir}", f"--output={merged_dir}")
  assert result.returncode == 0, result.stderr
  merged = modeldir.load_model_dir(merged_dir)
  assert merged.config.lora_rank == 0 and merged.labels == list(PLAYS)
  batch = {
    "inputs": np.arange(1, 25, dtype=np.int32)[None] % tuned.config.vocab_size,
    "positions": np.arange(24, dtype=np.int32)[None],
    "segment_ids": np.ones((1, 24), np.int32),
  }
  adapted_logits = forward(tuned.params, tuned.config, batch, None, True)
  merged_logits = forward(merged.params, merged.config, batch, None, True)
  np.testing.assert_allclose(merged_logits, adapted_logits, atol=1e-4)


def test_prompt_tuning_with_pgd_lowers_validation_loss(tmp_path, base, task_files):
  workdir = str(tmp_path / "prompt")
  finetune(
    workdir, "finetune_classify_prompt", base, task_files, "cls",
    "--config.train.steps=30", "--config.eval.every_steps=30",
    "--config.finetune.prompt_tokens=8", "--config.loss.adversarial=pgd",
    "--config.loss.adv_steps=2", "--config.loss.adv_epsilon=0.5",
  )  # fmt: skip
  _, trainable = assert_base_untouched(workdir, base, "prompt")
  assert sorted(trainable) == ["cls_head", "cls_head_bias", "soft_prompt"]
  assert trainable["soft_prompt"].shape == (8, 128)


def test_sft_lora_and_generation(tmp_path, base, task_files):
  workdir = str(tmp_path / "sft")
  log, _ = finetune(
    workdir, "finetune_sft_lora", base, task_files, "sft",
    "--config.data.seq_len=96", "--config.train.steps=40", "--config.eval.every_steps=40",
    "--config.train.sample_tokens=8", "--config.optimizer.learning_rate=3e-3",
    "--config.data.token_dropout=0.05", "--config.data.span_mask=0.02",
  )  # fmt: skip
  assert_base_untouched(workdir, base, "lora")
  # Generation's default window: the base trained on 64 positions, the fine-tune on 96.
  assert modeldir.read_metadata(base)["trained_len"] == 64
  assert modeldir.read_metadata(workdir)["trained_len"] == 96
  # The completion loss that evaluate reports is the one training validated on.
  out = tmp_path / "eval.json"
  result = run(
    "evaluate", f"--checkpoint={workdir}", f"--data_path={task_files['sft_val']}",
    f"--output_json={out}",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert json.loads(out.read_text())["loss"] == pytest.approx(log[-1]["val_loss"], rel=1e-4)
  result = run("generate", f"--checkpoint={workdir}", "--prompt=Ham.\n", "--max_new_tokens=8")
  assert result.returncode == 0, result.stderr
  # Trained further from its adapters (init_from the adapter directory): step 0 is where the
  # first run ended.
  more, _ = finetune(
    str(tmp_path / "more"), "finetune_sft_lora", workdir, task_files, "sft",
    "--config.data.seq_len=96", "--config.train.steps=2", "--config.eval.every_steps=2",
    "--config.train.sample_tokens=0", drop=None,
  )  # fmt: skip
  assert more[0]["step"] == 0 and more[0]["val_loss"] == pytest.approx(log[-1]["val_loss"], 1e-6)


def test_full_classification_with_fgm_lowers_validation_loss(tmp_path, base, task_files):
  workdir = str(tmp_path / "full_cls")
  finetune(
    workdir, "finetune_classify_full", base, task_files, "cls",
    "--config.train.steps=20", "--config.eval.every_steps=10",
  )  # fmt: skip


def test_full_finetuning_stops_early_and_restores_the_best(tmp_path, base, task_files):
  """A far too high learning rate: no step beats the starting point (evaluated and saved at
  step 0), so training stops after `patience` evaluations and the base parameters return."""
  workdir = str(tmp_path / "full")
  evals, result = finetune(
    workdir,
    "finetune_lm_full",
    base,
    task_files,
    "text",
    "--config.train.steps=40",
    "--config.eval.every_steps=2",
    "--config.eval.max_batches=2",
    "--config.checkpoint.every_steps=2",
    "--config.train.early_stopping_patience=2",
    "--config.optimizer.learning_rate=0.05",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.schedule=constant",
    "--config.finetune.freeze_layers=1",
    drop=None,
  )  # evals: step 0 (the base) included
  best = min(evals, key=lambda r: r["val_loss"])
  stopped = evals[-1]["step"]
  assert stopped < 40 and f"early stopping at step {stopped}" in result.stdout
  assert all(r["val_loss"] >= best["val_loss"] for r in evals if r["step"] > best["step"])
  assert len([r for r in evals if r["step"] > best["step"]]) == 2  # patience
  # The workdir serves the best step's parameters; the frozen first layer never moved.
  served = modeldir.load_params(workdir, modeldir.read_config(workdir))
  at_best = modeldir.load_params(workdir, modeldir.read_config(workdir), step=best["step"])
  for a, b in zip(jax.tree.leaves(served), jax.tree.leaves(at_best), strict=True):
    np.testing.assert_array_equal(a, b)
  base_params = modeldir.load_model_dir(base).params
  for a, b in zip(
    jax.tree.leaves(base_params["layers_0"]), jax.tree.leaves(served["layers_0"]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
  "config,extra,message",
  [
    ("finetune_classify_lora", ["--config.finetune.lora_targets=q,query"], "match no module"),
    ("finetune_classify_lora", ["--config.data.labels=hamlet,lear"], "is not one of"),
    ("finetune_sft_lora", ["--config.data.path={chat}"], "need a chat template"),
    ("finetune_sft_lora", ["--config.data.path={empty}"], "empty completion"),
    ("finetune_lm_full", ["--config.init_from={not_a_model}"], "not a decoderjax model"),
  ],
)
def test_bad_input_is_one_line_error(tmp_path, base, task_files, config, extra, message):
  chat = tmp_path / "chat.jsonl"
  chat.write_text((json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n") * 2)
  empty = tmp_path / "empty.jsonl"
  empty.write_text((json.dumps({"prompt": "Ham.\n", "completion": ""}) + "\n") * 2)
  paths = {"chat": chat, "empty": empty, "not_a_model": tmp_path}
  extra = [e.format(**paths) for e in extra]
  defaults = [f"--config.data.path={task_files['cls_train']}"]
  if config == "finetune_lm_full":
    defaults = [f"--config.data.path={task_files['text']}"]
  result = run(
    "train",
    f"--config={REPO}/configs/{config}.py",
    f"--workdir={tmp_path / 'w'}",
    f"--config.init_from={base}",
    *defaults,
    *extra,
  )
  assert result.returncode == 1
  [line] = result.stderr.strip().splitlines()
  assert line.startswith("error:") and message in line, line


def test_pruning_then_recovery_keeps_the_zeros(tmp_path, base, task_files):
  """2:4 pruning of the base, then a short full fine-tune: the zeros stay exactly where they
  were, the other weights move, and the validation loss of the pruned model goes down."""
  pruned = str(tmp_path / "pruned")
  out = run("prune", f"--checkpoint={base}", f"--output={pruned}", "--pattern=2:4")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "(50.0%)" in out.stdout
  before = modeldir.load_model_dir(pruned)
  assert before.config.pruning == "2:4"
  workdir = str(tmp_path / "recovered")
  finetune(
    workdir,
    "finetune_lm_full",
    pruned,
    task_files,
    "text",
    "--config.train.steps=30",
    "--config.eval.every_steps=30",
    "--config.eval.max_batches=4",
    "--config.optimizer.learning_rate=1e-3",
    "--config.optimizer.schedule=constant",
    "--config.optimizer.warmup_steps=0",
  )
  after = modeldir.load_model_dir(workdir)
  moved = 0
  for path, a in jax.tree_util.tree_leaves_with_path(before.params):
    b = after.params
    for key in path:
      b = b[key.key]
    if path[-1].key in sparsity.PRUNED:
      np.testing.assert_array_equal(np.asarray(b) == 0, np.asarray(a) == 0)
      moved += int(np.sum(np.asarray(a) != np.asarray(b)))
  assert moved > 0
  lora = run(
    "train",
    f"--config={REPO}/configs/finetune_sft_lora.py",
    f"--workdir={tmp_path / 'l'}",
    f"--config.init_from={pruned}",
    f"--config.data.path={task_files['sft_train']}",
  )
  assert lora.returncode == 1 and "merged LoRA adapters would fill its zeros" in lora.stderr
