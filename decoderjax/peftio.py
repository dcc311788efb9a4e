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

from decoderjax import modeldir
from decoderjax.config import ModelConfig
from decoderjax.tokenizer import load_tokenizer

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# Hugging Face module name -> (our block, our projection), for the Llama-shaped families.
MODULES = {
  "q_proj": ("attn", "q"), "k_proj": ("attn", "k"), "v_proj": ("attn", "v"),
  "o_proj": ("attn", "o"), "gate_proj": ("mlp", "gate"), "up_proj": ("mlp", "up"),
  "down_proj": ("mlp", "down"),
}  # fmt: skip
OURS = {ours: hf for hf, (_, ours) in MODULES.items()}
FUSED_ARCHITECTURES = ("gpt2", "phi3")  # q/k/v (and gate/up) stored as one matrix
_NAME = re.compile(r"(?:.*\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


def _hf_name(layer: int, target: str, which: str) -> str:
  block = "self_attn" if MODULES[OURS[target]][0] == "attn" else "mlp"
  return f"base_model.model.model.layers.{layer}.{block}.{OURS[target]}.lora_{which}.weight"


def _check_architecture(meta: dict, where: str) -> None:
  arch = meta.get("hf_architecture") or ""
  if arch in FUSED_ARCHITECTURES or meta["model"].position == "learned":
    raise ValueError(
      f"{where}: peft adapters of {arch or 'GPT-2'}-shaped models (fused projections) are not "
      "supported; Llama-shaped families are (Llama, Mistral, Qwen, Gemma, OLMo 2)"
    )


def _layer_arrays(params: dict, cfg: ModelConfig):
  """(layer, block, projection name, array) of every LoRA leaf, per layer."""
  for i in range(cfg.num_layers):
    layer = (
      {k: {n: np.asarray(v[i]) for n, v in b.items()} for k, b in params["layers"].items()}
      if cfg.scan_layers
      else params[f"layers_{i}"]
    )
    for block in ("attn", "mlp"):
      for name, value in layer.get(block, {}).items():
        if "_lora_" in name:
          yield i, name, np.asarray(value, np.float32)


def export_peft(source: str, output: str) -> None:
  """A LoRA adapter directory -> a peft adapter folder (adapter_config.json, safetensors)."""
  from safetensors.numpy import save_file

  meta = modeldir.read_metadata(source)
  if meta.get("method") != "lora":
    raise ValueError(f"{source}: not a LoRA adapter directory (finetune.method=lora makes one)")
  base_meta = modeldir.read_metadata(meta["base"])
  _check_architecture({**base_meta, "model": meta["model"]}, source)
  cfg = meta["model"]
  if cfg.num_labels or cfg.prompt_tokens:
    raise ValueError(f"{source}: a classifier or prompt-tuned model has no peft LoRA form")
  params = modeldir.load_model_dir(source, merge_lora=False).params
  tensors = {}
  for i, name, value in _layer_arrays(params, cfg):
    target, which = name.split("_lora_")
    r = cfg.lora_rank
    if which == "a":  # ours [*in, r] -> peft A [r, in]
      tensors[_hf_name(i, target, "A")] = np.ascontiguousarray(value.reshape(-1, r).T)
    else:  # ours [r, *out] -> peft B [out, r]
      tensors[_hf_name(i, target, "B")] = np.ascontiguousarray(value.reshape(r, -1).T)
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
  targets = [MODULES[t][1] for t in sorted(config["target_modules"], key=list(MODULES).index)]
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
  expected = _lora_shapes(cfg)
  found = {}
  for name, value in tensors.items():
    match = _NAME.fullmatch(name)
    if not match or match[2] not in MODULES:
      raise ValueError(f"{weights_path}: unexpected tensor {name!r}")
    layer, target, which = int(match[1]), MODULES[match[2]][1], match[3].lower()
    if target not in targets or layer >= cfg.num_layers:
      raise ValueError(f"{weights_path}: {name!r} is outside the adapter's targets or layers")
    block, shape = expected[(target, which)]
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
  params = _tree(found, cfg)
  tokenizer = load_tokenizer(os.path.join(base, modeldir.TOKENIZER_DIR))
  extra = {"base": os.path.abspath(base), "method": "lora"}
  extra["hf_architecture"] = base_meta.get("hf_architecture")
  with modeldir.staged(output) as staging:
    modeldir.write_metadata(staging, cfg, tokenizer, modeldir.read_generation(base), extra)
    modeldir.save_params(staging, params)


def _lora_shapes(cfg: ModelConfig) -> dict:
  """(projection, a|b) -> (block, our per-layer shape) of every adapted projection."""
  d, f, h, r = cfg.embed_dim, cfg.mlp_dim, cfg.head_size, cfg.lora_rank
  ins = {"q": (d,), "k": (d,), "v": (d,), "o": (cfg.num_heads, h), "gate": (d,), "up": (d,),
         "down": (f,)}  # fmt: skip
  outs = {"q": (cfg.num_heads, h), "k": (cfg.kv_heads, h), "v": (cfg.kv_heads, h), "o": (d,),
          "gate": (f,), "up": (f,), "down": (d,)}  # fmt: skip
  shapes = {}
  for t in cfg.lora_target_set:
    block = MODULES[OURS[t]][0]
    shapes[(t, "a")] = (block, (*ins[t], r))
    shapes[(t, "b")] = (block, (r, *outs[t]))
  return shapes


def _tree(found: dict, cfg: ModelConfig) -> dict:
  """Our adapter tree: per-layer arrays stacked on a leading axis when the model scans."""
  layers = [{} for _ in range(cfg.num_layers)]
  for (i, block, name), value in found.items():
    layers[i].setdefault(block, {})[name] = value
  if not cfg.scan_layers:
    return {f"layers_{i}": layer for i, layer in enumerate(layers)}
  stacked = {
    block: {name: np.stack([layer[block][name] for layer in layers]) for name in names}
    for block, names in layers[0].items()
  }
  return {"layers": stacked}
