"""Checkpoints in and out of decoderjax model directories: Hugging Face folders (config.json,
safetensors, tokenizer) and GGUF files in, Hugging Face folders out. Each output is written to a
temporary folder beside it and renamed into place only when complete."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from decoderjax.checkpoints import gguf_io, hf_weights, modeldir
from decoderjax.checkpoints import hf_config as hfconfig
from decoderjax.data.tokenizer import HFTokenizer, SentencePieceTokenizer
from decoderjax.runtime.progress import Progress


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def hf_tokenizer(directory: str, hf_config: dict, tokenizer_dir: str | None = None):
  """The checkpoint's tokenizer with its EOS/BOS ids, from tokenizer.json or tokenizer.model
  (in `tokenizer_dir` when given: a checkpoint saved without its tokenizer)."""
  gen = _read_json(os.path.join(directory, "generation_config.json"))
  eos = gen.get("eos_token_id", hf_config.get("eos_token_id"))
  eos = eos[0] if isinstance(eos, list) else eos
  bos = gen.get("bos_token_id", hf_config.get("bos_token_id"))
  where = tokenizer_dir or directory
  if os.path.exists(os.path.join(where, "tokenizer.json")):
    with open(os.path.join(where, "tokenizer.json")) as f:
      return HFTokenizer(f.read(), eos, bos)
  if os.path.exists(os.path.join(where, "tokenizer.model")):
    return SentencePieceTokenizer.from_file(os.path.join(where, "tokenizer.model"))
  if tokenizer_dir:
    raise FileNotFoundError(f"--tokenizer={tokenizer_dir}: no tokenizer.json or tokenizer.model")
  raise FileNotFoundError(
    f"{directory}: no tokenizer.json or tokenizer.model (saved without its tokenizer? give "
    "--tokenizer=DIR, the tokenizer's folder or the original model's)"
  )


def generation_defaults(directory: str, tokenizer_dir: str | None = None) -> dict:
  """Sampling defaults and the chat template the checkpoint (or its tokenizer folder) ships."""
  gen = _read_json(os.path.join(directory, "generation_config.json"))
  keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")
  values = {k: gen[k] for k in keys if gen.get(k) is not None}
  eos = gen.get("eos_token_id")
  if isinstance(eos, list) and len(eos) > 1:  # e.g. Llama 3: end of text and end of turn
    values["stop_ids"] = [int(e) for e in eos]
  if gen.get("do_sample") is False:
    values["temperature"] = 0.0
  template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
  if not template and tokenizer_dir:
    template = _read_json(os.path.join(tokenizer_dir, "tokenizer_config.json")).get("chat_template")
  if template:
    values["chat_template"] = template
  return values


class _LayerBar(Progress):
  """Conversion's bar: layers read of the layers the checkpoint turns out to have."""

  def __init__(self, source: str):
    super().__init__(0, f"convert {os.path.basename(source.rstrip('/'))}", "layers")

  def __call__(self, done: int, total: int) -> None:
    self.total = total
    self.update(done)


def convert_hf(source: str, output: str, dtype: str = "float32", tokenizer: str | None = None):
  """A Hugging Face folder -> a model directory; `tokenizer`: where its tokenizer files are,
  when not beside the weights."""
  config_path = os.path.join(source, "config.json")
  hf_config = _read_json(config_path)
  if not hf_config:
    raise FileNotFoundError(f"{source}: no config.json")
  multimodal = hf_config.get("model_type") in hfconfig.MULTIMODAL
  hf_config = hfconfig.text_config(hf_config, config_path)  # a multimodal model's text model
  cfg = hfconfig.config_from_hf(hf_config, config_path).replace(param_dtype=dtype, dtype=dtype)
  if tokenizer and not os.path.isdir(tokenizer):
    raise FileNotFoundError(f"--tokenizer={tokenizer} is not a folder")
  tok = hf_tokenizer(source, hf_config, tokenizer)
  reader = hf_weights.open_checkpoint(source)
  if multimodal:
    reader = hf_weights.TextModelReader(reader)
  bar = _LayerBar(source)
  params = hf_weights.params_from_hf(
    reader, cfg, hf_config["model_type"], jax.numpy.dtype(dtype), bar
  )
  bar.close()
  generation = generation_defaults(source, tokenizer)
  extra = {"hf_architecture": hf_config["model_type"]}
  write_model_dir(source, output, cfg, params, tok, generation, extra)


def convert_gguf(source: str, output: str, dtype: str = "float32") -> None:
  bar = _LayerBar(source)
  cfg, params, tokenizer, generation, arch = gguf_io.read_gguf(source, dtype=dtype, progress=bar)
  bar.close()
  write_model_dir(source, output, cfg, params, tokenizer, generation, {"hf_architecture": arch})


def pad_vocab(cfg, params):
  """Token tables padded with zero rows to a multiple of VOCAB_MULTIPLE (GPT-2's 50257 ids
  split over no tensor axis), the padding masked out of the logits -> (config, params)."""
  padded = cfg.padded_vocab()
  extra = padded.vocab_size - cfg.vocab_size
  if not extra:
    return cfg, params
  params = {**params, "embedding": np.pad(params["embedding"], ((0, extra), (0, 0)))}
  if "head" in params:
    params["head"] = np.pad(params["head"], ((0, 0), (0, extra)))
  return padded, params


def unpad_vocab(cfg, params):
  """The tables without their padding rows, as other frameworks expect them."""
  if not cfg.vocab_pad:
    return cfg, params
  v = cfg.real_vocab
  params = {**params, "embedding": params["embedding"][:v]}
  if "head" in params:
    params["head"] = params["head"][:, :v]
  return cfg.replace(vocab_size=v, vocab_pad=0), params


def write_model_dir(source, output, cfg, params, tokenizer, generation, extra=None) -> None:
  """Checks shapes against the config, pads the vocabulary, then writes via a temporary folder
  and a rename (`extra`: more config.json entries)."""
  modeldir.check_shapes(params, modeldir.abstract_params(cfg), source)
  cfg, params = pad_vocab(cfg, params)
  with modeldir.staged(output) as staging:
    modeldir.save_model_dir(staging, cfg, params, tokenizer, generation, extra)


def export_hf(source: str, output: str) -> None:
  """A model directory -> a Hugging Face folder `transformers` loads (safetensors, float32)."""
  from safetensors.numpy import save_file

  model = modeldir.load_model_dir(source)  # LoRA adapters merged
  cfg, tok = model.config, model.tokenizer
  unexportable = {
    "a classifier": cfg.num_labels,
    "a prompt-tuned model": cfg.prompt_tokens,
    f"an {cfg.quant} model (export the float model it was quantized from)": cfg.quant != "none",
    "a cross-attention (seq2seq) model": cfg.cross_attention,
  }
  for kind, applies in unexportable.items():
    if applies:
      raise ValueError(f"{source}: {kind} has no Hugging Face causal-LM form")
  if tok.kind not in ("hf", "sentencepiece"):
    raise ValueError(
      f"{source}: a {tok.kind!r} tokenizer has no Hugging Face form (hf, sentencepiece)"
    )
  cfg, params = unpad_vocab(cfg, jax.tree.map(np.asarray, model.params))
  config = hfconfig.config_to_hf(cfg, prefer=model.metadata.get("hf_architecture"))
  config.update(torch_dtype="float32", eos_token_id=tok.eos_id, bos_token_id=tok.bos_id)
  tensors = hf_weights.params_to_hf(params, cfg, config["model_type"])
  with modeldir.staged(output) as staging:
    save_file(tensors, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(staging, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    gen = {"eos_token_id": tok.eos_id, "bos_token_id": tok.bos_id}
    if model.generation.get("temperature", 0) > 0:
      gen.update(do_sample=True, temperature=model.generation["temperature"])
    with open(os.path.join(staging, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    tok._save_files(staging)  # tokenizer.json or tokenizer.model, the names HF uses too
    tok_config = {
      f"{name}_token": tok.token_text(token_id)
      for name, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id))
      if token_id is not None
    }  # transformers' tokenizers learn their special tokens from here, not config.json
    if model.generation.get("chat_template"):
      tok_config["chat_template"] = model.generation["chat_template"]
    with open(os.path.join(staging, "tokenizer_config.json"), "w") as f:
      json.dump(tok_config, f, indent=2)
