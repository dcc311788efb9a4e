"""Optax optimizers and learning-rate schedules built from one frozen config."""

from __future__ import annotations

import dataclasses

import jax
import optax

from decoderjax.model import paths

OPTIMIZERS = ("adamw", "adafactor", "lion")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  name: str = "adamw"  # adamw, adafactor, lion
  learning_rate: float = 1e-3  # peak, reached after warmup
  end_learning_rate: float = 1e-4  # reached at decay_steps (cosine, linear)
  schedule: str = "cosine"  # cosine, linear, constant, rsqrt
  warmup_steps: int = 100
  decay_steps: int = 0  # 0 means train.steps
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  decay_embeddings: bool = True  # weight decay on embedding tables and the output head
  decay_norms_and_biases: bool = False  # weight decay on norm scales and biases
  clip_norm: float = 1.0  # global gradient norm clipping; 0 turns it off

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(f"optimizer.name must be one of {OPTIMIZERS}, got {self.name!r}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optimizer.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.learning_rate <= 0:
      raise ValueError(f"optimizer.learning_rate must be positive, got {self.learning_rate}")


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then the configured decay."""
  peak, end, warmup = cfg.learning_rate, cfg.end_learning_rate, cfg.warmup_steps
  decay_steps = max((cfg.decay_steps or total_steps) - warmup, 1)
  if cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif cfg.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:  # rsqrt: peak * sqrt(warmup / step) after warmup
    scale = max(warmup, 1)
    after = lambda count: peak * jax.lax.rsqrt((count + scale) / scale)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(cfg: OptimizerConfig, params):
  """True where weight decay applies: matrices always; embeddings, norms, biases as configured."""

  def decays(path, leaf) -> bool:
    name = paths.leaf_name(path)
    if name in ("embedding", "position_embedding", "head", "soft_prompt"):
      return cfg.decay_embeddings
    if name == "scale" or name == "bias" or name.endswith("_bias"):
      return cfg.decay_norms_and_biases
    return True

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  schedule = make_schedule(cfg, total_steps)
  mask = lambda params: decay_mask(cfg, params)
  if cfg.name == "adamw":
    opt = optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "lion":
    opt = optax.lion(schedule, cfg.b1, cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  else:
    # optax adds Adafactor's decay after the learning-rate scaling: scale it by the schedule so
    # `weight_decay` means the same (decoupled, times the learning rate) for every optimizer.
    decay = lambda count: cfg.weight_decay * schedule(count)
    opt = optax.adafactor(schedule, weight_decay_rate=decay, weight_decay_mask=mask)
  if cfg.clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt
