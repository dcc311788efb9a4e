"""Input pipeline: text sources -> tokens (cached) -> packed fixed-length batches.

Documents are tokenized once, joined with EOS into one stream (cached as .npy), split into
train and validation, and cut into windows of `seq_len + 1` tokens. Each window carries segment
ids (one per document) and positions that restart per document, so packed documents never see
each other. The batch of step `s` is a pure function of (seed, s): resuming from a checkpoint's
step resumes the input pipeline exactly, with no iterator state to lose.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os

import numpy as np

from decoderjax import corpus
from decoderjax.tokenizer import Tokenizer, build_tokenizer


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "default"  # default (embedded Shakespeare), text, jsonl, tfds
  path: str = ""  # file or glob for text / jsonl sources
  eval_path: str = ""  # separate validation data; empty means split off val_fraction
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
  # Fine-tuning tasks (tasks.py): lm (a token stream), sft (instruction tuning) or classify.
  task: str = "lm"
  prompt_field: str = "prompt"  # sft: {"prompt", "completion"} records ...
  completion_field: str = "completion"
  messages_field: str = "messages"  # ... or chat {"messages": [{"role", "content"}, ...]}
  pack: bool = True  # sft: several whole examples per row (never split across rows)
  label_field: str = "label"  # classify: records {"text", "label"} (JSONL or CSV)
  labels: str = ""  # classify: comma-separated label names; empty: the training data's labels
  # Text augmentation of training inputs (targets unchanged); all off by default.
  token_dropout: float = 0.0  # probability an input token becomes the mask id
  random_replace: float = 0.0  # probability an input token becomes a random token
  span_mask: float = 0.0  # probability a masked span starts at a token
  span_length: int = 3  # mean length of masked spans


def _read_files(pattern: str, field: str) -> list[str]:
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise FileNotFoundError(f"data.path: no file matches {pattern!r}")
  docs = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      if path.endswith((".jsonl", ".json")) or field != "text" and not path.endswith(".txt"):
        for n, line in enumerate(f, 1):
          if line.strip():
            record = json.loads(line)
            if field not in record:
              raise ValueError(f"{path}:{n}: JSON record has no field {field!r}")
            docs.append(str(record[field]))
      else:
        docs.append(f.read())
  if not any(d.strip() for d in docs):
    raise ValueError(f"data.path: {pattern!r} holds no text")
  return docs


def _read_tfds(cfg: DataConfig, split: str) -> list[str]:
  try:
    import tensorflow_datasets as tfds
  except ImportError:
    raise ImportError("data.source='tfds' needs `pip install decoderjax[tfds]`") from None
  ds = tfds.load(cfg.tfds_name, split=split, data_dir=cfg.tfds_data_dir or None)
  return [ex[cfg.text_field].decode("utf-8") for ex in tfds.as_numpy(ds)]


def read_documents(cfg: DataConfig) -> tuple[list[str], list[str] | None]:
  """(train documents, validation documents or None to split them off the train stream)."""
  if cfg.source == "default":
    return [_read_files(p, "text")[0] for p in corpus.shakespeare_files()], None
  if cfg.source in ("text", "jsonl"):
    if not cfg.path:
      raise ValueError(f"data.source={cfg.source!r} needs data.path=FILE_OR_GLOB")
    train = _read_files(cfg.path, cfg.text_field)
    return train, _read_files(cfg.eval_path, cfg.text_field) if cfg.eval_path else None
  if cfg.source == "tfds":
    train = _read_tfds(cfg, cfg.tfds_split)
    return train, _read_tfds(cfg, cfg.tfds_eval_split) if cfg.tfds_eval_split else None
  raise ValueError(f"data.source: unknown source {cfg.source!r} (default, text, jsonl, tfds)")


def tokenize_stream(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
  """One int32 stream: each document's tokens followed by EOS."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  return np.fromiter((t for d in docs for t in tokenizer.encode(d) + eos), dtype=np.int32)


@dataclasses.dataclass
class Dataset:
  """A token stream split into training and validation tokens (the "lm" task)."""

  tokenizer: Tokenizer
  train_tokens: np.ndarray
  val_tokens: np.ndarray
  config: DataConfig
  task: str = "lm"
  label_names: list[str] | None = None

  def train_batches(self, batch_size: int, seed: int, rows: slice | None = None) -> Batches:
    eos, noise = self.tokenizer.eos_id, augmenter(self.config, self.tokenizer)
    return Batches(self.train_tokens, self.config.seq_len, batch_size, seed, eos, rows, noise)

  def eval_batches(self, batch_size: int, max_batches: int = 0):
    eos = self.tokenizer.eos_id
    return eval_batches(self.val_tokens, self.config.seq_len, batch_size, eos, max_batches)

  def describe(self) -> str:
    return f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens"


def load_dataset(cfg: DataConfig, cache_dir: str, tokenizer: Tokenizer | None = None) -> Dataset:
  """Reads, tokenizes (cached in `cache_dir`) and splits the data a config names."""
  train_docs, val_docs = read_documents(cfg)
  if tokenizer is None:
    tokenizer = build_tokenizer(cfg.tokenizer, train_docs, cfg.vocab_size, cfg.tokenizer_path)
  key = hashlib.sha256()
  for doc in train_docs + (val_docs or []):
    key.update(hashlib.sha256(doc.encode()).digest())
  key.update(json.dumps([tokenizer.kind, tokenizer.vocab_size, repr(tokenizer._config())]).encode())
  path = os.path.join(cache_dir, f"tokens-{key.hexdigest()[:16]}.npz")
  if os.path.exists(path):
    with np.load(path) as cached:
      train, val = cached["train"], cached["val"]
  else:
    train = tokenize_stream(train_docs, tokenizer)
    if val_docs is None:
      cut = int(len(train) * (1 - cfg.val_fraction))
      train, val = train[:cut], train[cut:]
    else:
      val = tokenize_stream(val_docs, tokenizer)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.npz"  # hosts sharing a filesystem write side by side
    np.savez(tmp, train=train, val=val)
    os.replace(tmp, path)
  for name, tokens in (("training", train), ("validation", val)):
    if len(tokens) < cfg.seq_len + 1:
      raise ValueError(
        f"the {name} split has {len(tokens)} tokens, "
        f"fewer than data.seq_len + 1 = {cfg.seq_len + 1}"
      )
  return Dataset(tokenizer, train, val, cfg)


# Augmentation of training inputs (any task).

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


def pack_window(window: np.ndarray, eos_id: int | None) -> dict[str, np.ndarray]:
  """Windows [B, T + 1] -> inputs, targets, segment ids, positions and loss weights [B, T]."""
  inputs, targets = window[:, :-1], window[:, 1:]
  b, t = inputs.shape
  if eos_id is None:
    segments = np.ones((b, t), np.int32)
  else:  # a new document starts after each EOS
    after_eos = np.concatenate([np.zeros((b, 1), bool), inputs[:, :-1] == eos_id], axis=1)
    segments = np.cumsum(after_eos, axis=1, dtype=np.int32) + 1
  starts = np.concatenate([np.ones((b, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
  first = np.maximum.accumulate(np.where(starts, np.arange(t), 0), axis=1)
  # The EOS input's target is the next document's first token: nothing to learn there.
  weights = np.ones((b, t), np.float32) if eos_id is None else (inputs != eos_id).astype(np.float32)
  return {
    "inputs": inputs.astype(np.int32),
    "targets": targets.astype(np.int32),
    "segment_ids": segments,
    "positions": (np.arange(t) - first).astype(np.int32),
    "weights": weights,
  }


class Batches:
  """Deterministic training batches: batch(step) is a function of (seed, step) alone.

  Each epoch cuts the stream into windows at a fresh random offset and visits them in a fresh
  random order. `rows` selects this host's rows of the global batch.
  """

  def __init__(
    self, tokens, seq_len, batch_size, seed, eos_id, rows: slice | None = None, noise=None
  ):
    self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
    self.seed, self.eos_id, self.noise = seed, eos_id, noise
    self.rows = rows or slice(0, batch_size)  # this host's rows of the global batch
    self.windows_per_epoch = (len(tokens) - 1 - seq_len) // seq_len  # leaves room for any offset
    self._orders = {}  # the permutations of the current and previous epoch

  def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
    rng = np.random.default_rng([self.seed, epoch])
    return int(rng.integers(self.seq_len)), rng.permutation(self.windows_per_epoch)

  def example_indices(self, step: int) -> list[tuple[int, int]]:
    first = step * self.batch_size
    return [divmod(i, self.windows_per_epoch) for i in range(first, first + self.batch_size)]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    starts = []
    for epoch, i in self.example_indices(step)[self.rows]:
      if epoch not in self._orders:
        self._orders = {epoch: self._epoch_order(epoch), **dict(list(self._orders.items())[-1:])}
      offset, order = self._orders[epoch]
      starts.append(offset + order[i] * self.seq_len)
    window = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts])
    batch = pack_window(window, self.eos_id)
    return add_noise(batch, self.noise, self.seed, step, range(self.batch_size)[self.rows])


def eval_batches(tokens, seq_len, batch_size, eos_id, max_batches=0):
  """Consecutive validation windows (the whole split unless `max_batches` caps it)."""
  n = (len(tokens) - 1) // seq_len
  starts = np.arange(n) * seq_len
  if max_batches:
    starts = starts[: max_batches * batch_size]
  for i in range(0, len(starts), batch_size):
    chunk = starts[i : i + batch_size]
    real = len(chunk)
    chunk = np.pad(chunk, (0, batch_size - real))  # a full last batch: one compiled shape
    batch = pack_window(np.stack([tokens[s : s + seq_len + 1] for s in chunk]), eos_id)
    batch["weights"][real:] = 0.0
    yield batch
