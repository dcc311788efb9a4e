"""Input pipeline: corpora -> prepared token shards -> packed fixed-length batches.

Every language-modelling source is prepared once into token shards on disk (ingest.py):
`prepared` names directories made by `python -m decoderjax.prepare`; `default`, `text`, `jsonl`
and `tfds` are prepared into the workdir's cache on first use. Training reads windows of
`seq_len + 1` tokens by offset from the shards, so no corpus is ever held in memory. Each window
carries segment ids (one per document) and positions that restart per document, so packed
documents never see each other. The batch of step `s` is a pure function of (seed, s), computed
in O(batch) through a stateless permutation of each epoch's windows: resuming from a
checkpoint's step resumes the input pipeline exactly, with no iterator state to lose.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from decoderjax.data import corpus, ingest, token_store
from decoderjax.data.augmentation import augmenter
from decoderjax.data.batches import Batches, MixtureBatches, eval_batches, mixture_eval_batches
from decoderjax.data.data_config import DataConfig, check_inputs, parse_mixture
from decoderjax.data.tokenizer import SENTENCEPIECE_KINDS, Tokenizer, load_tokenizer


def tokenize_stream(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
  """One int32 stream: each document's tokens followed by EOS."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  return np.fromiter((t for d in docs for t in tokenizer.encode(d) + eos), dtype=np.int32)


@dataclasses.dataclass
class Dataset:
  """A token stream split into training and validation tokens (the "lm" task).

  The streams are arrays or `token_store.TokenView`s: anything with len() and contiguous slices.
  """

  tokenizer: Tokenizer
  train_tokens: np.ndarray | token_store.TokenView
  val_tokens: np.ndarray | token_store.TokenView
  config: DataConfig
  task: str = "lm"
  label_names: list[str] | None = None

  def train_batches(
    self, batch_size: int, seed: int, rows: slice | None = None, shards=1
  ) -> Batches:
    del shards  # windows of a token stream fill every row: nothing to pack
    eos, noise = self.tokenizer.eos_id, augmenter(self.config, self.tokenizer)
    return Batches(self.train_tokens, self.config.seq_len, batch_size, seed, eos, rows, noise)

  def eval_batches(self, batch_size: int, max_batches: int = 0, multiple: int = 1):
    del multiple  # every batch is batch_size windows, which divides over the devices already
    eos = self.tokenizer.eos_id
    return eval_batches(self.val_tokens, self.config.seq_len, batch_size, eos, max_batches)

  def describe(self) -> str:
    return f"{len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens"


@dataclasses.dataclass
class MixtureDataset:
  """Several prepared token streams drawn from in fixed proportions (data.mixture)."""

  tokenizer: Tokenizer
  names: list[str]
  weights: list[float]
  train: list[token_store.TokenView]
  val: list[token_store.TokenView]  # one per source, or a single separate validation stream
  config: DataConfig
  task: str = "lm"
  label_names: list[str] | None = None

  def train_batches(self, batch_size: int, seed: int, rows: slice | None = None, shards=1):
    del shards  # as Dataset's
    eos, seq_len = self.tokenizer.eos_id, self.config.seq_len
    sources = [
      Batches(t, seq_len, batch_size, seed, eos, stream=i) for i, t in enumerate(self.train)
    ]
    noise = augmenter(self.config, self.tokenizer)
    return MixtureBatches(sources, self.names, self.weights, batch_size, seed, rows, noise)

  def eval_batches(self, batch_size: int, max_batches: int = 0, multiple: int = 1):
    del multiple  # as Dataset's
    eos, seq_len = self.tokenizer.eos_id, self.config.seq_len
    if len(self.val) == 1:  # data.eval_path: one separate validation stream
      return eval_batches(self.val[0], seq_len, batch_size, eos, max_batches)
    return mixture_eval_batches(self.val, self.weights, seq_len, batch_size, eos, max_batches)

  def describe(self) -> str:
    parts = ", ".join(
      f"{n} {w:.0%} ({len(t):,} tokens)"
      for n, w, t in zip(self.names, self.weights, self.train, strict=True)
    )
    return f"mixture of {parts}; {sum(len(v) for v in self.val):,} val tokens"


def _split(store: token_store.TokenStore, val_fraction: float):
  cut = int(len(store) * (1 - val_fraction))
  return token_store.TokenView(store, 0, cut), token_store.TokenView(store, cut)


def _check_length(cfg: DataConfig, name: str, tokens) -> None:
  if len(tokens) < cfg.seq_len + 1:
    raise ValueError(
      f"the {name} split has {len(tokens)} tokens, fewer than data.seq_len + 1 = {cfg.seq_len + 1}"
    )


def _source_inputs(cfg: DataConfig, eval_split: bool = False) -> str:
  if cfg.source == "default":
    return ",".join(corpus.shakespeare_files())
  if cfg.source == "tfds":
    return f"tfds:{cfg.tfds_name}:{cfg.tfds_eval_split if eval_split else cfg.tfds_split}"
  return cfg.eval_path if eval_split else cfg.path


def _prepared_cache(cfg: DataConfig, inputs: str, cache_dir: str, tokenizer) -> str:
  """Prepares `inputs` into the workdir's cache (once; a rerun finds it) and returns the DIR."""
  spec = ingest.PrepareConfig(
    inputs=inputs,
    text_field=cfg.text_field if cfg.source != "default" else "text",
    tokenizer=cfg.tokenizer,
    tokenizer_path=cfg.tokenizer_path,
    vocab_size=cfg.vocab_size,
    tfds_data_dir=cfg.tfds_data_dir,
    format="jsonl" if cfg.source == "jsonl" else "text",  # for names that say neither
  )
  directory = os.path.join(cache_dir, f"prepared-{ingest.cache_key(spec, tokenizer)}")
  ingest.prepare(spec, directory, tokenizer=tokenizer, quiet=True)
  return directory


def open_prepared(directory: str, tokenizer: Tokenizer | None, cfg: DataConfig, whose="model"):
  """(store, tokenizer) of a prepared DIR, refused when its tokenizer is not the one given
  (the model's, or `whose`) or not the kind data.tokenizer names."""
  store = token_store.TokenStore(directory)
  tok = load_tokenizer(os.path.join(directory, token_store.TOKENIZER))
  if tokenizer is not None and tokenizer.fingerprint() != tok.fingerprint():
    raise ValueError(
      f"{directory} was prepared with another tokenizer ({tok.kind}, {tok.vocab_size} ids) "
      f"than the {whose}'s ({tokenizer.kind}, {tokenizer.vocab_size} ids); prepare it with "
      f"--tokenizer=DIR naming the {whose}'s directory"
    )
  family = "sentencepiece" if cfg.tokenizer in SENTENCEPIECE_KINDS else cfg.tokenizer
  if tokenizer is None and family != tok.kind:
    raise ValueError(
      f"{directory} holds {tok.kind} tokens, but data.tokenizer={cfg.tokenizer!r}; "
      f"set --config.data.tokenizer={tok.kind}"
    )
  return store, tok


def load_dataset(cfg: DataConfig, cache_dir: str, tokenizer: Tokenizer | None = None):
  """The data a config names, prepared into token shards (cached in `cache_dir`) and split into
  training and validation streams. `tokenizer` (a model's) replaces the config's."""
  check_inputs(cfg)
  if cfg.mixture:
    return _load_mixture(cfg, tokenizer)
  if cfg.source == "prepared":
    store, tok = open_prepared(cfg.path, tokenizer, cfg)
  else:
    directory = _prepared_cache(cfg, _source_inputs(cfg), cache_dir, tokenizer)
    store = token_store.TokenStore(directory)
    tok = load_tokenizer(os.path.join(directory, token_store.TOKENIZER))
  if cfg.eval_path or cfg.tfds_eval_split:
    train = token_store.TokenView(store)
    val = _eval_stream(cfg, cache_dir, tok)
  else:
    train, val = _split(store, cfg.val_fraction)
  _check_length(cfg, "training", train)
  _check_length(cfg, "validation", val)
  return Dataset(tok, train, val, cfg)


def _eval_stream(cfg: DataConfig, cache_dir: str, tok: Tokenizer) -> token_store.TokenView:
  """The separate validation data, tokenized with the training data's tokenizer."""
  if cfg.source == "prepared":
    store, _ = open_prepared(cfg.eval_path, tok, cfg)
  else:
    directory = _prepared_cache(cfg, _source_inputs(cfg, eval_split=True), cache_dir, tok)
    store = token_store.TokenStore(directory)
  return token_store.TokenView(store)


def _load_mixture(cfg: DataConfig, tokenizer: Tokenizer | None) -> MixtureDataset:
  items = parse_mixture(cfg.mixture)
  tok, trains, vals = tokenizer, [], []
  for path, _ in items:
    whose = "model" if tokenizer is not None else "first mixture source"
    store, source_tok = open_prepared(path, tok, cfg, whose)
    tok = tok or source_tok  # every later source must share the first one's tokenizer
    train, val = (
      (token_store.TokenView(store), None) if cfg.eval_path else _split(store, cfg.val_fraction)
    )
    _check_length(cfg, f"training ({path})", train)
    trains.append(train)
    vals.append(val)
  if cfg.eval_path:
    vals = [_eval_stream(cfg, "", tok)]
  for path, val in zip([p for p, _ in items], vals, strict=False):
    _check_length(cfg, f"validation ({path})", val)
  names = _source_names([p for p, _ in items])
  return MixtureDataset(tok, names, [w for _, w in items], trains, vals, cfg)


def _source_names(paths: list[str]) -> list[str]:
  """Short, distinct names of the mixture's DIRs (for logs): the fewest trailing path parts
  that tell them apart."""
  parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
  for k in range(1, max(map(len, parts)) + 1):
    names = ["/".join(p[-k:]) for p in parts]
    if len(set(names)) == len(names):
      return names
  return [f"{n}_{i}" for i, n in enumerate(names)]  # the same DIR twice
