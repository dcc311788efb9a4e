"""Magnitude pruning of a model's projections (the binary: decoderjax.prune).

The projections of every layer (q, k, v, o, MLP up / gate / down) lose their smallest-magnitude
weights; embeddings, heads, norms and biases are kept whole.

unstructured  in each layer's matrix, the `sparsity` fraction of smallest |w| become zero.
N:M           in each output channel, of every M consecutive inputs the M - N smallest become
              zero (2:4 is what sparse tensor cores run; sparsity 1 - N/M).

A pruned model records `pruning` in its config. Fine-tuning it (method full: the recovery
fine-tune) keeps the zeros at zero: `keep_zeros` drops every update to a pruned weight that is
zero, after the optimizer, so weight decay cannot move it either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decoderjax.model import paths
from decoderjax.model.config import parse_pruning
from decoderjax.model.int_weights import group_inputs, map_weights

PRUNED = ("q", "k", "v", "o", "up", "gate", "down")


def prune_unstructured(w: np.ndarray, sparsity: float) -> np.ndarray:
  """w with its round(sparsity x size) smallest-magnitude entries set to zero."""
  count = int(round(sparsity * w.size))
  flat = np.array(w).reshape(-1)
  if count:
    flat[np.argpartition(np.abs(flat), count - 1)[:count]] = 0
  return flat.reshape(w.shape)


def prune_n_m(w: np.ndarray, keep, n: int, m: int) -> np.ndarray:
  """w with the m - n smallest of every m consecutive inputs of each channel set to zero."""
  grouped, axis = group_inputs(np.array(w), keep, m)
  order = np.argsort(np.abs(grouped), axis=axis)
  np.put_along_axis(grouped, np.take(order, np.arange(m - n), axis=axis), 0, axis=axis)
  return grouped.reshape(w.shape)


def prune_params(params: dict, stacked: bool, pattern: str, sparsity: float = 0.5) -> dict:
  """A parameter tree with its layers' projections pruned (`stacked`: leading layer axis)."""
  n_m = parse_pruning(pattern)
  if n_m is None and not 0.0 < sparsity < 1.0:
    raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")

  def prune(name, w, keep, layered, _):
    if n_m is not None:
      return {name: prune_n_m(w, keep, *n_m)}
    if layered:  # each layer's matrix on its own
      return {name: np.stack([prune_unstructured(layer, sparsity) for layer in w])}
    return {name: prune_unstructured(w, sparsity)}

  return map_weights(params, stacked, PRUNED, prune)


def sparsity_of(params) -> tuple[int, int]:
  """(zeros, size) over the prunable projections of a parameter tree."""
  zeros = size = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = paths.names(path)
    if names[0].startswith("layers") and names[-1] in PRUNED:
      zeros += int(np.sum(np.asarray(leaf) == 0))
      size += leaf.size
  return zeros, size


def pruner(pattern: str, sparsity: float):
  """`transform(model) -> (config, params)` pruning a loaded float model on the host."""

  def transform(model) -> tuple:
    cfg = model.config
    if cfg.quant != "none":
      raise ValueError(f"prune the float model, then quantize it (this one is {cfg.quant})")
    if cfg.lora_rank or cfg.prompt_tokens:
      raise ValueError("merge or drop the adapters first (python -m decoderjax.convert)")
    params = prune_params(
      jax.tree.map(np.asarray, model.params), cfg.scan_layers, pattern, sparsity
    )
    return cfg.replace(pruning=pattern), params

  return transform


def keep_zeros() -> optax.GradientTransformation:
  """Drops updates to pruned weights that are zero (chained after the optimizer)."""

  def keep(path, update, param):
    names = paths.names(path)
    if names[0].startswith("layers") and names[-1] in PRUNED:
      return jnp.where(param == 0, jnp.zeros_like(update), update)
    return update

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("keep_zeros needs the parameters")
    return jax.tree_util.tree_map_with_path(keep, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
