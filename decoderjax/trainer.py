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
import optax
import orbax.checkpoint as ocp

from decoderjax import adapters, modeldir, pruning
from decoderjax import data as data_lib
from decoderjax import metrics as metrics_lib
from decoderjax import sharding as sharding_lib
from decoderjax.errors import TrainingError
from decoderjax.experiment import Experiment
from decoderjax.model import Decoder, count_params
from decoderjax.optimizer import make_optimizer, make_schedule
from decoderjax.sampling import SamplingConfig, generate_tokens, new_tokens
from decoderjax.steps import TrainState, eval_step, train_step


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


def params_init(cfg):
  """The model's (boxed) parameter initializer."""
  return lambda rng: Decoder(cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def state_shardings(exp: Experiment, optimizer, mesh):
  """Shardings and shapes (no memory) of the train state and of the frozen parameters.

  The train state holds the method's trainable parameters and their optimizer state only.
  """
  # The key is made inside eval_shape: nothing runs eagerly (on a TPU slice compiled for
  # ahead of time from a CPU host, say, there is no device to run it on).
  boxed_params = jax.eval_shape(lambda: params_init(exp.model)(jax.random.key(0)))
  trainable, frozen = adapters.split_trainable(boxed_params, exp.finetune.method)

  def boxed_state(params):
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=optimizer.init(params),  # optimizer moments inherit the parameters' axes
      rng=jax.random.key_data(jax.random.key(exp.train.seed + 1)),
    )

  boxed = jax.eval_shape(boxed_state, trainable)
  shardings, abstract = sharding_lib.abstract_sharded(boxed, mesh, exp.mesh.rules)
  frozen_shardings, frozen_abstract = sharding_lib.abstract_sharded(frozen, mesh, exp.mesh.rules)
  all_shardings, _ = sharding_lib.abstract_sharded(boxed_params, mesh, exp.mesh.rules)
  return {
    "state": shardings,
    "state_abstract": abstract,
    "frozen": frozen_shardings,
    "frozen_abstract": frozen_abstract,
    "params": all_shardings,
    "init_state": boxed_state,
  }


def initial_params(exp: Experiment, layout, mesh):
  """All parameters at step 0: random, or the init_from model's plus fresh new ones (adapters,
  soft prompt, classification head), each created directly sharded."""
  init = params_init(exp.model)
  rng = jax.random.key(exp.train.seed)
  if not exp.init_from:
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=layout["params"])(rng)
  like = sharding_lib.strip_boxes(jax.eval_shape(init, rng))
  base = modeldir.load_base(
    exp.init_from, adapters.partition_like(like, _base_tree(exp.init_from))[0], mesh, exp.mesh.rules
  )
  new_shardings = adapters.partition_like(layout["params"], base)[1]
  fresh = jax.jit(
    lambda r: adapters.partition_like(nn.unbox(init(r)), base)[1], out_shardings=new_shardings
  )(rng)  # only the new leaves are computed
  params = adapters.combine(fresh, base)
  if exp.model.prompt_tokens and "soft_prompt" in fresh:
    params["soft_prompt"] = adapters.soft_prompt_from_vocab(
      params["embedding"], exp.model, exp.train.seed
    )
  return params


def _base_tree(directory: str):
  return sharding_lib.strip_boxes(
    jax.eval_shape(params_init(modeldir.read_config(directory)), jax.random.key(0))
  )


def experiment_optimizer(exp: Experiment):
  """The run's optax transformation: the configured optimizer, plus the fine-tuning method's
  frozen layers and a pruned model's zeros kept at zero."""
  optimizer = make_optimizer(exp.optimizer, exp.train.steps)
  full = exp.finetune.method == "full"
  if full and (exp.finetune.freeze_layers or exp.finetune.freeze_embeddings):
    freeze = adapters.freeze_updates(
      exp.model, exp.finetune.freeze_layers, exp.finetune.freeze_embeddings
    )
    optimizer = optax.chain(optimizer, freeze)
  if full and exp.model.pruning != "none":  # recovery fine-tuning keeps the zeros
    optimizer = optax.chain(optimizer, pruning.keep_zeros())
  return optimizer


def jit_train_step(exp: Experiment, optimizer, layout, mesh):
  """The train step, jitted once with the state's shardings and the state donated."""
  step = functools.partial(
    train_step,
    cfg=exp.model,
    optimizer=optimizer,
    loss_cfg=exp.loss,
    schedule=make_schedule(exp.optimizer, exp.train.steps),
  )
  return jax.jit(
    step,
    in_shardings=(layout["state"], sharding_lib.batch_sharding(mesh), layout["frozen"]),
    out_shardings=(layout["state"], None),
    donate_argnums=0,
  )


def init_state(exp: Experiment, optimizer, mesh) -> tuple[TrainState, dict]:
  """(the initial train state, the frozen parameters), created directly sharded."""
  layout = state_shardings(exp, optimizer, mesh)
  trainable, frozen = adapters.split_trainable(
    initial_params(exp, layout, mesh), exp.finetune.method
  )
  state = jax.jit(
    lambda p: nn.unbox(layout["init_state"](p)), out_shardings=layout["state"], donate_argnums=0
  )(trainable)
  return state, frozen


def frozen_params(exp: Experiment, layout, mesh) -> dict:
  """The frozen parameters of a resumed run: the init_from model's (none for full tuning)."""
  if not jax.tree.leaves(layout["frozen_abstract"]):
    return {}
  return modeldir.load_base(exp.init_from, layout["frozen_abstract"], mesh, exp.mesh.rules)


CLASSIFY_METRICS = ("accuracy", "macro_f1", "examples")


def evaluate(eval_fn, params, frozen, dataset, exp: Experiment, mesh) -> dict:
  """Validation loss (and a classifier's accuracy and macro-F1) over the validation split."""
  batch_size = exp.eval.batch_size or exp.train.batch_size
  rows = sharding_lib.local_batch_rows(mesh, batch_size)

  def outputs():
    for batch in dataset.eval_batches(batch_size, exp.eval.max_batches):
      global_batch = sharding_lib.global_batch(mesh, {k: v[rows] for k, v in batch.items()})
      out = eval_fn(params, global_batch, frozen)
      if "predictions" in out:  # sharded over the batch: gathered onto every host
        out = {**out, "predictions": sharding_lib.fetch(out["predictions"])}
      yield out, batch

  totals = metrics_lib.eval_totals(outputs(), exp.model.num_labels)
  loss = totals["loss"]
  if exp.model.num_labels:
    result = {"val_loss": loss, **{f"val_{k}": totals[k] for k in CLASSIFY_METRICS}}
  else:
    result = {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 50.0)))}
  metric = result[exp.train.best_metric]
  result["objective"] = metric if exp.train.best_metric == "val_loss" else -metric
  return result


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
  if exp.data.seq_len + exp.model.prompt_tokens > exp.model.max_seq_len:
    soft = f" plus {exp.model.prompt_tokens} soft-prompt tokens" if exp.model.prompt_tokens else ""
    raise TrainingError(
      f"data.seq_len={exp.data.seq_len}{soft} exceeds model.max_seq_len={exp.model.max_seq_len}"
    )
  if exp.train.batch_size % exp.loss.grad_accum_steps:
    raise TrainingError(
      f"train.batch_size={exp.train.batch_size} is not divisible by "
      f"loss.grad_accum_steps={exp.loss.grad_accum_steps}"
    )
  # Every host has read the workdir's config (check_workdir) before host 0 rewrites it.
  sharding_lib.sync_hosts("decoderjax.check_workdir")
  method = exp.finetune.method
  adapter_only = method != "full"  # the workdir holds the adapters; the base stays where it is
  if jax.process_index() == 0:
    fields = ("text_field", "label_field", "prompt_field", "completion_field", "messages_field")
    extra = {
      "labels": dataset.label_names,
      "seq_len": exp.data.seq_len,  # what evaluate and predict cut rows to
      "data_fields": {f: getattr(exp.data, f) for f in fields} if dataset.task != "lm" else {},
    }
    if adapter_only:
      extra.update(base=os.path.abspath(exp.init_from), method=method)
    generation = modeldir.read_generation(exp.init_from) if exp.init_from else None
    modeldir.write_metadata(workdir, exp.model, dataset.tokenizer, generation, extra)
  sharding_lib.sync_hosts("decoderjax.write_metadata")
  tokenizer = dataset.tokenizer
  optimizer = experiment_optimizer(exp)
  layout = state_shardings(exp, optimizer, mesh)
  shardings, abstract = layout["state"], layout["state_abstract"]
  batch_sharding = sharding_lib.batch_sharding(mesh)
  step_fn = jit_train_step(exp, optimizer, layout, mesh)
  eval_fn = jax.jit(
    functools.partial(eval_step, cfg=exp.model, loss_cfg=exp.loss),
    in_shardings=(shardings.params, batch_sharding, layout["frozen"]),
  )
  rows = sharding_lib.local_batch_rows(mesh, exp.train.batch_size)
  batches = dataset.train_batches(exp.train.batch_size, exp.data.seed, rows)

  mngr = modeldir.checkpoint_manager(workdir, exp.checkpoint.keep, exp.checkpoint.keep_best)
  if mngr.latest_step() is None:
    state, frozen = init_state(exp, optimizer, mesh)
  else:  # restored straight into the target shardings: no initialization, any earlier mesh
    frozen = frozen_params(exp, layout, mesh)
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

  n_trainable = count_params(state.params)
  n_params = n_trainable + count_params(frozen)
  flops_per_token = metrics_lib.flops_per_token(exp.model, exp.data.seq_len, not adapter_only)
  peak = exp.train.peak_flops or metrics_lib.peak_flops(exp.model.dtype)
  trains = "" if n_trainable == n_params else f" ({n_trainable:,} trainable, {method})"
  print(
    f"model: {n_params:,} parameters{trains}, {flops_per_token / 1e6:.2f} MFLOPs/token (train); "
    f"data: {dataset.describe()}",
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

  last, best = {}, {"objective": float("inf")}
  stale_evals, stopped_early = 0, False
  patience = exp.train.early_stopping_patience
  start_step = int(state.step)
  step_tokens = exp.train.batch_size * exp.data.seq_len
  t_last, step_last = time.perf_counter(), start_step
  paused = 0.0  # seconds of evaluation, samples and saves since t_last (not training)
  samples = not exp.model.num_labels  # a classifier has no text to sample
  try:
    if exp.eval.at_start and start_step == 0:  # the starting point competes for the best too
      best = {"step": 0, **evaluate(eval_fn, state.params, frozen, dataset, exp, mesh)}
      logger.log(0, {k: v for k, v in best.items() if k != "objective"})
      save(0, {k: v for k, v in best.items() if k != "step"})
    next_batch = sharding_lib.global_batch(mesh, batches.batch(start_step))
    for step in range(start_step, exp.train.steps):
      state, m = step_fn(state, next_batch, frozen)  # dispatched asynchronously
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
        tokens_per_sec = step_tokens * (done - step_last) / max(now - t_last - paused, 1e-9)
        t_last, step_last, paused = now, done, 0.0
        record = {
          "step": done,
          "loss": loss,
          "learning_rate": float(m["learning_rate"]),
          "grad_norm": float(m["grad_norm"]),
          "tokens_per_sec": tokens_per_sec,
          "mfu": flops_per_token * tokens_per_sec / (peak * jax.device_count()),
          **batches.tokens_seen(done),  # a mixture's tokens per source
        }
      extras_start = time.perf_counter()
      eval_now = bool(exp.eval.every_steps and done % exp.eval.every_steps == 0)
      if eval_now or done == exp.train.steps:
        eval_now = True
        last = {"step": done, **evaluate(eval_fn, state.params, frozen, dataset, exp, mesh)}
        record = {**(record or {"step": done, "loss": loss}), **last}
        record.pop("objective")
        if last["objective"] < best["objective"]:
          best, stale_evals = last, 0
        else:
          stale_evals += 1
        stopped_early = bool(patience) and stale_evals >= patience and done < exp.train.steps
      logger.log(done, record)
      if samples and exp.train.sample_every and done % exp.train.sample_every == 0:
        params = adapters.combine(state.params, frozen)
        logger.sample(done, sample_text(params, exp, tokenizer, done))
      if (
        done == exp.train.steps
        or stopped_early
        or (exp.checkpoint.every_steps and done % exp.checkpoint.every_steps == 0)
      ):
        save(done, {k: v for k, v in last.items() if k != "step"} if eval_now else None)
      paused += time.perf_counter() - extras_start
      if stopped_early:
        print(
          f"early stopping at step {done}: no better {exp.train.best_metric} in {patience} "
          f"evaluations; restoring the best, step {best['step']}",
          flush=True,
        )
        break
      if preemption.requested:
        save(done, None)
        mngr.wait_until_finished()
        print(f"SIGTERM: saved step {done} to {workdir}; exiting", flush=True)
        return {"step": done, "preempted": True}
    final = {"step": int(state.step), **{k: v for k, v in last.items() if k != "objective"}}
    if stopped_early:
      mngr.wait_until_finished()
      restored = mngr.restore(
        best["step"], args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract.params))
      )
      state = state.replace(params=restored["params"])
      final = {**{k: v for k, v in best.items() if k != "objective"}, "stopped_at": done}
    if exp.train.steps > 0 and samples:
      text = sample_text(adapters.combine(state.params, frozen), exp, tokenizer, exp.train.seed)
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
