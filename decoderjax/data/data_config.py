"""What a run trains on: the data section of a config (sources, mixtures, tasks, lengths)."""

from __future__ import annotations

import dataclasses

import numpy as np

SOURCES = ("default", "text", "jsonl", "tfds", "prepared")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "default"  # one of SOURCES: the embedded Shakespeare, files, TFDS, prepared DIRs
  path: str = ""  # text / jsonl: files or globs (comma-separated); prepared: a prepared DIR
  eval_path: str = ""  # separate validation data; empty means split off val_fraction
  mixture: str = ""  # prepared: weighted DIRs instead of path, e.g. "DIR_A:0.7,DIR_B:0.3"
  text_field: str = "text"  # JSONL field holding the document
  tfds_name: str = ""  # e.g. "lm1b" or "tiny_shakespeare"
  tfds_split: str = "train"
  tfds_eval_split: str = ""
  tfds_data_dir: str = ""
  tokenizer: str = "char"  # char, byte, sentencepiece (spm_bpe), spm_unigram, hf
  tokenizer_path: str = ""  # an existing .model / tokenizer.json instead of training one
  vocab_size: int = 0  # for SentencePiece training
  seq_len: int = 256
  val_fraction: float = 0.1
  seed: int = 0
  # Fine-tuning tasks (tasks.py): lm (a token stream), sft (instruction tuning), classify,
  # seq2seq or preference (pairs of responses to one prompt).
  task: str = "lm"
  prompt_field: str = "prompt"  # sft: {"prompt", "completion"} records ...
  completion_field: str = "completion"
  messages_field: str = "messages"  # ... or chat {"messages": [{"role", "content"}, ...]}
  chosen_field: str = "chosen"  # preference: {"prompt", "chosen", "rejected"} texts, or chats
  rejected_field: str = "rejected"  # {"chosen": [messages], "rejected": [messages]}
  pack: bool = True  # sft, classify, preference: a batch's examples share rows, whole
  # (batch_size counts examples, or pairs, either way)
  bucket: bool = True  # sft, classify unpacked: cut each batch to a bucket length >= its longest
  label_field: str = "label"  # classify: records {"text", "label"} (JSONL or CSV)
  labels: str = ""  # classify: comma-separated label names; empty: the training data's labels
  # Text augmentation of training inputs (targets unchanged); all off by default.
  token_dropout: float = 0.0  # probability an input token becomes the mask id
  random_replace: float = 0.0  # probability an input token becomes a random token
  span_mask: float = 0.0  # probability a masked span starts at a token
  span_length: int = 3  # mean length of masked spans


def check_inputs(cfg: DataConfig) -> None:
  """Refuses a field the source will not read (it would be silently ignored otherwise)."""
  if cfg.source not in SOURCES:
    raise ValueError(f"data.source: unknown source {cfg.source!r} ({', '.join(SOURCES)})")
  reads = {
    "default": (),
    "text": ("path", "eval_path"),
    "jsonl": ("path", "eval_path"),
    "tfds": ("tfds_name", "tfds_eval_split", "tfds_data_dir"),
    "prepared": ("path", "mixture", "eval_path"),
  }[cfg.source]
  for field in ("path", "eval_path", "mixture", "tfds_name", "tfds_eval_split", "tfds_data_dir"):
    if getattr(cfg, field) and field not in reads:
      hint = {"default": "data.source=text or jsonl (files) or prepared (a prepared DIR)"}.get(
        cfg.source, f"the data.source that reads data.{field}"
      )
      raise ValueError(
        f"data.{field}={getattr(cfg, field)!r} is not read by data.source={cfg.source!r}; "
        f"set {hint}"
      )
  if cfg.source in ("text", "jsonl") and not cfg.path:
    raise ValueError(f"data.source={cfg.source!r} needs data.path=FILE_OR_GLOB")
  if cfg.source == "tfds" and not cfg.tfds_name:
    raise ValueError("data.source='tfds' needs data.tfds_name=NAME")
  if cfg.source == "prepared":
    if bool(cfg.path) == bool(cfg.mixture):
      raise ValueError("data.source='prepared' needs data.path=DIR or data.mixture=DIR:W,...")
    for field in ("tokenizer_path", "vocab_size"):
      if getattr(cfg, field):
        raise ValueError(
          f"data.{field} is not used by data.source='prepared': the prepared DIR brings its "
          "tokenizer (python -m decoderjax.prepare --tokenizer=...)"
        )


def parse_mixture(text: str) -> list[tuple[str, float]]:
  """'DIR_A:0.7,DIR_B:0.3' -> [(DIR_A, 0.7), (DIR_B, 0.3)], weights normalized to sum 1."""
  items = []
  for part in (p.strip() for p in text.split(",") if p.strip()):
    path, _, weight = part.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = float("nan")
    if not path or not np.isfinite(value) or value < 0:
      raise ValueError(f"data.mixture: {part!r} is not DIR:WEIGHT with a weight >= 0")
    items.append((path, value))
  total = sum(w for _, w in items)
  if not items or total <= 0:
    raise ValueError(f"data.mixture: {text!r} has no source with a positive weight")
  return [(p, w / total) for p, w in items]
