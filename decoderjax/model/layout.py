"""Parameter layouts: stacked over layers (training, scanned) or one tree per layer, and for
generation on CPU, projection weights stored [out, in]."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from decoderjax.model import int_weights, paths
from decoderjax.model.config import ModelConfig
from decoderjax.runtime import hostmem

# Where float32 generation contracts few rows weight-first (layers.contract_out_in), with
# projection weights stored [out, in] (`for_generation`): XLA CPU's kernels read them faster so.
OUT_IN_BACKENDS = ("cpu",)


def unstack_layers(params: dict, num_layers: int, consume: bool = False) -> dict:
  """Scanned params (one 'layers' tree with a leading L axis) -> per-layer 'layers_i' trees.

  `consume` deletes each stacked array once it is split, so the peak is the weights plus one
  array rather than two copies of the layers."""
  params = dict(params)
  leaves, treedef = jax.tree.flatten(params.pop("layers"))
  per_layer = [[] for _ in range(num_layers)]
  for leaf in leaves:
    slices = [leaf[i] for i in range(num_layers)]
    for layer, piece in zip(per_layer, slices, strict=True):
      layer.append(piece)
    if consume and isinstance(leaf, jax.Array):
      jax.block_until_ready(slices)  # every slice read, then the stacked array goes
      leaf.delete()
  for i, layer in enumerate(per_layer):
    params[f"layers_{i}"] = jax.tree.unflatten(treedef, layer)
  return params


def for_generation(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """(params, config) in the layout generation reads fastest: one array per layer and, for
  float32 on CPU, projection weights stored [out, in] (`weights_out_in`).

  Decoding a scanned model slices each layer's weights out of the stacked arrays at every step,
  which XLA CPU does by copying them (benchmarks/NOTES.md, "Stacked weights copied every step");
  MaxText likewise decodes from unscanned checkpoints. The price on CPU is compile time (one
  compiled body per layer, `switched_layers`). Consumes `params` when it converts them.
  """
  if cfg.scan_layers:
    params = unstack_layers(params, cfg.num_layers, consume=True)
    cfg = cfg.replace(scan_layers=False)
  if cfg.weights_out_in or cfg.quant != "none" or not out_in_applies(cfg):
    return params, cfg
  params = transpose_projections(params, cfg.num_layers)
  hostmem.release_freed_memory()  # the originals, freed piecemeal, would stay resident
  return params, cfg.replace(weights_out_in=True)


def out_in_applies(cfg: ModelConfig) -> bool:
  """Weight-first contraction helps float32 matmuls (quantized weights dequantize to float32);
  bfloat16 decoding measured no faster with it."""
  return jax.default_backend() in OUT_IN_BACKENDS and cfg.dtype == "float32"


def transpose_projections(params: dict, num_layers: int) -> dict:
  """Per-layer params with each projection weight [*in, *out] moved to [*out, *in], each
  stored array deleted once its transpose is made (the peak is the weights plus one)."""
  params = dict(params)
  for i in range(num_layers):

    def move(path, w):  # quant.QUANTIZED names every projection, with the dims after its inputs
      keep = int_weights.QUANTIZED.get(paths.leaf_name(path))
      if keep is None:
        return w
      n = int_weights.input_dims(w.ndim, keep)[1]  # inputs lead: [*in, *out]
      moved = jnp.transpose(w, (*range(n, w.ndim), *range(n))).block_until_ready()
      if isinstance(w, jax.Array):
        w.delete()
      return moved

    params[f"layers_{i}"] = jax.tree_util.tree_map_with_path(move, params[f"layers_{i}"])
  return params


def stack_layers(params: dict, num_layers: int) -> dict:
  """Per-layer 'layers_i' trees -> one scanned 'layers' tree with a leading L axis."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params
