"""Fine-tuning data: instruction (SFT) and classification examples -> training batches.

SFT records are {"prompt", "completion"} pairs or chat {"messages": [{"role", "content"}, ...]}
conversations rendered through the model's chat template; the loss covers the completion (every
assistant message) and nothing else. Classification records {"text", "label"} carry the index
of the last token the classifier reads. Each example is kept as a row of its own; a training
batch of `batch_size` examples is packed (data.pack) into as few rows as hold them, whole, rows
holding two of the longest training example (a bucket length), each example with its own
segment id and positions so packed examples never see each other; or else (data.bucket) cut to
the shortest of a few lengths that holds its longest row. Validation examples are packed into
rows of `seq_len`, or sorted by length and bucketed. As in pipeline.py, the training batch of step
`s` is a pure function of (seed, s).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from decoderjax.data import corpus
from decoderjax.data.augmentation import add_noise, augmenter, check_augmentation
from decoderjax.data.data_config import DataConfig
from decoderjax.data.examples import (
  SEQ2SEQ_FIELDS,
  TASKS,
  classify_examples,
  label_names_of,
  preference_example,
  preference_rows,
  reversal_records,
  seq2seq_rows,
  sft_example,
  sft_rows,
)
from decoderjax.data.records import Record, read_records, record_text
from decoderjax.data.rows import (
  Rows,
  bucket_length,
  by_length,
  cut_to_bucket,
  loss_slots,
  pack_examples,
  take_rows,
  used_length,
  with_loss_at,
)
from decoderjax.data.tokenizer import Tokenizer


def first_source(dataset: TaskDataset) -> list[int]:
  """The first validation example's source ids (a seq2seq run's text samples read it)."""
  mask = dataset.val["source_mask"][0].astype(bool)
  return dataset.val["source"][0][mask].tolist()


class TaskBatches:
  """Deterministic training batches of a task's examples: batch(step) is a function of
  (seed, step).

  Each epoch visits the examples (one per row of `data`) in a fresh random order; with fewer
  than the batch size, epochs wrap inside a batch. `rows` selects this host's examples of the
  global batch. With `pack`, the global batch's examples are packed into rows per batch shard
  that hold two of the longest example (pack_examples; this host takes its shards' rows);
  else, with `bucket`, the batch is cut to the bucket length of its longest row. Either way
  every host gets the same shape.
  Augmentation draws from (seed, step, row of the global batch), so hosts agree with a
  single-host run.
  """

  def __init__(
    self, data: Rows, batch_size: int, seed: int, rows=None, noise=None, pack=False, bucket=False,
    shards=1,
  ):  # fmt: skip
    """`noise(inputs_BT, segment_ids_BT, rng) -> inputs_BT` augments the inputs (None: off)."""
    self.data, self.batch_size, self.seed, self.noise = data, batch_size, seed, noise
    self.rows = rows or slice(0, batch_size)  # this host's examples of the global batch
    self.pack, self.bucket, self.shards = pack, bucket, shards
    self.n = len(data["inputs"])
    # Packed rows hold two of the longest examples (a bucket length, at most seq_len): short
    # rows, where one row of seq_len would be mostly padding, yet room for pairs where rows of
    # the longest example's own length would leave most examples alone in theirs.
    longest = used_length(data["segment_ids"])
    self.capacity = bucket_length(2 * longest, data["inputs"].shape[1])
    if self.n == 0:
      raise ValueError("no training rows to batch")
    if batch_size % shards:
      raise ValueError(f"batch size {batch_size} does not divide over {shards} batch shards")
    self._orders = {}  # recent epochs' permutations

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) >= 4:
        del self._orders[min(self._orders)]
      self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
    return self._orders[epoch]

  def example_indices(self, step: int) -> np.ndarray:
    """The rows of `data` the global batch of `step` reads, in batch order."""
    first = step * self.batch_size
    picked = [divmod(i, self.n) for i in range(first, first + self.batch_size)]
    return np.array([self._order(epoch)[k] for epoch, k in picked], dtype=int)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    everyone = take_rows(self.data, self.example_indices(step))  # every host cuts or packs alike
    if self.pack:
      per = self.batch_size // self.shards
      rows = pack_examples(everyone, self.shards, self.capacity, per)
      rows_per_shard = len(rows["inputs"]) // self.shards
      mine = slice(self.rows.start // per * rows_per_shard, self.rows.stop // per * rows_per_shard)
    else:
      rows, mine = everyone, self.rows
      if self.bucket:
        rows = cut_to_bucket(rows, used_length(rows["segment_ids"]))
    if _lm_rows(rows):  # as many loss columns on every host
      rows = with_loss_at(rows, loss_slots(rows["weights"]))
    global_rows = range(len(rows["inputs"]))[mine]
    return add_noise(take_rows(rows, mine), self.noise, self.seed, step, global_rows)

  def tokens_seen(self, steps: int) -> dict[str, int]:
    del steps
    return {}  # one source


@dataclasses.dataclass(frozen=True)
class TaskDataset:
  task: str  # sft, classify, seq2seq or preference
  tokenizer: Tokenizer
  train: Rows
  val: Rows
  label_names: list[str] | None  # classify: the classes, in label-index order
  stats: dict  # example, row, token and truncation counts
  config: DataConfig = DataConfig()  # its augmentation and bucketing settings apply

  def train_batches(self, batch_size: int, seed: int, rows=None, shards=1) -> TaskBatches:
    """Deterministic training batches of `batch_size` examples over `shards` batch shards,
    packed or bucketed as data.{pack, bucket} ask, augmented as data.{token_dropout, ...} do."""
    noise, cfg = augmenter(self.config, self.tokenizer), self.config
    return TaskBatches(self.train, batch_size, seed, rows, noise, cfg.pack, cfg.bucket, shards)

  def describe(self) -> str:
    s = self.stats
    text = (
      f"{s['examples']:,} train / {s['val_examples']:,} val {self.task} examples, "
      + ("packed per batch" if self.config.pack else "a row each")
      + (", bucketed" if self.config.bucket else "")
    )
    text += f", {s['truncated']:,} truncated" if s.get("truncated") else ""
    if s.get("dropped") or s.get("val_dropped"):
      text += f", {s['dropped']:,} train / {s['val_dropped']:,} val pairs over data.seq_len dropped"
    return text

  def eval_batches(
    self, batch_size: int, max_batches: int = 0, multiple: int = 1
  ) -> Iterator[dict[str, np.ndarray]]:
    return row_batches(self.val, batch_size, max_batches, self.config.bucket, multiple)


def validation_rows(rows: Rows, cfg: DataConfig) -> Rows:
  """Validation examples, all packed into rows of seq_len (data.pack: batches of long rows are
  the cheapest to score), else a row each, shortest first (batches bucket tightly)."""
  if cfg.pack and len(rows["inputs"]):
    return pack_examples(rows, 1, cfg.seq_len)
  return take_rows(rows, by_length(rows))


def row_batches(
  rows: Rows, batch_size: int, max_batches: int = 0, bucket=False, multiple: int = 1
) -> Iterator[Rows]:
  """Consecutive rows, in as few batches of at most `batch_size` rows as hold them, all of one
  size: as full as each other, a multiple of `multiple` rows (the devices a batch splits over),
  the last padded with zero rows (zero weights). 23 rows in batches of at most 16 are two of 12,
  not 16 and 16. With `bucket`, each batch is cut to its longest row's bucket length."""
  n = len(rows["inputs"])
  if max_batches:
    n = min(n, max_batches * batch_size)
  size = -(-n // max(-(-n // batch_size), 1))
  size = min(-(-size // multiple) * multiple, batch_size)
  for i in range(0, n, size):
    real = min(size, n - i)
    batch = {
      k: np.concatenate([v[i : i + real], np.zeros((size - real, *v.shape[1:]), v.dtype)])
      for k, v in rows.items()
    }
    if bucket:
      batch = cut_to_bucket(batch, used_length(batch["segment_ids"]))
    yield with_loss_at(batch, loss_slots(batch["weights"])) if _lm_rows(batch) else batch


def _lm_rows(rows: Rows) -> bool:
  """SFT rows (next-token weights), not a classifier's (labels per example)."""
  return "weights" in rows and "labels" not in rows


def load_task_dataset(
  cfg: DataConfig, tok: Tokenizer | None, chat_template: str | None
) -> TaskDataset:
  """Reads data.path (and data.eval_path) into the training and validation rows of a task.
  A seq2seq task may also be the built-in one (data.source='default': reversal_records of the
  embedded Shakespeare), and without `tok` trains data.tokenizer on its texts."""
  if cfg.task not in TASKS:
    raise ValueError(f"data.task: expected one of {TASKS} for fine-tuning data, got {cfg.task!r}")
  builtin = cfg.task == "seq2seq" and cfg.source == "default"
  if not cfg.path and not builtin:
    raise ValueError(f"data.task={cfg.task!r} needs data.path=FILE_OR_GLOB")
  if cfg.seq_len < 2:
    raise ValueError(f"data.seq_len must be >= 2, got {cfg.seq_len}")
  if cfg.task == "seq2seq" and cfg.pack:
    raise ValueError(
      "data.task='seq2seq' keeps each example in a row of its own, with its source: set "
      "data.pack=false"
    )
  check_augmentation(cfg)
  if builtin:
    train = reversal_records(corpus.shakespeare_texts())
  else:
    train = read_records(cfg.path)
  if cfg.eval_path:
    val = read_records(cfg.eval_path)
  else:
    train, val = _split(train, cfg.val_fraction, cfg.seed)
  if cfg.task == "seq2seq":
    return _seq2seq_dataset(cfg, tok, train, val)
  if cfg.task == "sft":
    return _sft_dataset(cfg, tok, chat_template, train, val)
  if cfg.task == "preference":
    return _preference_dataset(cfg, tok, chat_template, train, val)
  return _classify_dataset(cfg, tok, train, val)


def _split(records: list[Record], fraction: float, seed: int) -> tuple[list, list]:
  """A seeded validation split of `fraction` of the records, at least one on each side."""
  if not 0 <= fraction < 1:
    raise ValueError(f"data.val_fraction must be in [0, 1), got {fraction}")
  if len(records) < 2:
    raise ValueError(
      f"{records[0][0]}: one example cannot be split into training and validation; "
      "add examples or set data.eval_path"
    )
  n_val = min(max(1, round(len(records) * fraction)), len(records) - 1)
  held = set(np.random.default_rng(seed).permutation(len(records))[:n_val].tolist())
  return (
    [r for i, r in enumerate(records) if i not in held],
    [r for i, r in enumerate(records) if i in held],
  )


def _encoded(example, to_rows, cfg, tok, chat_template, *splits):
  """Each split's (records, rows, what to_rows cut or dropped): `example` encodes a record."""
  out = []
  for records in splits:
    encoded = [example(r, tok, cfg, chat_template, f"{p}:{n}") for p, n, r in records]
    out.append((len(encoded), *to_rows(encoded, cfg.seq_len)))
  return out


def _sft_dataset(cfg, tok, chat_template, train, val) -> TaskDataset:
  (n_train, rows, truncated), (n_val, val_rows, _) = _encoded(
    sft_example, sft_rows, cfg, tok, chat_template, train, val
  )
  val_rows = validation_rows(val_rows, cfg)
  if not len(rows["inputs"]) or not len(val_rows["inputs"]):
    raise ValueError(f"{cfg.path}: no example has the 2 tokens a training pair needs")
  tokens = int((rows["segment_ids"] != 0).sum())
  stats = {
    "examples": n_train,
    "val_examples": n_val,
    "truncated": truncated,
    "tokens": tokens,
    "loss_tokens": int(rows["weights"].sum()),
  }
  return TaskDataset("sft", tok, rows, val_rows, None, stats, cfg)


def _preference_dataset(cfg, tok, chat_template, train, val) -> TaskDataset:
  (n_train, rows, dropped), (n_val, val_rows, val_dropped) = _encoded(
    preference_example, preference_rows, cfg, tok, chat_template, train, val
  )
  if not len(rows["inputs"]) or not len(val_rows["inputs"]):
    where = cfg.path if not len(rows["inputs"]) else cfg.eval_path or cfg.path
    raise ValueError(
      f"{where}: no preference pair fits a row of data.seq_len={cfg.seq_len} tokens (chosen and "
      "rejected together)"
    )
  stats = {
    "examples": n_train - dropped,
    "val_examples": n_val - val_dropped,
    "truncated": 0,
    "dropped": dropped,
    "val_dropped": val_dropped,
    "tokens": int((rows["segment_ids"] != 0).sum()),
    "loss_tokens": int(rows["weights"].sum()),
  }
  return TaskDataset("preference", tok, rows, validation_rows(val_rows, cfg), None, stats, cfg)


def _seq2seq_dataset(cfg, tok, train, val) -> TaskDataset:
  if tok is None:  # a model trained from scratch: its tokenizer too
    from decoderjax.data.tokenizer import build_tokenizer

    texts = [record_text(r, field, f"{p}:{n}") for p, n, r in train for field in SEQ2SEQ_FIELDS]
    tok = build_tokenizer(cfg.tokenizer, texts, cfg.vocab_size, cfg.tokenizer_path)
  (rows, truncated), (val_rows, _) = (seq2seq_rows(r, tok, cfg.seq_len) for r in (train, val))
  val_rows = validation_rows(val_rows, cfg)
  stats = {
    "examples": len(train),
    "val_examples": len(val),
    "truncated": truncated,
    "tokens": int((rows["segment_ids"] != 0).sum() + rows["source_mask"].sum()),
    "loss_tokens": int(rows["weights"].sum()),
  }
  return TaskDataset("seq2seq", tok, rows, val_rows, None, stats, cfg)


def _classify_dataset(cfg, tok, train, val) -> TaskDataset:
  names = label_names_of(train, cfg)
  rows, truncated = classify_examples(train, tok, cfg, cfg.seq_len, names)
  val_rows, _ = classify_examples(val, tok, cfg, cfg.seq_len, names)
  val_rows = validation_rows(val_rows, cfg)
  tokens = int((rows["segment_ids"] != 0).sum())
  counts = np.bincount(rows["labels"][:, 0], minlength=len(names))
  stats = {
    "examples": len(train),
    "val_examples": len(val),
    "truncated": truncated,
    "tokens": tokens,
    "label_counts": dict(zip(names, counts.tolist(), strict=True)),
  }
  return TaskDataset("classify", tok, rows, val_rows, names, stats, cfg)
