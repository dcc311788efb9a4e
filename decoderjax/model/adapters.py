"""Fine-tuning methods: which parameters train, how a base model becomes a fine-tunable one.

full    every parameter trains (optionally the first layers and the embeddings stay frozen)
lora    low-rank adapters on chosen projections train; the base stays frozen (layers.lora)
prompt  a learned soft prompt trains; the base stays frozen (model.Decoder)

A classification head (`num_labels`) is new in the fine-tuned model and always trains. With lora
and prompt, the train state holds only the trainable parameters (and their optimizer state); the
frozen base is an input of the step, read from the base model directory, never checkpointed.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decoderjax.model import paths
from decoderjax.model.config import ModelConfig

METHODS = ("full", "lora", "prompt")
HEAD_NAMES = ("cls_head", "cls_head_bias")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  method: str = "full"  # one of METHODS
  freeze_layers: int = 0  # full: the first this many layers stay frozen
  freeze_embeddings: bool = False  # full: token and position embeddings stay frozen
  lora_rank: int = 8
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: str = "q,k,v,o"  # of q, k, v, o, up, gate, down
  prompt_tokens: int = 20  # prompt: soft-prompt length
  dropout: float = -1.0  # >= 0: residual and embedding dropout of the fine-tuned model

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"finetune.method must be one of {METHODS}, got {self.method!r}")
    if self.method == "lora" and self.lora_rank <= 0:
      raise ValueError(f"finetune.lora_rank must be positive, got {self.lora_rank}")
    if self.method == "prompt" and self.prompt_tokens <= 0:
      raise ValueError(f"finetune.prompt_tokens must be positive, got {self.prompt_tokens}")
    if self.freeze_layers < 0:
      raise ValueError(f"finetune.freeze_layers must be >= 0, got {self.freeze_layers}")


def finetuned_config(base: ModelConfig, ft: FinetuneConfig, num_labels: int = 0) -> ModelConfig:
  """The base model's config with the method's structure (adapters, soft prompt, head)."""
  if base.quant != "none":
    raise ValueError(
      f"config.init_from: an {base.quant}-quantized model is for inference; fine-tune the float "
      "model it was quantized from"
    )
  if base.pruning != "none" and ft.method == "lora":
    raise ValueError(
      f"config.init_from is pruned ({base.pruning}): merged LoRA adapters would fill its zeros; "
      "recover it with finetune.method=full, which keeps them"
    )
  changes = {"num_labels": num_labels}
  if ft.method == "lora":
    changes.update(
      lora_rank=ft.lora_rank,
      lora_alpha=ft.lora_alpha,
      lora_dropout=ft.lora_dropout,
      lora_targets=ft.lora_targets,
    )
  if ft.method == "prompt":
    changes.update(prompt_tokens=ft.prompt_tokens)
  if ft.dropout >= 0:
    changes.update(resid_dropout=ft.dropout, embed_dropout=ft.dropout)
  if ft.freeze_layers > base.num_layers:
    raise ValueError(
      f"finetune.freeze_layers={ft.freeze_layers} exceeds the model's {base.num_layers} layers"
    )
  return base.replace(**changes)


def trainable(name: str, method: str) -> bool:
  """Whether the parameter called `name` trains under `method`."""
  if method == "full" or name in HEAD_NAMES:
    return True
  if method == "lora":
    return "_lora_" in name
  return name == "soft_prompt"


def partition(tree, keep) -> tuple[dict, dict]:
  """Splits a nested dict by `keep(name)` of each leaf's own name -> (kept, rest)."""
  kept, rest = {}, {}
  for key, value in tree.items():
    if isinstance(value, dict):
      a, b = partition(value, keep)
      if a:
        kept[key] = a
      if b:
        rest[key] = b
    elif keep(key):
      kept[key] = value
    else:
      rest[key] = value
  return kept, rest


def partition_like(tree, like) -> tuple[dict, dict]:
  """Splits `tree` by whether each leaf's path also exists in `like` -> (shared, only in tree)."""
  shared, rest = {}, {}
  for key, value in tree.items():
    if key in like and isinstance(value, dict) and isinstance(like[key], dict):
      a, b = partition_like(value, like[key])
      if a:
        shared[key] = a
      if b:
        rest[key] = b
    elif key in like and not isinstance(like[key], dict):
      shared[key] = value
    else:
      rest[key] = value
  return shared, rest


def combine(a: dict, b: dict) -> dict:
  """The union of two nested dicts with disjoint leaves (inverse of `partition`)."""
  out = dict(a)
  for key, value in b.items():
    out[key] = combine(out[key], value) if key in out and isinstance(value, dict) else value
  return out


def split_trainable(params, method: str) -> tuple[dict, dict]:
  """(trainable, frozen) parameters of `method`."""
  return partition(params, lambda name: trainable(name, method))


def freeze_updates(cfg: ModelConfig, layers: int, embeddings: bool):
  """An optax transformation zeroing updates of the first `layers` layers (and embeddings).

  Applied after the optimizer, so decoupled weight decay cannot move frozen weights either.
  """

  def keep(path, update):
    names = paths.names(path)
    if names[-1] in ("embedding", "position_embedding") and embeddings:
      return jnp.zeros_like(update)
    if names[0] == "layers" and cfg.scan_layers:  # stacked: layer index on the leading axis
      live = (jnp.arange(cfg.num_layers) >= layers).astype(update.dtype)
      return update * live.reshape(-1, *(1,) * (update.ndim - 1))
    if names[0].startswith("layers_") and int(names[0].split("_")[1]) < layers:
      return jnp.zeros_like(update)
    return update

  def update_fn(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(keep, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def merge_lora(params, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Folds every adapter into its base weight (W + alpha / rank * A B) -> a plain model."""
  if not cfg.lora_rank:
    return params, cfg
  scale = cfg.lora_alpha / cfg.lora_rank

  def merge(tree):
    out = {}
    for key, value in tree.items():
      if "_lora_" in key:
        continue
      if isinstance(value, dict):
        out[key] = merge(value)
      elif f"{key}_lora_a" in tree:
        a, b = tree[f"{key}_lora_a"], tree[f"{key}_lora_b"]
        lead = a.ndim - 1 - (value.ndim - b.ndim + 1)  # scanned layers: one leading axis
        lead_shape = value.shape[:lead]
        fan_in, fan_out = math.prod(a.shape[lead:-1]), math.prod(b.shape[lead + 1 :])
        delta = jnp.matmul(
          jnp.reshape(a, (*lead_shape, fan_in, -1)).astype(jnp.float32),
          jnp.reshape(b, (*lead_shape, -1, fan_out)).astype(jnp.float32),
        )
        out[key] = (value.astype(jnp.float32) + scale * delta.reshape(value.shape)).astype(
          value.dtype
        )
      else:
        out[key] = value
    return out

  return merge(params), cfg.replace(lora_rank=0, lora_dropout=0.0)


def soft_prompt_from_vocab(embedding_VD, cfg: ModelConfig, seed: int):
  """Initial soft prompt: embeddings of random vocabulary tokens (as the model scales them)."""
  ids = np.random.default_rng(seed).integers(0, embedding_VD.shape[0], cfg.prompt_tokens)
  prompt_PD = jnp.take(embedding_VD, jnp.asarray(ids), axis=0).astype(jnp.float32)
  if cfg.embed_scale:
    prompt_PD = prompt_PD * cfg.embed_dim**0.5
  return prompt_PD.astype(embedding_VD.dtype)
