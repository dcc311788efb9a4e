"""LoRA adapters in the Hugging Face `peft` format: adapter_config.json + adapter_model.safetensors.

`export_peft` writes a decoderjax LoRA directory (a fine-tune's workdir, or its standalone copy)
as a peft adapter that `peft.PeftModel.from_pretrained` loads onto the base model exported by
`convert --to=hf`; `import_peft` reads a peft adapter as a decoderjax adapter directory over a
base model directory (converted from the same Hugging Face model), which every tool then loads
like an adapter trained here.

The update is the same on both sides: W x + (alpha / r) B A x with peft's A [r, in], B [out, r],
and ours x A B with A [*in, r], B [r, *out] (a head's N x H dims flattened as Hugging Face
flattens them).
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np

from decoderjax.checkpoints import hf_weights, modeldir
from decoderjax.data.tokenizer import load_tokenizer
from decoderjax.model import adapters
from decoderjax.model.config import ModelConfig
from decoderjax.model.layout import stack_layers, unstack_layers

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# The Llama-shaped families' projections, read off the checkpoint table: Hugging Face module
# name ("q_proj") -> (its path in a layer, "self_attn.q_proj"; our block and name, "attn", "q").
MODULES = {
  t.hf.split(".")[1]: (t.hf.removesuffix(".weight"), *t.ours[0].split("/"))
  for t in hf_weights.LLAMA_LAYER
  if t.layout in ("heads_in", "heads_out", "linear")
}
OURS = {name: module for module, (_, _, name) in MODULES.items()}
BY_PATH = {path: module for module, (path, _, _) in MODULES.items()}
FUSED_ARCHITECTURES = ("gpt2", "phi3")  # q/k/v (and gate/up) stored as one matrix
_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")


def _hf_name(layer: int, target: str, which: str) -> str:
  return f"base_model.model.model.layers.{layer}.{MODULES[OURS[target]][0]}.lora_{which}.weight"


def _check_architecture(meta: dict, where: str) -> None:
  arch = meta.get("hf_architecture") or ""
  if arch in FUSED_ARCHITECTURES or meta["model"].position == "learned":
    raise ValueError(
      f"{where}: peft adapters of {arch or 'GPT-2'}-shaped models (fused projections) are not "
      "supported; Llama-shaped families are (Llama, Mistral, Qwen, Gemma, OLMo 2)"
    )


def _per_layer(lora: dict, cfg: ModelConfig) -> dict:
  """An adapter tree as per-layer "layers_i" trees, scanned or not."""
  return unstack_layers(lora, cfg.num_layers) if cfg.scan_layers else lora


def export_peft(source: str, output: str) -> None:
  """A LoRA adapter directory -> a peft adapter folder (adapter_config.json, safetensors)."""
  from safetensors.numpy import save_file

  meta = modeldir.read_metadata(source)
  if meta.get("method") != "lora":
    raise ValueError(f"{source}: not a LoRA adapter directory (finetune.method=lora makes one)")
  base_meta = modeldir.read_metadata(meta["base"])
  _check_architecture({**base_meta, "model": meta["model"]}, source)
  cfg = meta["model"]
  if cfg.num_labels or cfg.prompt_tokens or cfg.cross_attention:
    raise ValueError(
      f"{source}: a classifier, prompt-tuned or cross-attention model has no peft LoRA form"
    )
  params = modeldir.load_model_dir(source, merge_lora=False).params
  layers = _per_layer(adapters.split_trainable(params, "lora")[0], cfg)
  tensors, r = {}, cfg.lora_rank
  for i in range(cfg.num_layers):
    for leaves in layers[f"layers_{i}"].values():
      for name, value in leaves.items():
        target, which = name.split("_lora_")
        value = np.asarray(value, np.float32)
        # ours A [*in, r] -> peft A [r, in]; ours B [r, *out] -> peft B [out, r]
        flat = value.reshape(-1, r) if which == "a" else value.reshape(r, -1)
        tensors[_hf_name(i, target, which.upper())] = np.ascontiguousarray(flat.T)
  config = {
    "peft_type": "LORA",
    "task_type": "CAUSAL_LM",
    "r": cfg.lora_rank,
    "lora_alpha": cfg.lora_alpha,
    "lora_dropout": cfg.lora_dropout,
    "target_modules": sorted(OURS[t] for t in cfg.lora_target_set),
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "modules_to_save": None,
    "inference_mode": True,
    "base_model_name_or_path": os.path.abspath(meta["base"]),
  }
  with modeldir.staged(output) as staging:
    save_file(tensors, os.path.join(staging, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(staging, CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)


def _adapter_config(source: str) -> dict:
  path = os.path.join(source, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{source}: no {CONFIG_FILE} (not a peft adapter folder)")
  with open(path) as f:
    config = json.load(f)
  unsupported = {
    "peft_type": config.get("peft_type") != "LORA",
    "bias": config.get("bias", "none") != "none",
    "modules_to_save": bool(config.get("modules_to_save")),
    "rank_pattern": bool(config.get("rank_pattern")),
    "alpha_pattern": bool(config.get("alpha_pattern")),
    "layers_to_transform": config.get("layers_to_transform") is not None,
    "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
    "use_dora": bool(config.get("use_dora")),
  }
  bad = [f"{k}={config.get(k)!r}" for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(
      f"{path}: {', '.join(bad)} not supported (plain LoRA: peft_type LORA, bias none, no "
      "per-module ranks, no saved modules)"
    )
  targets = config.get("target_modules")
  if isinstance(targets, str) or not targets:
    raise ValueError(f"{path}: target_modules must list module names, got {targets!r}")
  unknown = sorted(set(targets) - set(MODULES))
  if unknown:
    raise ValueError(f"{path}: target module(s) {unknown} not supported; supported {list(MODULES)}")
  return config


def import_peft(source: str, base: str, output: str) -> None:
  """A peft LoRA adapter folder over base model directory `base` -> a decoderjax adapter
  directory (only the adapters' parameters; `base` is read wherever it is loaded)."""
  from safetensors.numpy import load_file

  config = _adapter_config(source)
  base_meta = modeldir.read_metadata(base)
  _check_architecture(base_meta, base)
  r, alpha = int(config["r"]), float(config["lora_alpha"])
  if config.get("use_rslora"):  # scale alpha / sqrt(r), ours alpha / r
    alpha *= math.sqrt(r)
  targets = [MODULES[t][2] for t in sorted(config["target_modules"], key=list(MODULES).index)]
  cfg = base_meta["model"].replace(
    lora_rank=r,
    lora_alpha=alpha,
    lora_dropout=float(config.get("lora_dropout", 0.0)),
    lora_targets=",".join(targets),
  )
  weights_path = os.path.join(source, WEIGHTS_FILE)
  if not os.path.exists(weights_path):
    raise FileNotFoundError(f"{source}: no {WEIGHTS_FILE}")
  tensors = load_file(weights_path)
  expected = _layer_shapes(cfg)
  found = {}
  for name, value in tensors.items():
    match = _NAME.fullmatch(name)
    if not match or match[2] not in BY_PATH:
      raise ValueError(f"{weights_path}: unexpected tensor {name!r}")
    _, block, target = MODULES[BY_PATH[match[2]]]
    layer, which = int(match[1]), match[3].lower()
    if target not in targets or layer >= cfg.num_layers:
      raise ValueError(f"{weights_path}: {name!r} is outside the adapter's targets or layers")
    shape = expected[(block, f"{target}_lora_{which}")]
    # peft A [r, in] -> ours [*in, r]; peft B [out, r] -> ours [r, *out]
    peft_shape = (r, math.prod(shape[:-1])) if which == "a" else (math.prod(shape[1:]), r)
    if tuple(value.shape) != peft_shape:
      raise ValueError(
        f"{weights_path}: {name!r} has shape {tuple(value.shape)}, the base model {base} "
        f"implies {peft_shape} (is it the adapter's base model?)"
      )
    found[(layer, block, f"{target}_lora_{which}")] = value.T.reshape(shape).astype(np.float32)
  missing = len(expected) * cfg.num_layers - len(found)
  if missing:
    raise ValueError(f"{weights_path}: {missing} LoRA tensor(s) missing of {cfg.num_layers} layers")
  layers = {f"layers_{i}": {} for i in range(cfg.num_layers)}
  for (i, block, name), value in found.items():
    layers[f"layers_{i}"].setdefault(block, {})[name] = value
  params = stack_layers(layers, cfg.num_layers) if cfg.scan_layers else layers
  tokenizer = load_tokenizer(os.path.join(base, modeldir.TOKENIZER_DIR))
  extra = {"base": os.path.abspath(base), "method": "lora"}
  extra["hf_architecture"] = base_meta.get("hf_architecture")
  with modeldir.staged(output) as staging:
    modeldir.write_metadata(staging, cfg, tokenizer, modeldir.read_generation(base), extra)
    modeldir.save_params(staging, params)


def _layer_shapes(cfg: ModelConfig) -> dict:
  """(block, leaf name) -> one layer's shape, of every adapter leaf `cfg`'s model has."""
  lora, _ = adapters.split_trainable(modeldir.abstract_params(cfg), "lora")
  layer, lead = (lora["layers"], 1) if cfg.scan_layers else (lora["layers_0"], 0)
  return {(b, name): s.shape[lead:] for b, leaves in layer.items() for name, s in leaves.items()}
