"""The model directory: everything a tool needs to use a model, so `--checkpoint=DIR` suffices.

DIR/config.json        {"format": "decoderjax", "version": 1, "model": {ModelConfig fields}}
DIR/generation.json    generation defaults (temperature, top_k, top_p, max_new_tokens, ...)
DIR/tokenizer/         the tokenizer (see tokenizer.py)
DIR/params/            Orbax checkpoint of the parameters (exported or converted models), or
DIR/checkpoints/       Orbax CheckpointManager steps (a training workdir): best, else latest
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from decoderjax import sharding as sharding_lib
from decoderjax.config import ModelConfig
from decoderjax.model import Decoder
from decoderjax.tokenizer import Tokenizer, load_tokenizer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation.json"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
BEST_METRIC = "val_loss"

DEFAULT_GENERATION = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "max_new_tokens": 256}


@dataclasses.dataclass
class ModelDir:
  config: ModelConfig
  params: dict
  tokenizer: Tokenizer
  generation: dict


def write_metadata(directory: str, cfg: ModelConfig, tokenizer: Tokenizer, generation=None):
  """Writes config, tokenizer and generation defaults (what a model needs beside its params)."""
  os.makedirs(directory, exist_ok=True)
  config = {"format": "decoderjax", "version": FORMAT_VERSION, "model": cfg.to_dict()}
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tokenizer.save(os.path.join(directory, TOKENIZER_DIR))
  with open(os.path.join(directory, GENERATION_FILE), "w") as f:
    json.dump({**DEFAULT_GENERATION, "eos_id": tokenizer.eos_id, **(generation or {})}, f, indent=2)


def read_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a decoderjax model directory (no {CONFIG_FILE})")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != "decoderjax" or "model" not in config:
    raise ValueError(f"{path} is not a decoderjax model config")
  return ModelConfig.from_dict(config["model"])


def abstract_params(cfg: ModelConfig, mesh=None, rules=sharding_lib.DEFAULT_RULES):
  """Shapes and dtypes of the parameters (no memory), placed on one device or over `mesh`."""
  init = lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  boxed = jax.eval_shape(init)
  if mesh is not None:
    return sharding_lib.abstract_sharded(boxed, mesh, rules)[1]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = sharding_lib.strip_boxes(boxed)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes)


def save_params(directory: str, params) -> None:
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(os.path.join(directory, PARAMS_DIR)), params)


def save_model_dir(directory, cfg, params, tokenizer, generation=None) -> None:
  """Writes a complete, exported model directory."""
  write_metadata(directory, cfg, tokenizer, generation)
  save_params(directory, params)


def checkpoint_manager(directory: str, keep: int = 3, keep_best: bool = True, read_only=False):
  """The Orbax manager of a training workdir: keeps the last `keep` steps and the best one."""
  policies = [ocp.checkpoint_managers.LatestN(n=keep)]
  if keep_best:
    policies.append(
      ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=True, n=1)
    )
  options = ocp.CheckpointManagerOptions(
    best_fn=lambda m: m[BEST_METRIC],
    best_mode="min",
    preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
    read_only=read_only,
    create=not read_only,
  )
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(directory, CHECKPOINTS_DIR)), options=options
  )


def load_params(directory: str, cfg: ModelConfig, mesh=None, step: int | None = None):
  """Parameters of a model directory: `params/`, else the best (or latest) training step.

  With a mesh, each parameter is restored directly into its sharding (resharding on load).
  """
  target = abstract_params(cfg, mesh)
  params_path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if os.path.isdir(params_path) and step is None:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(params_path, target)
  if not os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
    raise FileNotFoundError(
      f"{directory} holds no parameters ({PARAMS_DIR}/ or {CHECKPOINTS_DIR}/)"
    )
  with checkpoint_manager(directory, read_only=True) as mngr:
    if step is None:
      step = mngr.best_step() if mngr.best_step() is not None else mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{directory}/{CHECKPOINTS_DIR} holds no complete checkpoint")
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return restored["params"]


def load_model_dir(directory: str, mesh=None) -> ModelDir:
  cfg = read_config(directory)
  tokenizer = load_tokenizer(os.path.join(directory, TOKENIZER_DIR))
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
      f"{directory}: tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's "
      f"vocab_size {cfg.vocab_size}"
    )
  generation = dict(DEFAULT_GENERATION)
  path = os.path.join(directory, GENERATION_FILE)
  if os.path.exists(path):
    with open(path) as f:
      generation.update(json.load(f))
  return ModelDir(cfg, load_params(directory, cfg, mesh), tokenizer, generation)
