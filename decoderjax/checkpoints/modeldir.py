"""The model directory: everything a tool needs to use a model, so `--checkpoint=DIR` suffices.

DIR/config.json        {"format": "decoderjax", "version": 1, "model": {ModelConfig fields},
                        optional "labels": [classifier label names], and for adapters
                        (lora, prompt) "base": the base model directory, "method": the method}
DIR/generation.json    generation defaults (temperature, top_k, top_p, max_new_tokens, ...)
DIR/tokenizer/         the tokenizer (see data/tokenizer.py)
DIR/params/            Orbax checkpoint of the parameters (exported or converted models), or
DIR/checkpoints/       Orbax CheckpointManager steps (a training workdir): best, else latest

A directory with a "base" holds only the adapters' parameters (small); loading it reads the
base model's parameters and adds the adapters (merging LoRA into the weights by default).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from decoderjax.checkpoints import orbax_layout
from decoderjax.checkpoints.orbax_layout import CHECKPOINTS_DIR
from decoderjax.data.tokenizer import Tokenizer, load_tokenizer
from decoderjax.model import adapters
from decoderjax.model.config import ModelConfig
from decoderjax.model.decoder import param_shapes
from decoderjax.runtime import sharding as sharding_lib

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
GENERATION_FILE = "generation.json"
TOKENIZER_DIR = "tokenizer"
PARAMS_DIR = "params"
SAVE_CHUNK_BYTES = 64 << 20  # zarr chunks of `params/`: what a save holds per array in flight

DEFAULT_GENERATION = {"temperature": 0.8, "top_k": 0, "top_p": 1.0, "max_new_tokens": 256}


@dataclasses.dataclass
class ModelDir:
  config: ModelConfig
  params: dict
  tokenizer: Tokenizer
  generation: dict
  labels: list[str] | None = None  # a classifier's label names
  metadata: dict = dataclasses.field(default_factory=dict)  # config.json, as read_metadata gives


def write_metadata(
  directory: str, cfg: ModelConfig, tokenizer: Tokenizer, generation=None, extra=None
):
  """Writes config, tokenizer and generation defaults (what a model needs beside its params).

  `extra`: more config.json entries ("labels", "base", "method").
  """
  os.makedirs(directory, exist_ok=True)
  config = {"format": "decoderjax", "version": FORMAT_VERSION, "model": cfg.to_dict()}
  config.update({k: v for k, v in (extra or {}).items() if v})
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tokenizer.save(os.path.join(directory, TOKENIZER_DIR))
  with open(os.path.join(directory, GENERATION_FILE), "w") as f:
    json.dump({**DEFAULT_GENERATION, "eos_id": tokenizer.eos_id, **(generation or {})}, f, indent=2)


def read_metadata(directory: str) -> dict:
  """config.json of a model directory, checked ("model" parsed into a ModelConfig)."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{directory} is not a decoderjax model directory (no {CONFIG_FILE})")
  with open(path) as f:
    config = json.load(f)
  if config.get("format") != "decoderjax" or "model" not in config:
    raise ValueError(f"{path} is not a decoderjax model config")
  return {**config, "model": ModelConfig.from_dict(config["model"])}


def read_generation(directory: str) -> dict:
  """generation.json (sampling defaults, stop ids, chat template); {} when absent."""
  path = os.path.join(directory, GENERATION_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def read_config(directory: str) -> ModelConfig:
  return read_metadata(directory)["model"]


def abstract_params(cfg: ModelConfig, mesh=None, rules=sharding_lib.DEFAULT_RULES):
  """Shapes and dtypes of the parameters (no memory), placed on one device or over `mesh`."""
  boxed = param_shapes(cfg)
  if mesh is not None:
    return sharding_lib.abstract_sharded(boxed, mesh, rules)[1]
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shapes = sharding_lib.strip_boxes(boxed)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), shapes)


def save_params(directory: str, params) -> None:
  """Writes `params/` from JAX or numpy leaves; numpy leaves (conversions) are never copied.

  Orbax's defaults would deep-copy numpy leaves, then encode each array as one chunk inside
  one OCDBT file: a converted 7B model held about twice. The save blocks, so numpy leaves are
  written from their own memory, in chunks of at most SAVE_CHUNK_BYTES, one zarr folder per
  leaf (1B model: 1.05x its bytes at the peak of the save instead of 2.0x).
  """
  registry = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, ocp.type_handlers.ArrayHandler()),
  )
  handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, type_handler_registry=registry)
  chunks = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=SAVE_CHUNK_BYTES), params)
  with ocp.Checkpointer(handler) as ckptr:
    path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    ckptr.save(path, args=ocp.args.PyTreeSave(params, save_args=chunks))


def save_model_dir(directory, cfg, params, tokenizer, generation=None, extra=None) -> None:
  """Writes a complete, exported model directory (`extra`: more config.json entries)."""
  write_metadata(directory, cfg, tokenizer, generation, extra)
  save_params(directory, params)


@contextlib.contextmanager
def staged(output: str):
  """A temporary folder beside `output`, renamed to it only if the block completes."""
  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=".staging-", dir=parent)
  try:
    yield staging
    os.replace(staging, output)
  finally:
    shutil.rmtree(staging, ignore_errors=True)


KEPT_EXTRAS = (
  "labels",
  "seq_len",
  "trained_len",
  "data_fields",
  "hf_architecture",  # the Hugging Face model_type converted from (convert --to=hf writes it)
)  # config.json entries a standalone copy keeps


def export_model_dir(source: str, output: str, transform=None) -> ModelDir:
  """A workdir or adapter directory -> a standalone model directory (LoRA merged).

  `transform(model) -> (config, params)` changes the model on the way (quantization).
  """
  model = load_model_dir(source)
  meta = model.metadata
  cfg, params = transform(model) if transform else (model.config, model.params)
  check_shapes(params, abstract_params(cfg), source)
  extra = {key: meta.get(key) for key in KEPT_EXTRAS}
  with staged(output) as staging:
    write_metadata(staging, cfg, model.tokenizer, model.generation, extra)
    save_params(staging, params)
  return model


def load_params(directory: str, cfg: ModelConfig, mesh=None, step: int | None = None, rules=None):
  """Parameters of a model directory: `params/`, else the best (or latest) training step.

  With a mesh, each parameter is restored directly into its sharding (resharding on load). An
  adapter directory's own parameters are combined with its base model's.
  """
  return _load_params(directory, read_metadata(directory), cfg, mesh, step, rules)


def _load_params(directory: str, meta: dict, cfg: ModelConfig, mesh, step, rules):
  rules = rules or sharding_lib.DEFAULT_RULES
  target = abstract_params(cfg, mesh, rules)
  if meta.get("base"):
    target, frozen = adapters.split_trainable(target, meta["method"])
  params = _restore(directory, target, step)
  if meta.get("base"):
    base = load_base(meta["base"], frozen, mesh, rules)
    params = adapters.combine(params, base)
  return params


def load_base(directory: str, like, mesh=None, rules=None) -> dict:
  """The parameters of base model `directory` that the tree `like` has (a fine-tune's base)."""
  meta = read_metadata(directory)
  base = _load_params(directory, meta, meta["model"], mesh, None, rules)
  kept, _ = adapters.partition_like(base, like)
  _, missing = adapters.partition_like(like, kept)
  if missing:
    path = jax.tree_util.keystr(jax.tree_util.tree_flatten_with_path(missing)[0][0][0])
    raise ValueError(f"base model {directory} has no parameter {path}")
  check_shapes(kept, like, f"base model {directory}", "the fine-tuned model expects")
  return kept


def check_shapes(params, expected, source: str, wanted: str = "the config implies") -> None:
  """Every array of `params` has the shape of its counterpart in `expected` (same structure)."""
  for (path, got), want in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected), strict=True
  ):
    if got.shape != want.shape:
      raise ValueError(
        f"{source}: tensor for {jax.tree_util.keystr(path)} has shape {got.shape}, "
        f"{wanted} {want.shape}"
      )


def has_parameters(directory: str) -> bool:
  """Whether `directory` holds parameters `_restore` can read: `params/` or a complete
  checkpoint."""
  if os.path.isdir(os.path.join(directory, PARAMS_DIR)):
    return True
  if not os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
    return False
  with orbax_layout.manager(directory, read_only=True) as mngr:
    return mngr.latest_step() is not None


def _restore(directory: str, target, step: int | None):
  params_path = os.path.abspath(os.path.join(directory, PARAMS_DIR))
  if os.path.isdir(params_path) and step is None:
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(params_path, target)
  if not os.path.isdir(os.path.join(directory, CHECKPOINTS_DIR)):
    raise FileNotFoundError(
      f"{directory} holds no parameters ({PARAMS_DIR}/ or {CHECKPOINTS_DIR}/)"
    )
  with orbax_layout.manager(directory, read_only=True) as mngr:
    if step is None:
      step = orbax_layout.best_or_latest(mngr)
    if step is None:
      raise FileNotFoundError(f"{directory}/{CHECKPOINTS_DIR} holds no complete checkpoint")
    return orbax_layout.restore_params(mngr, step, target)


def load_model_dir(directory: str, mesh=None, merge_lora: bool = True) -> ModelDir:
  """Everything a tool needs; LoRA adapters are merged into the weights unless told not to."""
  meta = read_metadata(directory)
  cfg = meta["model"]
  tokenizer = load_tokenizer(os.path.join(directory, TOKENIZER_DIR))
  if tokenizer.vocab_size > cfg.vocab_size:
    raise ValueError(
      f"{directory}: tokenizer vocabulary {tokenizer.vocab_size} exceeds the model's "
      f"vocab_size {cfg.vocab_size}"
    )
  generation = {**DEFAULT_GENERATION, **read_generation(directory)}
  params = _load_params(directory, meta, cfg, mesh, None, None)
  if merge_lora:
    params, cfg = adapters.merge_lora(params, cfg)
  return ModelDir(cfg, params, tokenizer, generation, meta.get("labels"), meta)
