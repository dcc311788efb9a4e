"""Token-level augmentation of training windows (span masking, noise), applied per step."""

from __future__ import annotations

import functools

import numpy as np

from decoderjax.data.data_config import DataConfig
from decoderjax.data.tokenizer import Tokenizer

AUGMENTATIONS = ("token_dropout", "random_replace", "span_mask")


def check_augmentation(cfg: DataConfig) -> None:
  for name in AUGMENTATIONS:
    p = getattr(cfg, name)
    if not 0 <= p < 1:
      raise ValueError(f"data.{name} must be in [0, 1), got {p}")
  if cfg.span_mask and cfg.span_length < 1:
    raise ValueError(f"data.span_length must be >= 1, got {cfg.span_length}")


def augment(
  inputs_BT: np.ndarray,
  segment_ids_BT: np.ndarray,
  rng: np.random.Generator,
  cfg: DataConfig,
  vocab_size: int,
  mask_id: int,
) -> np.ndarray:
  """Noised inputs: token dropout, random replacement, then span masking, on real tokens only."""
  check_augmentation(cfg)
  real_BT = segment_ids_BT != 0
  out_BT = inputs_BT.copy()
  if cfg.token_dropout:
    out_BT[real_BT & (rng.random(out_BT.shape) < cfg.token_dropout)] = mask_id
  if cfg.random_replace:
    replace_BT = real_BT & (rng.random(out_BT.shape) < cfg.random_replace)
    out_BT[replace_BT] = rng.integers(0, vocab_size, int(replace_BT.sum()))
  if cfg.span_mask:
    out_BT[real_BT & _spans(out_BT.shape, rng, cfg.span_mask, cfg.span_length)] = mask_id
  return out_BT


def _spans(shape, rng, p: float, mean_length: int) -> np.ndarray:
  """[B, T] mask of spans: one starts at each position with probability p, geometric lengths."""
  b, t = shape
  rows, starts = np.nonzero(rng.random(shape) < p)
  ends = np.minimum(starts + rng.geometric(1 / mean_length, len(starts)), t)
  edges_BT = np.zeros((b, t + 1), np.int32)
  np.add.at(edges_BT, (rows, starts), 1)
  np.add.at(edges_BT, (rows, ends), -1)
  return np.cumsum(edges_BT[:, :t], axis=1) > 0


def augmenter(cfg: DataConfig, tokenizer: Tokenizer):
  """`noise(inputs_BT, segment_ids_BT, rng) -> inputs_BT` as the config asks; None when off."""
  if not any(getattr(cfg, name) for name in AUGMENTATIONS):
    return None
  check_augmentation(cfg)
  mask_id = 0 if tokenizer.eos_id is None else tokenizer.eos_id
  return functools.partial(augment, cfg=cfg, vocab_size=tokenizer.vocab_size, mask_id=mask_id)


def add_noise(batch: dict, noise, seed: int, step: int, global_rows) -> dict:
  """Augments each row from (seed, step, its row of the global batch): hosts agree."""
  if noise is None:
    return batch
  for r, row in enumerate(global_rows):
    rng = np.random.default_rng([seed, step, row])
    one = slice(r, r + 1)
    batch["inputs"][one] = noise(batch["inputs"][one], batch["segment_ids"][one], rng)
  return batch
