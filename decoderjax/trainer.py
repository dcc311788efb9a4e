"""The training loop: data, jit-compiled steps, evaluation, samples, logging, Orbax checkpoints."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from decoderjax import data as data_lib
from decoderjax import metrics as metrics_lib
from decoderjax import modeldir
from decoderjax import sharding as sharding_lib
from decoderjax.experiment import Experiment
from decoderjax.model import Decoder, count_params
from decoderjax.optimizer import make_optimizer, make_schedule
from decoderjax.sampling import SamplingConfig, generate_tokens, new_tokens
from decoderjax.steps import TrainState, eval_step, train_step


class TrainingError(Exception):
  """A problem the user must fix; the binary prints it as one line."""


def check_workdir(workdir: str, exp: Experiment) -> None:
  """Refuses a workdir whose checkpoints belong to a different model."""
  if os.path.exists(os.path.join(workdir, modeldir.CONFIG_FILE)):
    existing = modeldir.read_config(workdir)
    if existing != exp.model:
      changed = sorted(k for k, v in exp.model.to_dict().items() if existing.to_dict()[k] != v)
      raise TrainingError(
        f"workdir {workdir} holds checkpoints of another model (fields differ: {changed}); "
        "use a new --workdir"
      )


def state_shardings(exp: Experiment, optimizer, mesh):
  """Shardings of the train state, derived from the parameters' logical axes (no memory)."""

  def boxed_init(rng):
    params = Decoder(exp.model).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),  # optimizer moments inherit the parameters' axes
      rng=jax.random.key_data(jax.random.key(exp.train.seed + 1)),
    )

  boxed = jax.eval_shape(boxed_init, jax.random.key(exp.train.seed))
  shardings, abstract = sharding_lib.abstract_sharded(boxed, mesh, exp.mesh.rules)
  return boxed_init, shardings, abstract


def _initialize(boxed_init, shardings, seed: int) -> TrainState:
  """Runs the initializer with its outputs placed by `shardings` (never whole on one device)."""
  init = jax.jit(lambda rng: nn.unbox(boxed_init(rng)), out_shardings=shardings)
  return init(jax.random.key(seed))


def init_state(exp: Experiment, optimizer, mesh) -> TrainState:
  """The initial train state, created directly sharded."""
  boxed_init, shardings, _ = state_shardings(exp, optimizer, mesh)
  return _initialize(boxed_init, shardings, exp.train.seed)


def evaluate(eval_fn, params, tokens, exp: Experiment, eos_id, mesh) -> dict:
  loss_sum, weight_sum = 0.0, 0.0
  batch_size = exp.eval.batch_size or exp.train.batch_size
  rows = sharding_lib.local_batch_rows(mesh, batch_size)
  for batch in data_lib.eval_batches(
    tokens, exp.data.seq_len, batch_size, eos_id, exp.eval.max_batches
  ):
    local = {k: v[rows] for k, v in batch.items()}
    batch_loss, batch_weight = eval_fn(params, sharding_lib.global_batch(mesh, local))
    loss_sum, weight_sum = loss_sum + float(batch_loss), weight_sum + float(batch_weight)
  loss = loss_sum / max(weight_sum, 1.0)
  return {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0)))}


def sample_text(params, exp: Experiment, tokenizer, rng_seed: int) -> str:
  try:
    prompt_text = exp.train.sample_prompt
    prompt = tokenizer.encode(prompt_text) if prompt_text else []
  except ValueError:  # e.g. a char alphabet without the prompt's characters: start from EOS
    prompt_text, prompt = "", []
  start = prompt or [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
  new = min(exp.train.sample_tokens, exp.model.max_seq_len - len(start))
  stop_ids = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  tokens, lengths = generate_tokens(
    params,
    exp.model,
    np.asarray([start], np.int32),
    np.ones((1, len(start)), np.int32),
    jax.random.key(rng_seed),
    new,
    SamplingConfig(temperature=0.8),
    stop_ids,
  )
  return prompt_text + tokenizer.decode(new_tokens(tokens[0], int(lengths[0]), stop_ids))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train(exp: Experiment, workdir: str, dataset: data_lib.Dataset) -> dict:
  """Trains (resuming from the workdir's latest checkpoint); returns the final metrics."""
  mesh = sharding_lib.make_mesh(exp.mesh)
  with sharding_lib.activate(mesh, exp.mesh.rules):
    return _train(exp, workdir, dataset, mesh)


def _train(exp: Experiment, workdir: str, dataset: data_lib.Dataset, mesh) -> dict:
  check_workdir(workdir, exp)
  if dataset.tokenizer.vocab_size > exp.model.vocab_size:
    raise TrainingError(
      f"tokenizer vocabulary ({dataset.tokenizer.vocab_size}) exceeds "
      f"model.vocab_size={exp.model.vocab_size}"
    )
  if exp.data.seq_len > exp.model.max_seq_len:
    raise TrainingError(
      f"data.seq_len={exp.data.seq_len} exceeds model.max_seq_len={exp.model.max_seq_len}"
    )
  if exp.train.batch_size % exp.loss.grad_accum_steps:
    raise TrainingError(
      f"train.batch_size={exp.train.batch_size} is not divisible by "
      f"loss.grad_accum_steps={exp.loss.grad_accum_steps}"
    )
  # Every host has read the workdir's config (check_workdir) before host 0 rewrites it.
  sharding_lib.sync_hosts("decoderjax.check_workdir")
  if jax.process_index() == 0:
    modeldir.write_metadata(workdir, exp.model, dataset.tokenizer)
  sharding_lib.sync_hosts("decoderjax.write_metadata")
  tokenizer, eos_id = dataset.tokenizer, dataset.tokenizer.eos_id
  optimizer = make_optimizer(exp.optimizer, exp.train.steps)
  schedule = make_schedule(exp.optimizer, exp.train.steps)
  boxed_init, shardings, abstract = state_shardings(exp, optimizer, mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  step_fn = jax.jit(
    functools.partial(
      train_step, cfg=exp.model, optimizer=optimizer, loss_cfg=exp.loss, schedule=schedule
    ),
    in_shardings=(shardings, batch_sharding),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    functools.partial(eval_step, cfg=exp.model, loss_cfg=exp.loss),
    in_shardings=(shardings.params, batch_sharding),
  )
  rows = sharding_lib.local_batch_rows(mesh, exp.train.batch_size)
  batches = data_lib.Batches(
    dataset.train_tokens, exp.data.seq_len, exp.train.batch_size, exp.data.seed, eos_id, rows
  )

  mngr = modeldir.checkpoint_manager(workdir, exp.checkpoint.keep, exp.checkpoint.keep_best)
  if mngr.latest_step() is None:
    state = _initialize(boxed_init, shardings, exp.train.seed)
  else:  # restored straight into the target shardings: no initialization, any earlier mesh
    restored = mngr.restore(
      mngr.latest_step(),
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract.params),
        train_state=ocp.args.StandardRestore(
          {"step": abstract.step, "opt_state": abstract.opt_state, "rng": abstract.rng}
        ),
      ),
    )
    ts = restored["train_state"]
    state = TrainState(ts["step"], restored["params"], ts["opt_state"], ts["rng"])
    print(f"resumed from {workdir} at step {int(state.step)}", flush=True)

  n_params = count_params(state.params)
  flops_per_token = metrics_lib.flops_per_token(exp.model, exp.data.seq_len)
  peak = exp.train.peak_flops or metrics_lib.peak_flops(exp.model.dtype)
  print(
    f"model: {n_params:,} parameters, {flops_per_token / 1e6:.2f} MFLOPs/token (train); "
    f"data: {len(dataset.train_tokens):,} train / {len(dataset.val_tokens):,} val tokens",
    flush=True,
  )
  logger = metrics_lib.Logger(
    workdir,
    exp.train.steps,
    start_step=int(state.step),
    tokens_per_step=exp.train.batch_size * exp.data.seq_len,
  )
  preemption = _Preemption()

  def save(step, metrics=None):
    if mngr.latest_step() == step:  # already saved this step (e.g. SIGTERM right after a save)
      return
    mngr.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train_state=ocp.args.StandardSave(
          {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        ),
      ),
      metrics=metrics,
      force=True,
    )
    if not exp.checkpoint.async_save:
      mngr.wait_until_finished()

  last = {}
  start_step = int(state.step)
  step_tokens = exp.train.batch_size * exp.data.seq_len
  t_last, step_last = time.perf_counter(), start_step
  try:
    next_batch = sharding_lib.global_batch(mesh, batches.batch(start_step))
    for step in range(start_step, exp.train.steps):
      state, m = step_fn(state, next_batch)  # dispatched asynchronously
      done = step + 1
      if done < exp.train.steps:  # prefetch: the next batch is built and sent meanwhile
        next_batch = sharding_lib.global_batch(mesh, batches.batch(done))
      # Waits for the step: checks every step before any save, and keeps one step in flight
      # (XLA's in-process CPU collectives can deadlock when a device runs a step ahead).
      loss = float(m["loss"])
      finite = np.isfinite(loss) and np.isfinite(float(m["param_norm"]))
      if not finite and exp.train.on_nonfinite == "stop":
        kept = mngr.latest_step()
        raise TrainingError(
          f"non-finite loss ({loss}) or parameters at step {done}; stopped without saving "
          f"(last good checkpoint: step {kept})"
        )
      record = None
      if done % exp.train.log_every == 0 or done == exp.train.steps:
        now = time.perf_counter()
        tokens_per_sec = step_tokens * (done - step_last) / (now - t_last)
        t_last, step_last = now, done
        record = {
          "step": done,
          "loss": loss,
          "learning_rate": float(m["learning_rate"]),
          "grad_norm": float(m["grad_norm"]),
          "tokens_per_sec": tokens_per_sec,
          "mfu": flops_per_token * tokens_per_sec / (peak * jax.device_count()),
        }
      eval_now = exp.eval.every_steps and done % exp.eval.every_steps == 0
      if eval_now or done == exp.train.steps:
        last = evaluate(eval_fn, state.params, dataset.val_tokens, exp, eos_id, mesh)
        record = {**(record or {"step": done, "loss": loss}), **last}
      logger.log(done, record)
      if exp.train.sample_every and done % exp.train.sample_every == 0:
        logger.sample(done, sample_text(state.params, exp, tokenizer, done))
      if done == exp.train.steps or (
        exp.checkpoint.every_steps and done % exp.checkpoint.every_steps == 0
      ):
        save(done, last if eval_now or done == exp.train.steps else None)
      if preemption.requested:
        save(done, None)
        mngr.wait_until_finished()
        print(f"SIGTERM: saved step {done} to {workdir}; exiting", flush=True)
        return {"step": done, "preempted": True}
    final = {"step": int(state.step), **last}
    if exp.train.steps > 0:
      text = sample_text(state.params, exp, tokenizer, exp.train.seed)
      logger.sample(int(state.step), text)
      print(f"--- sample (step {int(state.step)}) ---\n{text}\n---", flush=True)
    return final
  finally:
    preemption.restore()
    mngr.wait_until_finished()
    mngr.close()
    logger.close()
    sys.stdout.flush()


def write_json(path: str, values: dict) -> None:
  with open(path, "w") as f:
    json.dump(values, f, indent=2)
