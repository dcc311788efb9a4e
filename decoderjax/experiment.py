"""ml_collections config files <-> frozen per-concern dataclasses (done once, at the CLI)."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from decoderjax.config import ModelConfig, get_preset
from decoderjax.data import DataConfig
from decoderjax.optimizer import OptimizerConfig
from decoderjax.sharding import MeshConfig
from decoderjax.steps import LossConfig

_OPTIONAL_TYPES = {
  "num_kv_heads": int,
  "head_dim": int,
  "sliding_window": int,
  "attn_logit_softcap": float,
  "final_logit_softcap": float,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 1000
  batch_size: int = 32  # global batch, in sequences
  seed: int = 0
  log_every: int = 50
  sample_every: int = 0  # 0: only at the end
  sample_prompt: str = ""  # empty: start from EOS
  sample_tokens: int = 200
  on_nonfinite: str = "stop"  # stop (keep the last good checkpoint) or skip the step
  peak_flops: float = 0.0  # per device, for MFU; 0 measures a matmul on CPU / uses a table


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 250  # 0: only at the end
  max_batches: int = 0  # 0: the whole validation split
  batch_size: int = 0  # 0: train.batch_size


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3  # most recent checkpoints kept, besides the best by validation loss
  keep_best: bool = True
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  loss: LossConfig
  train: TrainConfig
  eval: EvalConfig
  checkpoint: CheckpointConfig
  mesh: MeshConfig = MeshConfig()


def model_section(preset: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """A config-file `model` section holding every ModelConfig field (so all are overridable).

  `vocab_size=0` means "the tokenizer's vocabulary size".
  """
  cfg = get_preset(preset) if preset else ModelConfig()
  values = {**cfg.to_dict(), **overrides}
  for field, kind in _OPTIONAL_TYPES.items():
    if values[field] is None:
      values[field] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(values)


def base_config(preset: str | None = None, **model_overrides) -> ml_collections.ConfigDict:
  """A complete config: every section with every field at its default (all overridable)."""
  config = ml_collections.ConfigDict()
  config.model = model_section(preset, **model_overrides)
  for name, cls in (
    ("data", DataConfig),
    ("optimizer", OptimizerConfig),
    ("loss", LossConfig),
    ("train", TrainConfig),
    ("eval", EvalConfig),
    ("checkpoint", CheckpointConfig),
    ("mesh", MeshConfig),
  ):
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    values.pop("skip_nonfinite", None)  # derived from train.on_nonfinite
    values.pop("rules", None)  # the default logical-axis rules unless a config sets mesh.rules
    config[name] = ml_collections.ConfigDict(values)
  return config


def _section(cls, section, name):
  values = dict(section) if section is not None else {}
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.{name}: unknown key(s) {unknown}; known: {sorted(known)}")
  return cls(**values)


def data_config(config: ml_collections.ConfigDict) -> DataConfig:
  return _section(DataConfig, config.get("data"), "data")


def experiment_from_config(config: ml_collections.ConfigDict, vocab_size: int) -> Experiment:
  """Builds the frozen experiment; `vocab_size` (the tokenizer's) fills model.vocab_size=0."""
  allowed = {
    "model",
    "data",
    "optimizer",
    "loss",
    "train",
    "eval",
    "checkpoint",
    "mesh",
    "init_from",
  }
  unknown = sorted(set(config.keys()) - allowed)
  if unknown:
    raise ValueError(f"config: unknown section(s) {unknown}")
  model = config.model.to_dict()
  if model.get("vocab_size", 0) == 0:
    model["vocab_size"] = vocab_size
  train = _section(TrainConfig, config.get("train"), "train")
  if train.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {train.on_nonfinite!r}")
  loss = _section(LossConfig, config.get("loss"), "loss")
  return Experiment(
    model=ModelConfig.from_dict(model),
    data=data_config(config),
    optimizer=_section(OptimizerConfig, config.get("optimizer"), "optimizer"),
    loss=dataclasses.replace(loss, skip_nonfinite=train.on_nonfinite == "skip"),
    train=train,
    eval=_section(EvalConfig, config.get("eval"), "eval"),
    checkpoint=_section(CheckpointConfig, config.get("checkpoint"), "checkpoint"),
    mesh=_section(MeshConfig, config.get("mesh"), "mesh"),
  )
