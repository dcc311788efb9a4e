"""The training loop: a short loop over named pieces (steps, evaluation, samples, logging,
Orbax checkpoints, early stopping and preemption); the train state is built in state.py."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time

import jax
import numpy as np

from decoderjax.checkpoints import modeldir, orbax_layout
from decoderjax.data import examples, pipeline, tasks
from decoderjax.inference import offline as generator_lib
from decoderjax.inference.sampling import SamplingConfig
from decoderjax.model import adapters
from decoderjax.model.decoder import count_params
from decoderjax.runtime import sharding as sharding_lib
from decoderjax.runtime.errors import TrainingError
from decoderjax.training import metrics as metrics_lib
from decoderjax.training import state as state_lib
from decoderjax.training.experiment import Experiment
from decoderjax.training.preference import STATISTICS

DATA_FIELDS = ("text_field", "label_field", "prompt_field", "completion_field", "messages_field",
               "chosen_field", "rejected_field")  # fmt: skip


def check_workdir(workdir: str, exp: Experiment) -> None:
  """Refuses a workdir whose checkpoints belong to a different model. A workdir with a config
  but no checkpoint (a run that stopped before its first save) is taken over."""
  has_config = os.path.exists(os.path.join(workdir, modeldir.CONFIG_FILE))
  if has_config and modeldir.has_parameters(workdir):
    existing = modeldir.read_config(workdir)
    if existing != exp.model:
      changed = sorted(k for k, v in exp.model.to_dict().items() if existing.to_dict()[k] != v)
      raise TrainingError(
        f"workdir {workdir} holds checkpoints of another model (fields differ: {changed}); "
        "use a new --workdir"
      )


def check_run(exp: Experiment, workdir: str, dataset: pipeline.Dataset) -> None:
  """Refuses a run whose data does not fit its model, or whose workdir holds another model."""
  check_workdir(workdir, exp)
  if dataset.tokenizer.vocab_size > exp.model.vocab_size:
    raise TrainingError(
      f"tokenizer vocabulary ({dataset.tokenizer.vocab_size}) exceeds "
      f"model.vocab_size={exp.model.vocab_size}"
    )
  if exp.data.seq_len > exp.model.text_len:
    soft = f" plus {exp.model.prompt_tokens} soft-prompt tokens" if exp.model.prompt_tokens else ""
    raise TrainingError(
      f"data.seq_len={exp.data.seq_len}{soft} exceeds model.max_seq_len={exp.model.max_seq_len}"
    )
  if exp.train.batch_size % exp.loss.grad_accum_steps:
    raise TrainingError(
      f"train.batch_size={exp.train.batch_size} is not divisible by "
      f"loss.grad_accum_steps={exp.loss.grad_accum_steps}"
    )


def trained_length(exp: Experiment) -> int:
  """Positions the model has trained on: this run's rows, or for a fine-tune its base's."""
  if not exp.init_from:
    return exp.data.seq_len
  base = modeldir.read_metadata(exp.init_from)
  return max(exp.data.seq_len, base.get("trained_len") or base["model"].text_len)


def write_run_metadata(exp: Experiment, workdir: str, dataset: pipeline.Dataset) -> None:
  """Host 0 makes the workdir a model directory (config, tokenizer, generation defaults)."""
  # Every host has read the workdir's config (check_workdir) before host 0 rewrites it.
  sharding_lib.sync_hosts("decoderjax.check_workdir")
  if jax.process_index() == 0:
    extra = {
      "labels": dataset.label_names,
      "seq_len": exp.data.seq_len,  # what evaluate and predict cut rows to
      "trained_len": trained_length(exp),  # generation's default window
      "data_fields": {f: getattr(exp.data, f) for f in DATA_FIELDS} if dataset.task != "lm" else {},
    }
    if exp.data.task == "preference":  # what evaluate scores pairs with
      loss = exp.loss
      extra["preference"] = {
        "preference": loss.preference, "beta": loss.beta, "simpo_gamma": loss.simpo_gamma,
        "label_smoothing": loss.label_smoothing, "reference": os.path.abspath(exp.init_from),
      }  # fmt: skip
    if exp.init_from:  # the architecture its checkpoint came as, for convert --to=hf
      extra["hf_architecture"] = modeldir.read_metadata(exp.init_from).get("hf_architecture")
    if exp.finetune.method != "full":  # the workdir holds the adapters; the base stays put
      extra.update(base=os.path.abspath(exp.init_from), method=exp.finetune.method)
    generation = modeldir.read_generation(exp.init_from) if exp.init_from else None
    modeldir.write_metadata(workdir, exp.model, dataset.tokenizer, generation, extra)
  sharding_lib.sync_hosts("decoderjax.write_metadata")


CLASSIFY_METRICS = ("accuracy", "macro_f1", "examples")


def evaluate(eval_fn, params, frozen, dataset, exp: Experiment, mesh, reference=None) -> dict:
  """Validation loss (and a classifier's accuracy and macro-F1) over the validation split."""
  batch_size = exp.eval.batch_size or exp.train.batch_size
  sharding_lib.local_batch_rows(mesh, batch_size)  # divides over the devices, or an error

  def outputs():
    shards = sharding_lib.batch_shards(mesh)
    for batch in dataset.eval_batches(batch_size, exp.eval.max_batches, shards):
      rows = sharding_lib.local_batch_rows(mesh, len(batch["inputs"]))  # balanced: may be fewer
      global_batch = sharding_lib.global_batch(mesh, {k: v[rows] for k, v in batch.items()})
      out = eval_fn(params, global_batch, frozen, reference or {})
      if "predictions" in out:  # sharded over the batch: gathered onto every host
        out = {**out, "predictions": sharding_lib.fetch(out["predictions"])}
      yield out, batch

  totals = metrics_lib.eval_totals(outputs(), exp.model.num_labels)
  loss = totals["loss"]
  if exp.model.num_labels:
    result = {"val_loss": loss, **{f"val_{k}": totals[k] for k in CLASSIFY_METRICS}}
  elif exp.data.task == "preference":
    result = {"val_loss": loss, **{f"val_{k}": totals[k] for k in STATISTICS}}
  else:
    result = {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0)))}
  metric = result[exp.train.best_metric]
  result["objective"] = metric if exp.train.best_metric == "val_loss" else -metric
  return result


class _Sampler:
  """The run's text samples: train.sample_prompt (from EOS when the tokenizer cannot encode
  it) continued by train.sample_tokens at temperature 0.8, sliding over the trained rows. A
  seq2seq model's: the first validation source (`source`, ids), then what the model makes of
  it from the start token."""

  def __init__(self, exp: Experiment, tokenizer, source=None):
    self.sources = None if source is None else [source]
    try:
      self.prompt_text = exp.train.sample_prompt
      prompt = tokenizer.encode(self.prompt_text) if self.prompt_text else []
    except ValueError:  # e.g. a char alphabet without the prompt's characters: start from EOS
      self.prompt_text, prompt = "", []
    if source is not None:
      self.prompt_text = f"{tokenizer.decode(source)} -> {self.prompt_text}"
      prompt = [examples.start_id(tokenizer), *prompt]
    self.prompt = prompt or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    config = generator_lib.GenerateConfig(
      max_new_tokens=exp.train.sample_tokens,
      sampling=SamplingConfig(temperature=0.8),
      stop_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
      window=min(trained_length(exp), exp.model.text_len),
    )
    model = modeldir.ModelDir(exp.model, None, tokenizer, {})
    self.generator = generator_lib.Generator(model, config)  # compiles on the first sample

  def __call__(self, params, seed: int) -> str:
    self.generator.model.params = params
    results, _ = self.generator([self.prompt], rng=jax.random.key(seed), sources=self.sources)
    return self.prompt_text + results[0]["text"]


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


class _Clock:
  """Training throughput between log lines, leaving out evaluation, samples and saves."""

  def __init__(self):
    self.t, self.paused, self.tokens = time.perf_counter(), 0.0, 0

  def count(self, batch) -> None:
    """Adds a step's token slots (bucketed task batches vary in length)."""
    self.tokens += math.prod(batch["inputs"].shape)

  def tokens_per_sec(self) -> float:
    """Token slots per second since the last call, pauses left out."""
    now = time.perf_counter()
    rate = self.tokens / max(now - self.t - self.paused, 1e-9)
    self.t, self.paused, self.tokens = now, 0.0, 0
    return rate

  @contextlib.contextmanager
  def pause(self):
    start = time.perf_counter()
    try:
      yield
    finally:
      self.paused += time.perf_counter() - start


class _Best:
  """The best evaluation so far, and how many evaluations since have not beaten it."""

  def __init__(self, patience: int):
    self.result, self.stale, self.patience = {"objective": float("inf")}, 0, patience

  def update(self, result: dict) -> None:
    if result["objective"] < self.result["objective"]:
      self.result, self.stale = result, 0
    else:
      self.stale += 1

  @property
  def exhausted(self) -> bool:
    return bool(self.patience) and self.stale >= self.patience


def _without(values: dict, key: str) -> dict:
  return {k: v for k, v in values.items() if k != key}


class _Run:
  """One training run's pieces: jitted steps, batches, checkpoints, log and preemption flag."""

  def __init__(self, exp: Experiment, workdir: str, dataset: pipeline.Dataset, mesh):
    self.exp, self.workdir, self.dataset, self.mesh = exp, workdir, dataset, mesh
    optimizer = state_lib.experiment_optimizer(exp)
    self.layout = state_lib.state_shardings(exp, optimizer, mesh)
    self.step_fn = state_lib.jit_train_step(exp, optimizer, self.layout, mesh)
    self.eval_fn = state_lib.jit_eval_step(exp, self.layout, mesh)
    rows = sharding_lib.local_batch_rows(mesh, exp.train.batch_size)
    shards = sharding_lib.batch_shards(mesh)  # task batches pack each shard's examples
    self.batches = dataset.train_batches(exp.train.batch_size, exp.data.seed, rows, shards)
    self.mngr = orbax_layout.manager(workdir, exp.checkpoint.keep, exp.checkpoint.keep_best)
    self.state, self.frozen = self._restore_or_init(optimizer)
    self.reference = state_lib.reference_params(exp, self.layout, mesh)
    self._describe()
    self.logger = metrics_lib.Logger(workdir, exp.train.steps, int(self.state.step))
    self.samples = not exp.model.num_labels and exp.train.sample_tokens > 0  # (a classifier: none)
    source = tasks.first_source(dataset) if exp.model.cross_attention else None
    self.sampler = _Sampler(exp, dataset.tokenizer, source) if self.samples else None
    self.preemption = _Preemption()

  def _restore_or_init(self, optimizer):
    """(state, frozen params): the latest checkpoint, read straight into the target shardings
    (no initialization, any earlier mesh), else step 0."""
    step = self.mngr.latest_step()
    if step is None:
      return state_lib.init_state(self.exp, optimizer, self.mesh)
    frozen = state_lib.frozen_params(self.exp, self.layout, self.mesh)
    state = orbax_layout.restore(self.mngr, step, self.layout["state_abstract"])
    print(f"resumed from {self.workdir} at step {int(state.step)}", flush=True)
    return state, frozen

  def _describe(self) -> None:
    exp, method = self.exp, self.exp.finetune.method
    n_trainable = count_params(self.state.params)
    n_params = n_trainable + count_params(self.frozen)
    self.flops_per_token = metrics_lib.flops_per_token(
      exp.model, exp.data.seq_len, method == "full"
    )
    self.peak = exp.train.peak_flops or metrics_lib.peak_flops(exp.model.dtype)
    trains = "" if n_trainable == n_params else f" ({n_trainable:,} trainable, {method})"
    print(
      f"model: {n_params:,} parameters{trains}, {self.flops_per_token / 1e6:.2f} MFLOPs/token "
      f"(train); data: {self.dataset.describe()}",
      flush=True,
    )

  def batch(self, step: int):
    return sharding_lib.global_batch(self.mesh, self.batches.batch(step))

  def evaluate(self) -> dict:
    exp, state = self.exp, self.state
    return evaluate(
      self.eval_fn, state.params, self.frozen, self.dataset, exp, self.mesh, self.reference
    )

  def save(self, step: int, metrics: dict | None = None) -> None:
    if self.mngr.latest_step() == step:  # already saved this step (e.g. SIGTERM right after one)
      return
    orbax_layout.save(self.mngr, step, self.state, metrics)
    if not self.exp.checkpoint.async_save:
      self.mngr.wait_until_finished()

  def checked_loss(self, m: dict, step: int) -> float:
    """The step's loss, having waited for the step: it is checked before any save, and one
    step stays in flight (XLA's in-process CPU collectives can deadlock a step ahead)."""
    loss = float(m["loss"])
    finite = np.isfinite(loss) and np.isfinite(float(m["param_norm"]))
    if not finite and self.exp.train.on_nonfinite == "stop":
      raise TrainingError(
        f"non-finite loss ({loss}) or parameters at step {step}; stopped without saving "
        f"(last good checkpoint: step {self.mngr.latest_step()})"
      )
    return loss

  def record(self, step: int, m: dict, loss: float, clock: _Clock) -> dict | None:
    """The log line of `step`, on logging steps."""
    if step % self.exp.train.log_every and step != self.exp.train.steps:
      return None
    tokens_per_sec = clock.tokens_per_sec()
    return {
      "step": step,
      "loss": loss,
      "learning_rate": float(m["learning_rate"]),
      "grad_norm": float(m["grad_norm"]),
      "tokens_per_sec": tokens_per_sec,
      "mfu": self.flops_per_token * tokens_per_sec / (self.peak * jax.device_count()),
      **self.batches.tokens_seen(step),  # a mixture's tokens per source
      **{k: float(m[k]) for k in STATISTICS if k in m},  # a preference batch's, per pair
    }

  def sample(self, step: int, seed: int) -> str:
    params = adapters.combine(self.state.params, self.frozen)
    text = self.sampler(params, seed)
    self.logger.sample(step, text)
    return text

  def restore_best(self, best: _Best) -> None:
    self.mngr.wait_until_finished()
    abstract = self.layout["state_abstract"].params
    params = orbax_layout.restore_params(self.mngr, best.result["step"], abstract)
    self.state = self.state.replace(params=params)

  def close(self) -> None:
    self.preemption.restore()
    self.mngr.wait_until_finished()
    self.mngr.close()
    self.logger.close()
    sys.stdout.flush()


def train(exp: Experiment, workdir: str, dataset: pipeline.Dataset) -> dict:
  """Trains (resuming from the workdir's latest checkpoint); returns the final metrics."""
  mesh = sharding_lib.make_mesh(exp.mesh)
  with sharding_lib.activate(mesh, exp.mesh.rules):
    check_run(exp, workdir, dataset)
    write_run_metadata(exp, workdir, dataset)
    run = _Run(exp, workdir, dataset, mesh)
    try:
      return _loop(run)
    finally:
      run.close()


def _loop(run: _Run) -> dict:
  exp, steps = run.exp, run.exp.train.steps
  start = int(run.state.step)
  clock, best = _Clock(), _Best(exp.train.early_stopping_patience)
  last, done, stopped_early = {}, start, False
  if exp.eval.at_start and start == 0:  # the starting point competes for the best too
    best.result = {"step": 0, **run.evaluate()}
    run.logger.log(0, _without(best.result, "objective"))
    run.save(0, _without(best.result, "step"))
  next_batch = run.batch(start)
  for step in range(start, steps):
    run.state, m = run.step_fn(run.state, next_batch, run.frozen, run.reference)  # async
    clock.count(next_batch)
    done = step + 1
    if done < steps:  # prefetch: the next batch is built and sent meanwhile
      next_batch = run.batch(done)
    loss = run.checked_loss(m, done)
    record = run.record(done, m, loss, clock)
    with clock.pause():
      evaluated = bool(exp.eval.every_steps and done % exp.eval.every_steps == 0) or done == steps
      if evaluated:
        last = {"step": done, **run.evaluate()}
        record = {**(record or {"step": done, "loss": loss}), **_without(last, "objective")}
        best.update(last)
        stopped_early = best.exhausted and done < steps
      run.logger.log(done, record, loss)
      if run.samples and exp.train.sample_every and done % exp.train.sample_every == 0:
        run.sample(done, done)
      every = exp.checkpoint.every_steps
      if done == steps or stopped_early or (every and done % every == 0):
        run.save(done, _without(last, "step") if evaluated else None)
    if stopped_early:
      run.logger.print(
        f"early stopping at step {done}: no better {exp.train.best_metric} in "
        f"{best.patience} evaluations; restoring the best, step {best.result['step']}"
      )
      break
    if run.preemption.requested:
      run.save(done, None)
      run.mngr.wait_until_finished()
      run.logger.print(f"SIGTERM: saved step {done} to {run.workdir}; exiting")
      return {"step": done, "preempted": True}
  final = {"step": int(run.state.step), **_without(last, "objective")}
  if stopped_early:
    run.restore_best(best)
    final = {**_without(best.result, "objective"), "stopped_at": done}
  if steps > 0 and run.samples:
    text = run.sample(int(run.state.step), exp.train.seed)
    run.logger.print(f"--- sample (step {int(run.state.step)}) ---\n{text}\n---")
  return final
