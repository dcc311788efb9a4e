"""The train state, built abstractly: its shardings and shapes, the optimizer, the jitted
steps, and step 0's parameters (random, or a base model's plus new ones) created sharded."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from decoderjax.checkpoints import modeldir
from decoderjax.model import adapters, sparsity
from decoderjax.model.decoder import init_params, param_shapes
from decoderjax.runtime import sharding as sharding_lib
from decoderjax.training.experiment import Experiment
from decoderjax.training.optimizer import make_optimizer, make_schedule
from decoderjax.training.preference import WITH_REFERENCE
from decoderjax.training.steps import TrainState, eval_step, train_step


def state_shardings(exp: Experiment, optimizer, mesh):
  """Shardings and shapes (no memory) of the train state and of the frozen parameters.

  The train state holds the method's trainable parameters and their optimizer state only.
  """
  boxed_params = param_shapes(exp.model)
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
  init = functools.partial(init_params, exp.model)
  rng = jax.random.key(exp.train.seed)
  if not exp.init_from:
    return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=layout["params"])(rng)
  like = sharding_lib.strip_boxes(param_shapes(exp.model))
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
  return sharding_lib.strip_boxes(param_shapes(modeldir.read_config(directory)))


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
    optimizer = optax.chain(optimizer, sparsity.keep_zeros())
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
    in_shardings=(
      layout["state"],
      sharding_lib.batch_sharding(mesh),
      layout["frozen"],
      _reference_sharding(exp, layout),
    ),
    out_shardings=(layout["state"], None),
    donate_argnums=0,
  )


def jit_eval_step(exp: Experiment, layout, mesh):
  """The eval step, jitted with the parameters' shardings: -> loss sums (and predictions)."""
  return jax.jit(
    functools.partial(eval_step, cfg=exp.model, loss_cfg=exp.loss),
    in_shardings=(
      layout["state"].params, sharding_lib.batch_sharding(mesh), layout["frozen"],
      _reference_sharding(exp, layout),
    ),
  )  # fmt: skip


def holds_reference(exp: Experiment) -> bool:
  """Whether the run keeps a frozen copy of its initial parameters as the reference model (a
  full fine-tune by DPO or IPO; a LoRA run's reference is its base, without the adapters)."""
  return (
    exp.data.task == "preference"
    and exp.loss.preference in WITH_REFERENCE
    and exp.finetune.method == "full"
  )


def _reference_sharding(exp: Experiment, layout):
  return layout["state"].params if holds_reference(exp) else {}


def reference_params(exp: Experiment, layout, mesh) -> dict:
  """A preference run's reference parameters: step 0's (the init_from model's), the same at a
  resume; empty where the run needs no copy (holds_reference)."""
  if not holds_reference(exp):
    return {}
  return initial_params(exp, layout, mesh)


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
