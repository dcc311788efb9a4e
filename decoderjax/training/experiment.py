"""ml_collections config files <-> frozen per-concern dataclasses (done once, at the CLI)."""

from __future__ import annotations

import dataclasses

import ml_collections
from ml_collections import config_dict

from decoderjax.data.data_config import DataConfig
from decoderjax.model.adapters import FinetuneConfig, finetuned_config
from decoderjax.model.config import ModelConfig
from decoderjax.model.presets import get_preset
from decoderjax.runtime.sharding import MeshConfig
from decoderjax.training.optimizer import OptimizerConfig
from decoderjax.training.steps import LossConfig

_OPTIONAL_TYPES = {
  "num_kv_heads": int,
  "head_dim": int,
  "sliding_window": int,
  "local_rope_theta": float,
  "attn_scale": float,
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
  # The validation metric that picks the best checkpoint: val_loss (lower is better), or for
  # classifiers val_accuracy / val_macro_f1 (higher is better).
  best_metric: str = "val_loss"
  # Stop after this many evaluations without a better best_metric (0: never); the best
  # checkpoint is then restored and is what the workdir's model directory serves.
  early_stopping_patience: int = 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 250  # 0: only at the end
  max_batches: int = 0  # 0: the whole validation split
  batch_size: int = 0  # 0: train.batch_size
  at_start: bool = False  # also evaluate before the first step (a fine-tune's base, logged at 0)


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
  finetune: FinetuneConfig = FinetuneConfig()
  init_from: str = ""  # a model directory whose parameters start the run (fine-tuning)


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
    ("finetune", FinetuneConfig),
  ):
    values = {f.name: f.default for f in dataclasses.fields(cls)}
    values.pop("skip_nonfinite", None)  # derived from train.on_nonfinite
    values.pop("rules", None)  # the default logical-axis rules unless a config sets mesh.rules
    config[name] = ml_collections.ConfigDict(values)
  config.init_from = ""
  return config


def finetune_base_config(method: str = "full", task: str = "lm") -> ml_collections.ConfigDict:
  """A fine-tuning config: the model comes from --config.init_from=MODEL_DIR, so no `model`
  section; fine-tuning defaults (learning rate two orders below pretraining, short warmup)."""
  config = base_config()
  del config["model"]
  config.finetune.method = method
  config.data.update(source="jsonl", task=task, seq_len=256)
  config.optimizer.update(
    learning_rate=1e-4 if method == "full" else 1e-3,
    end_learning_rate=1e-5 if method == "full" else 1e-4,
    warmup_steps=20,
    weight_decay=0.01,
    b2=0.999,  # torch's and transformers' AdamW default, which fine-tuning recipes assume
  )
  config.train.update(steps=300, batch_size=8, log_every=20)
  config.eval.update(every_steps=50, max_batches=0, at_start=True)
  config.checkpoint.update(every_steps=50, keep=1)
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


def _preference_settings(loss: LossConfig, data, finetune: FinetuneConfig) -> LossConfig:
  """A preference run's loss (DPO unless loss.preference names another); the preference
  settings are an error anywhere else, as is a method whose reference is not the base."""
  defaults = LossConfig()
  if data.task != "preference":
    for field in ("preference", "beta", "simpo_gamma"):
      if getattr(loss, field) != getattr(defaults, field):
        raise ValueError(f"loss.{field} applies to data.task='preference', not {data.task!r}")
    return loss
  for field in ("adversarial", "z_loss"):
    if getattr(loss, field) != getattr(defaults, field):
      raise ValueError(f"loss.{field} is a token-loss setting; data.task='preference' has none")
  if finetune.method not in ("full", "lora"):
    raise ValueError(f"data.task='preference' trains by finetune.method full or lora, not "
                     f"{finetune.method!r}")  # fmt: skip
  return dataclasses.replace(loss, preference=loss.preference or "dpo")


def experiment_from_config(
  config: ml_collections.ConfigDict,
  vocab_size: int,
  base: ModelConfig | None = None,
  num_labels: int = 0,
) -> Experiment:
  """Builds the frozen experiment; `vocab_size` (the tokenizer's) fills model.vocab_size=0.

  With `base` (the init_from model's config) the model is the base plus the fine-tuning
  method's structure; `num_labels` makes it a classifier.
  """
  allowed = {
    "model",
    "data",
    "optimizer",
    "loss",
    "train",
    "eval",
    "checkpoint",
    "mesh",
    "finetune",
    "init_from",
  }
  unknown = sorted(set(config.keys()) - allowed)
  if unknown:
    raise ValueError(f"config: unknown section(s) {unknown}")
  finetune = _section(FinetuneConfig, config.get("finetune"), "finetune")
  init_from = config.get("init_from", "")
  if base is not None:
    if "model" in config:
      raise ValueError(
        "config.model: with init_from the model comes from the base model directory; "
        "use a config without a model section (configs/finetune_*.py)"
      )
    model = finetuned_config(base, finetune, num_labels)
  else:
    if "model" not in config:
      raise ValueError("config: no model section; a fine-tuning config needs --config.init_from")
    if finetune.method != "full":
      raise ValueError(f"finetune.method={finetune.method!r} needs --config.init_from=MODEL_DIR")
    values = config.model.to_dict()
    if not values.get("vocab_size") and values.get("vocab_pad"):
      raise ValueError("config.model.vocab_pad: with vocab_size=0 the padding is derived")
    model = ModelConfig.from_dict({**values, "vocab_size": values.get("vocab_size") or vocab_size})
    if not values.get("vocab_size"):  # the tokenizer's: padded, so every tensor axis splits it
      model = model.padded_vocab()
    model = model.replace(num_labels=num_labels)
  train = _section(TrainConfig, config.get("train"), "train")
  metrics = ("val_loss", "val_accuracy", "val_macro_f1")
  if train.best_metric not in metrics or (train.best_metric != "val_loss" and not num_labels):
    raise ValueError(
      f"train.best_metric must be one of {metrics} (accuracy and F1 for classifiers), "
      f"got {train.best_metric!r}"
    )
  if train.on_nonfinite not in ("stop", "skip"):
    raise ValueError(f"train.on_nonfinite must be 'stop' or 'skip', got {train.on_nonfinite!r}")
  data = data_config(config)
  loss = _preference_settings(_section(LossConfig, config.get("loss"), "loss"), data, finetune)
  return Experiment(
    model=model,
    data=data,
    optimizer=_section(OptimizerConfig, config.get("optimizer"), "optimizer"),
    loss=dataclasses.replace(loss, skip_nonfinite=train.on_nonfinite == "skip"),
    train=train,
    eval=_section(EvalConfig, config.get("eval"), "eval"),
    checkpoint=_section(CheckpointConfig, config.get("checkpoint"), "checkpoint"),
    mesh=_section(MeshConfig, config.get("mesh"), "mesh"),
    finetune=finetune,
    init_from=init_from,
  )
