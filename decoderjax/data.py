"""Input pipeline: corpora -> prepared token shards -> packed fixed-length batches.

Every language-modelling source is prepared once into token shards on disk (preparation.py):
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
import functools
import os

import numpy as np

from decoderjax import corpus, preparation, shards
from decoderjax.permutation import Permutation
from decoderjax.tokenizer import SENTENCEPIECE_KINDS, Tokenizer, load_tokenizer

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
  # Fine-tuning tasks (tasks.py): lm (a token stream), sft (instruction tuning) or classify.
  task: str = "lm"
  prompt_field: str = "prompt"  # sft: {"prompt", "completion"} records ...
  completion_field: str = "completion"
  messages_field: str = "messages"  # ... or chat {"messages": [{"role", "content"}, ...]}
  pack: bool = True  # sft, classify: a batch's examples share rows, whole (batch_size counts
  # examples either way)
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


def tokenize_stream(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
  """One int32 stream: each document's tokens followed by EOS."""
  eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
  return np.fromiter((t for d in docs for t in tokenizer.encode(d) + eos), dtype=np.int32)


@dataclasses.dataclass
class Dataset:
  """A token stream split into training and validation tokens (the "lm" task).

  The streams are arrays or `shards.TokenView`s: anything with len() and contiguous slices.
  """

  tokenizer: Tokenizer
  train_tokens: np.ndarray | shards.TokenView
  val_tokens: np.ndarray | shards.TokenView
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
  train: list[shards.TokenView]
  val: list[shards.TokenView]  # one per source, or a single separate validation stream
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


def _split(store: shards.TokenStore, val_fraction: float):
  cut = int(len(store) * (1 - val_fraction))
  return shards.TokenView(store, 0, cut), shards.TokenView(store, cut)


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
  spec = preparation.PrepareConfig(
    inputs=inputs,
    text_field=cfg.text_field if cfg.source != "default" else "text",
    tokenizer=cfg.tokenizer,
    tokenizer_path=cfg.tokenizer_path,
    vocab_size=cfg.vocab_size,
    tfds_data_dir=cfg.tfds_data_dir,
    format="jsonl" if cfg.source == "jsonl" else "text",  # for names that say neither
  )
  directory = os.path.join(cache_dir, f"prepared-{preparation.cache_key(spec, tokenizer)}")
  preparation.prepare(spec, directory, tokenizer=tokenizer, quiet=True)
  return directory


def open_prepared(directory: str, tokenizer: Tokenizer | None, cfg: DataConfig, whose="model"):
  """(store, tokenizer) of a prepared DIR, refused when its tokenizer is not the one given
  (the model's, or `whose`) or not the kind data.tokenizer names."""
  store = shards.TokenStore(directory)
  tok = load_tokenizer(os.path.join(directory, shards.TOKENIZER))
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
    store = shards.TokenStore(directory)
    tok = load_tokenizer(os.path.join(directory, shards.TOKENIZER))
  if cfg.eval_path or cfg.tfds_eval_split:
    train = shards.TokenView(store)
    val = _eval_stream(cfg, cache_dir, tok)
  else:
    train, val = _split(store, cfg.val_fraction)
  _check_length(cfg, "training", train)
  _check_length(cfg, "validation", val)
  return Dataset(tok, train, val, cfg)


def _eval_stream(cfg: DataConfig, cache_dir: str, tok: Tokenizer) -> shards.TokenView:
  """The separate validation data, tokenized with the training data's tokenizer."""
  if cfg.source == "prepared":
    store, _ = open_prepared(cfg.eval_path, tok, cfg)
  else:
    directory = _prepared_cache(cfg, _source_inputs(cfg, eval_split=True), cache_dir, tok)
    store = shards.TokenStore(directory)
  return shards.TokenView(store)


def _load_mixture(cfg: DataConfig, tokenizer: Tokenizer | None) -> MixtureDataset:
  items = parse_mixture(cfg.mixture)
  tok, trains, vals = tokenizer, [], []
  for path, _ in items:
    whose = "model" if tokenizer is not None else "first mixture source"
    store, source_tok = open_prepared(path, tok, cfg, whose)
    tok = tok or source_tok  # every later source must share the first one's tokenizer
    train, val = (
      (shards.TokenView(store), None) if cfg.eval_path else _split(store, cfg.val_fraction)
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
  order (a stateless permutation: O(batch) work per step, whatever the stream's length). `rows`
  selects this host's rows of the global batch; `stream` keys the shuffle of one mixture source.
  """

  def __init__(
    self, tokens, seq_len, batch_size, seed, eos_id, rows: slice | None = None, noise=None,
    stream: int | None = None,
  ):  # fmt: skip
    self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
    self.seed, self.eos_id, self.noise = seed, eos_id, noise
    self.key = (seed,) if stream is None else (seed, stream)
    self.rows = rows or slice(0, batch_size)  # this host's rows of the global batch
    # Room for the largest offset: windows at offset + i * seq_len all end inside the stream.
    self.windows_per_epoch = max(1, (len(tokens) - 1 - seq_len) // seq_len)
    self.offsets = max(1, min(seq_len, len(tokens) - self.windows_per_epoch * seq_len))

  @functools.lru_cache(maxsize=4)  # noqa: B019 (a few epochs' keys; instances live for a run)
  def _epoch(self, epoch: int) -> tuple[int, Permutation]:
    offset = int(np.random.default_rng([*self.key, epoch]).integers(self.offsets))
    return offset, Permutation(self.windows_per_epoch, (*self.key, epoch))

  def window_starts(self, examples: np.ndarray) -> np.ndarray:
    """Token offsets of the windows of these example indices (example i of the whole run)."""
    epochs, within = np.divmod(np.asarray(examples, np.int64), self.windows_per_epoch)
    starts = np.empty(len(epochs), np.int64)
    for epoch in np.unique(epochs):
      offset, order = self._epoch(int(epoch))
      at = epochs == epoch
      starts[at] = offset + order(within[at]) * self.seq_len
    return starts

  def windows(self, examples: np.ndarray) -> np.ndarray:
    """[len(examples), seq_len + 1] token windows."""
    width = self.seq_len + 1
    out = np.empty((len(examples), width), np.int32)
    for r, start in enumerate(self.window_starts(examples)):
      out[r] = self.tokens[int(start) : int(start) + width]
    return out

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
    batch = pack_window(self.windows(rows), self.eos_id)
    return add_noise(batch, self.noise, self.seed, step, range(self.batch_size)[self.rows])

  def tokens_seen(self, steps: int) -> dict[str, int]:
    del steps
    return {}  # one source: the logger's token count says it all


class MixtureSchedule:
  """Which source each row of the run reads, in fixed proportions, as a pure function.

  Rows come in blocks of `BLOCK` with one fixed pattern: position p goes to the source furthest
  behind its share of the first p + 1 rows (Megatron's blending rule), so every prefix of a
  block holds each source's share to within a row. Row g is source s's example j, counted per
  source; each source shuffles its own examples.
  """

  BLOCK = 4096

  def __init__(self, weights: list[float]):
    w = np.asarray(weights, np.float64)
    self.sources = np.empty(self.BLOCK, np.int64)  # position in block -> source
    self.ranks = np.empty(self.BLOCK, np.int64)  # position -> its index among that source's
    counts = np.zeros(len(w), np.int64)
    for p in range(self.BLOCK):
      s = int(np.argmax(w * (p + 1) - counts))
      self.sources[p], self.ranks[p] = s, counts[s]
      counts[s] += 1
    if (counts == 0).any():
      small = float(w[counts == 0].max())
      raise ValueError(
        f"data.mixture: a weight of {small:.2g} is below 1/{self.BLOCK} of the total"
      )
    self.counts = counts

  def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source, example index within that source) of each global row index."""
    blocks, positions = np.divmod(np.asarray(rows, np.int64), self.BLOCK)
    source = self.sources[positions]
    return source, blocks * self.counts[source] + self.ranks[positions]

  def rows_per_source(self, rows: int) -> np.ndarray:
    """How many of the first `rows` rows each source gave."""
    full, part = divmod(rows, self.BLOCK)
    return full * self.counts + np.bincount(self.sources[:part], minlength=len(self.counts))


class MixtureBatches:
  """Training batches drawn from several sources (each a `Batches` over its own stream, whose
  epochs repeat independently) by a `MixtureSchedule`."""

  def __init__(
    self, sources: list[Batches], names, weights, batch_size, seed, rows=None, noise=None
  ):
    self.sources, self.names, self.batch_size = sources, names, batch_size
    self.seed, self.noise, self.seq_len = seed, noise, sources[0].seq_len
    self.eos_id = sources[0].eos_id
    self.rows = rows or slice(0, batch_size)
    self.schedule = MixtureSchedule(weights)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    rows = np.arange(step * self.batch_size, (step + 1) * self.batch_size)[self.rows]
    source, example = self.schedule(rows)
    window = np.empty((len(rows), self.seq_len + 1), np.int32)
    for s, batches in enumerate(self.sources):
      at = source == s
      if at.any():
        window[at] = batches.windows(example[at])
    batch = pack_window(window, self.eos_id)
    return add_noise(batch, self.noise, self.seed, step, range(self.batch_size)[self.rows])

  def tokens_seen(self, steps: int) -> dict[str, int]:
    counts = self.schedule.rows_per_source(steps * self.batch_size) * self.seq_len
    return {f"tokens_seen/{n}": int(c) for n, c in zip(self.names, counts, strict=True)}


def window_batches(read, n: int, seq_len: int, batch_size: int, eos_id, max_batches: int = 0):
  """Batches of windows 0..n-1 (`read(indices) -> [len, seq_len + 1]`), the last one padded
  with zero-weight rows so every batch has one compiled shape; `max_batches` caps the count."""
  count = min(n, max_batches * batch_size) if max_batches else n
  for first in range(0, count, batch_size):
    indices = np.arange(first, min(first + batch_size, count))
    real = len(indices)
    batch = pack_window(read(np.pad(indices, (0, batch_size - real))), eos_id)
    batch["weights"][real:] = 0.0
    yield batch


def _consecutive(tokens, seq_len: int):
  """`read` for consecutive windows of a stream: window i starts at token i * seq_len."""
  return lambda indices: np.stack(
    [tokens[i * seq_len : i * seq_len + seq_len + 1] for i in indices]
  )


def eval_batches(tokens, seq_len, batch_size, eos_id, max_batches=0):
  """Consecutive validation windows (the whole split unless `max_batches` caps it)."""
  n = (len(tokens) - 1) // seq_len
  return window_batches(_consecutive(tokens, seq_len), n, seq_len, batch_size, eos_id, max_batches)


def mixture_eval_batches(vals, weights, seq_len, batch_size, eos_id, max_batches=0):
  """Validation windows of several sources in the mixture's proportions: the mixture's loss.

  Row g reads its source's next consecutive window, as the training schedule assigns rows;
  rows stop where the first source runs out of held-out windows."""
  schedule = MixtureSchedule(weights)
  available = np.asarray([(len(v) - 1) // seq_len for v in vals])
  n = int(min(available / np.asarray(weights)))
  source, example = schedule(np.arange(n))
  keep = example < available[source]
  source, example = source[keep], example[keep]
  reads = [_consecutive(v, seq_len) for v in vals]

  def read(indices):
    return np.concatenate([reads[source[i]]([example[i]]) for i in indices])

  return window_batches(read, len(source), seq_len, batch_size, eos_id, max_batches)
