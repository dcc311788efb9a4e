"""Fine-tuning data: instruction (SFT) and classification examples -> training batches.

SFT records are {"prompt", "completion"} pairs or chat {"messages": [{"role", "content"}, ...]}
conversations rendered through the model's chat template; the loss covers the completion (every
assistant message) and nothing else. Classification records {"text", "label"} carry the index
of the last token the classifier reads. Each example is kept as a row of its own; a training
batch of `batch_size` examples is packed (data.pack) into as few rows as hold them, whole, rows
holding two of the longest training example (a bucket length), each example with its own
segment id and positions so packed examples never see each other; or else (data.bucket) cut to
the shortest of a few lengths that holds its longest row. Validation examples are packed into
rows of `seq_len`, or sorted by length and bucketed. As in data.py, the training batch of step
`s` is a pure function of (seed, s).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import itertools
import json
import os
from collections.abc import Iterator

import numpy as np

from decoderjax.data import DataConfig, add_noise, augmenter, check_augmentation
from decoderjax.tokenizer import Tokenizer

Record = tuple[str, int, dict]  # (file, line number, record)
Rows = dict[str, np.ndarray]  # arrays with one leading row axis
TASKS = ("sft", "classify", "seq2seq")


def render_chat(template: str, messages: list[dict], tok, add_generation_prompt=True) -> str:
  """A conversation through a Jinja chat template (as transformers renders them)."""
  import jinja2.sandbox

  def special(token_id):
    if token_id is None:
      return ""
    return tok.tok.id_to_token(token_id) if tok.kind == "hf" else tok.decode([token_id])

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
    messages=messages,
    add_generation_prompt=add_generation_prompt,
    bos_token=special(tok.bos_id),
    eos_token=special(tok.eos_id),
  )


# Reading records.


def read_records(pattern: str) -> list[Record]:
  """(file, line, record) for every record in the files a glob matches: JSON lines or CSV."""
  paths = sorted(glob.glob(os.path.expanduser(pattern)))
  if not paths:
    raise ValueError(f"no file matches {pattern!r}")
  records = [record for path in paths for record in _read_file(path)]
  if not records:
    raise ValueError(f"{pattern!r} holds no records")
  return records


def _read_file(path: str) -> list[Record]:
  with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
    if path.endswith(".csv"):
      reader = csv.DictReader(f)
      return [(path, reader.line_num, row) for row in reader]  # line_num: the row just read
    if path.endswith((".jsonl", ".json")):
      return [_json_record(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
  raise ValueError(f"{path}: unknown data format (expected .jsonl, .json or .csv)")


def _json_record(path: str, n: int, line: str) -> Record:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{n}: not JSON ({e.msg}); expected one object per line") from None
  if not isinstance(record, dict):
    raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
  return path, n, record


def _field(record: dict, name: str, where: str):
  value = record.get(name)
  if value is None:  # also a CSV row too short for its header
    raise ValueError(f"{where}: no field {name!r}")
  return value


def record_text(record: dict, name: str, where: str) -> str:
  value = _field(record, name, where)
  if not isinstance(value, str):
    raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
  return value


# Instruction tuning.


def sft_example(
  record: dict, tok: Tokenizer, cfg: DataConfig, chat_template: str | None, where: str
) -> tuple[list[int], list[bool]]:
  """One SFT record -> its tokens and a per-token mask of what the loss covers."""
  if cfg.messages_field in record:
    return _chat_example(record[cfg.messages_field], tok, chat_template, cfg, where)
  if cfg.prompt_field in record or cfg.completion_field in record:
    prompt = record_text(record, cfg.prompt_field, where)
    completion = record.get(cfg.completion_field) or ""
    if not isinstance(completion, str) or not completion.strip():
      raise ValueError(f"{where}: empty completion")
    head = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(prompt)
    tail = tok.encode(completion) + ([] if tok.eos_id is None else [tok.eos_id])
    return head + tail, [False] * len(head) + [True] * len(tail)
  raise ValueError(
    f"{where}: expected fields {cfg.prompt_field!r} and {cfg.completion_field!r}, "
    f"or {cfg.messages_field!r}"
  )


def generation_example(
  record: dict, tok: Tokenizer, cfg: DataConfig, chat_template: str | None, where: str
) -> tuple[list[int], str]:
  """One SFT record -> (prompt tokens as training saw them, the reference answer): the prompt
  field and its completion, or a conversation up to its last assistant message."""
  if cfg.messages_field in record:
    messages = record[cfg.messages_field]
    sft_example(record, tok, cfg, chat_template, where)  # the same checks as training's
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = render_chat(chat_template, messages[:last], tok, add_generation_prompt=True)
    return tok.encode(prompt), messages[last]["content"]
  tokens, mask = sft_example(record, tok, cfg, chat_template, where)
  return tokens[: mask.index(True)], record_text(record, cfg.completion_field, where)


def _chat_example(messages, tok, template, cfg: DataConfig, where: str):
  """Tokens of a rendered conversation; the mask covers each assistant message's span."""
  if template is None:
    raise ValueError(f"{where}: chat records need a chat template; the model directory has none")
  if not isinstance(messages, list) or not all(_is_message(m) for m in messages):
    raise ValueError(
      f"{where}: {cfg.messages_field!r} must be a list of {{'role', 'content'}} string objects"
    )
  render = lambda n, prompt: render_chat(template, messages[:n], tok, add_generation_prompt=prompt)
  text = render(len(messages), False)
  cuts = [0]  # the text alternates: outside, assistant, outside, assistant, ..., outside
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    if not message["content"].strip():
      raise ValueError(f"{where}: message {i} (assistant) has empty content")
    before, through = render(i, True), render(i + 1, False)
    if not (through.startswith(before) and text.startswith(through) and len(before) >= cuts[-1]):
      raise ValueError(
        f"{where}: the chat template does not render message {i} as a continuation of the "
        "messages before it, so its span in the text is unknown"
      )
    cuts += [len(before), len(through)]
  if len(cuts) == 1:
    raise ValueError(f"{where}: the conversation has no assistant message to learn from")
  cuts.append(len(text))
  tokens, mask = [], []
  for k in range(len(cuts) - 1):
    piece = tok.encode(text[cuts[k] : cuts[k + 1]])
    tokens += piece
    mask += [k % 2 == 1] * len(piece)
  return tokens, mask


def _is_message(message) -> bool:
  return (
    isinstance(message, dict)
    and isinstance(message.get("role"), str)
    and isinstance(message.get("content"), str)
  )


def sft_rows(examples: list[tuple[list[int], list[bool]]], seq_len: int) -> tuple[Rows, int]:
  """Examples -> one row [seq_len] each (right-padded), and how many were cut to seq_len + 1."""
  truncated = sum(len(tokens) > seq_len + 1 for tokens, _ in examples)
  cut = lambda t, m: (t, m) if len(t) <= seq_len + 1 else (t[: seq_len + 1], m[: seq_len + 1])
  examples = [cut(t, m) for t, m in examples if len(t) >= 2]
  lengths = [len(tokens) - 1 for tokens, _ in examples]  # (input, target) pairs
  placed = [(i, i) for i in range(len(examples))]
  return _fill_rows(examples, lengths, placed, seq_len), truncated


def _fill_rows(examples, lengths, placed: list[tuple[int, int]], seq_len: int) -> Rows:
  """Writes each example, in placement order, after those already in its row."""
  n = max((row for _, row in placed), default=-1) + 1
  used, count, start, segment = [0] * n, [0] * n, [], []
  for i, row in placed:
    count[row] += 1
    start.append(row * seq_len + used[row])  # in the flattened [n * seq_len] rows
    segment.append(count[row])
    used[row] += lengths[i]
  picked = [i for i, _ in placed]
  length = np.array([lengths[i] for i in picked], dtype=int)
  total = int((length + 1).sum())
  tokens = np.fromiter(
    itertools.chain.from_iterable(examples[i][0] for i in picked), np.int32, total
  )
  mask = np.fromiter(itertools.chain.from_iterable(examples[i][1] for i in picked), bool, total)
  first = np.cumsum(length + 1) - (length + 1)  # each example's first token in `tokens`
  pair = np.arange(length.sum()) - np.repeat(np.cumsum(length) - length, length)  # in example
  source = np.repeat(first, length) + pair
  slot = np.repeat(np.array(start, int), length) + pair
  values = {
    "inputs": tokens[source],
    "targets": tokens[source + 1],
    "segment_ids": np.repeat(np.array(segment, np.int32), length),
    "positions": pair.astype(np.int32),
    "weights": mask[source + 1].astype(np.float32),
  }
  rows = {}
  for name, value in values.items():
    rows[name] = np.zeros((n, seq_len), value.dtype)
    rows[name].reshape(-1)[slot] = value  # a view: the rows are contiguous
  return rows


def _first_fit(lengths: list[int], order, capacity: int) -> list[tuple[int, int]]:
  """(example, row) pairs: each example, in `order`, goes to the first row with room for it.

  A max-tree over the rows' free room finds that row in O(log rows); rows past the last used
  one are empty, so the first of them is taken when no used row has room.
  """
  size = 1 << max(len(order) - 1, 0).bit_length()  # leaves: at least one row per example
  room = [capacity] * (2 * size)  # node k has children 2k, 2k + 1; leaves at size + row
  placed = []
  for i in order:
    node = 1
    while node < size:
      node = 2 * node if room[2 * node] >= lengths[i] else 2 * node + 1
    room[node] -= lengths[i]
    placed.append((int(i), node - size))
    node //= 2
    while node:
      room[node] = max(room[2 * node], room[2 * node + 1])
      node //= 2
  return placed


# Classification.


# Sequence to sequence (a cross-attention model: ModelConfig.cross_attention).

SEQ2SEQ_FIELDS = ("source", "target")


def start_id(tok: Tokenizer) -> int:
  """The decoder's first input, before a target's tokens: BOS, else EOS."""
  start = tok.bos_id if tok.bos_id is not None else tok.eos_id
  if start is None or tok.eos_id is None:
    raise ValueError("a seq2seq tokenizer needs an EOS id (and BOS, else EOS, to start from)")
  return start


def seq2seq_rows(records: list[Record], tok: Tokenizer, seq_len: int) -> tuple[Rows, int]:
  """{"source", "target"} records -> a row each: the target's (input, next-token) pairs from the
  start token to EOS, all weighted, and the source's ids [N, seq_len] with their mask; and how
  many were cut to seq_len."""
  start, sources, examples = start_id(tok), [], []
  for path, n, record in records:
    where = f"{path}:{n}"
    source, target = (tok.encode(record_text(record, f, where)) for f in SEQ2SEQ_FIELDS)
    if not source or not target:
      raise ValueError(f"{where}: empty source or target")
    examples.append(([start, *target, tok.eos_id], [False] + [True] * (len(target) + 1)))
    sources.append(source[:seq_len])
  rows, truncated = sft_rows(examples, seq_len)
  truncated += sum(len(s) == seq_len for s in sources)
  rows["source"] = np.zeros((len(sources), seq_len), np.int32)
  rows["source_mask"] = np.zeros((len(sources), seq_len), np.int32)
  for i, source in enumerate(sources):
    rows["source"][i, : len(source)] = source
    rows["source_mask"][i, : len(source)] = 1
  return rows, truncated


def first_source(dataset: TaskDataset) -> list[int]:
  """The first validation example's source ids (a seq2seq run's text samples read it)."""
  mask = dataset.val["source_mask"][0].astype(bool)
  return dataset.val["source"][0][mask].tolist()


def reversal_records(texts: list[str], min_words: int = 3, max_words: int = 10) -> list[Record]:
  """The built-in seq2seq task: each distinct line of `texts` with `min_words` to `max_words`
  words -> the same words in reverse order ("to be or not" -> "not or be to")."""
  seen, records = set(), []
  for text in texts:
    for line in text.splitlines():
      words = line.split()
      line = " ".join(words)
      if min_words <= len(words) <= max_words and line not in seen:
        seen.add(line)
        record = {"source": line, "target": " ".join(reversed(words))}
        records.append(("shakespeare", len(records) + 1, record))
  return records


def label_names_of(records: list[Record], cfg: DataConfig) -> list[str]:
  """data.labels split on commas, else the training data's sorted unique labels."""
  if cfg.labels:
    names = [name.strip() for name in cfg.labels.split(",")]
    if "" in names or len(set(names)) < len(names):
      raise ValueError(f"data.labels: empty or repeated label name in {cfg.labels!r}")
  else:
    names = sorted({str(_field(r, cfg.label_field, f"{p}:{n}")) for p, n, r in records})
  if len(names) < 2:
    source = "data.labels" if cfg.labels else "the training data"
    raise ValueError(f"classification needs at least 2 labels; {source} has {names}")
  return names


def classify_rows(
  records: list[Record], tok: Tokenizer, cfg: DataConfig, seq_len: int, label_names: list[str]
) -> Rows:
  """Classifier rows of `records`, one each: _classify's rows."""
  return _classify(records, tok, cfg, seq_len, label_names)[0]


def _classify(records, tok, cfg, seq_len, label_names) -> tuple[Rows, int]:
  index = {name: i for i, name in enumerate(label_names)}
  texts, labels = [], []
  for path, line, record in records:
    where = f"{path}:{line}"
    text, label = record_text(record, cfg.text_field, where), _field(record, cfg.label_field, where)
    if str(label) not in index:
      raise ValueError(f"{where}: label {label!r} is not one of {label_names}")
    texts.append((text, where))
    labels.append(index[str(label)])
  ids, truncated = encode_texts(texts, tok, seq_len)
  return classifier_rows(ids, seq_len, labels), truncated


def text_rows(texts: list[tuple[str, str]], tok: Tokenizer, seq_len: int) -> tuple[Rows, int]:
  """A classifier's input rows for (text, where) pairs, one text per row -> (rows, count
  truncated)."""
  ids, truncated = encode_texts(texts, tok, seq_len)
  return classifier_rows(ids, seq_len), truncated


def encode_texts(texts: list[tuple[str, str]], tok: Tokenizer, seq_len: int):
  """(text, where) pairs -> (token lists: the text, cut to leave room for EOS, then EOS; how
  many were cut). The head reads the EOS: one learned position that every text ends on."""
  eos = [] if tok.eos_id is None else [tok.eos_id]
  keep = seq_len - len(eos)
  out, truncated = [], 0
  for text, where in texts:
    ids = tok.encode(text)
    truncated += len(ids) > keep
    ids = ids[:keep] + eos
    if not ids:
      raise ValueError(f"{where}: empty text")
    out.append(ids)
  return out, truncated


def classifier_rows(ids: list[list[int]], seq_len: int, labels=None) -> Rows:
  """Examples -> one row [seq_len] each (right-padded, segment 1, positions from 0) and
  per-example arrays [N, 1]: `last` (the index of the token the head reads), `example_weights`
  and, given, `labels`."""
  n = len(ids)
  rows = {key: np.zeros((n, seq_len), np.int32) for key in ("inputs", "segment_ids", "positions")}
  rows.update(last=np.zeros((n, 1), np.int32), example_weights=np.ones((n, 1), np.float32))
  for r, x in enumerate(ids):
    rows["inputs"][r, : len(x)] = x
    rows["segment_ids"][r, : len(x)] = 1
    rows["positions"][r, : len(x)] = np.arange(len(x))
    rows["last"][r] = len(x) - 1
  if labels is not None:
    rows["labels"] = np.asarray(labels, np.int32).reshape(n, 1)
  return rows


def pack_examples(rows: Rows, shards: int, capacity: int, slots: int = 0) -> Rows:
  """A batch of one-example rows -> the same examples packed whole into rows of `capacity`
  tokens (at least the longest example), each keeping its own segment id and positions, then
  cut to a bucket length.

  The batch splits into `shards` equal groups (one per batch shard, in order), packed apart
  (first-fit, longest first) into as many rows as the fullest group needs, so every shard holds
  its own examples and all have one shape. Per-example arrays (a classifier's `last`, `labels`,
  `example_weights`) become [rows, K], K = `slots` or else the most examples any row holds;
  empty slots weigh 0.
  """
  n = len(rows["inputs"])
  per = n // shards
  lengths = row_lengths(rows)
  placements = []
  for g in range(shards):
    members = np.arange(g * per, (g + 1) * per)
    order = members[np.argsort(-lengths[members], kind="stable")]
    placements.append(_first_fit(lengths.tolist(), order, capacity))
  r = max(row for placed in placements for _, row in placed) + 1
  tokens = [k for k in rows if k in TOKEN_KEYS]
  out = {k: np.zeros((shards * r, capacity), rows[k].dtype) for k in tokens}
  k_slots = slots or max(int(np.bincount([row for _, row in p]).max()) for p in placements)
  out.update(
    {k: np.zeros((shards * r, k_slots), v.dtype) for k, v in rows.items() if k not in tokens}
  )
  for g, placed in enumerate(placements):
    used, count = np.zeros(r, int), np.zeros(r, int)
    for i, row in placed:
      o, start, j = g * r + row, used[row], count[row]
      end = start + lengths[i]
      for k in tokens:
        out[k][o, start:end] = rows[k][i, : lengths[i]]
      out["segment_ids"][o, start:end] = j + 1
      for k in out.keys() - tokens:
        out[k][o, j] = rows[k][i, 0] + (start if k == "last" else 0)
      used[row], count[row] = end, j + 1
  return cut_to_bucket(out, used_length(out["segment_ids"]))


# Row lengths. A batch of task rows is cut to the first of these that holds its longest row:
# a few compiled shapes, and rows of short examples no longer computed at seq_len.


def bucket_length(n: int, seq_len: int) -> int:
  """The shortest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x them) that is >= n,
  at most seq_len."""
  length = 16
  while length < n:
    length = length * 3 // 2 if length & (length - 1) == 0 else length * 4 // 3
  return min(length, seq_len)


TOKEN_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")  # [rows, seq_len]


def used_length(segment_ids_NT: np.ndarray) -> int:
  """How many leading columns hold a token in any row (rows are right-padded)."""
  columns = np.flatnonzero(segment_ids_NT.any(axis=0))
  return int(columns[-1]) + 1 if len(columns) else 0


def cut_to_bucket(batch: Rows, used: int) -> Rows:
  """The batch with its token arrays cut to bucket_length(used)."""
  length = bucket_length(used, batch["inputs"].shape[1])
  return {k: v[:, :length] if k in TOKEN_KEYS else v for k, v in batch.items()}


def loss_slots(weights_NT: np.ndarray) -> int:
  """How many columns `loss_at` keeps per row: the bucket of the most weighted tokens any row
  holds (0: every column, when that bucket is the whole row)."""
  t = weights_NT.shape[1]
  n = bucket_length(int((weights_NT > 0).sum(axis=1).max(initial=1)), t)
  return 0 if n >= t else n


def with_loss_at(batch: Rows, n: int) -> Rows:
  """SFT rows plus `loss_at` [rows, n]: each row's weighted columns first, in order, then
  unweighted ones (weight 0). The LM head and the loss then run on those n columns alone
  (steps.forward): a short completion after a long prompt no longer pays the vocabulary
  matmul at every prompt token. n = 0 leaves the batch as it is."""
  if not n:
    return batch
  at = np.argsort(batch["weights"] <= 0, axis=1, kind="stable")[:, :n]
  return {**batch, "loss_at": at.astype(np.int32)}


def row_lengths(rows: Rows) -> np.ndarray:
  """Tokens in each row."""
  return (rows["segment_ids"] != 0).sum(axis=1)


def by_length(rows: Rows) -> np.ndarray:
  """Row indices, shortest row first (stable): batches of similar lengths bucket tightly."""
  return np.argsort(row_lengths(rows), kind="stable")


def take_rows(rows: Rows, indices) -> Rows:
  return {k: v[indices] for k, v in rows.items()}


# Batches.


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
  task: str  # sft or classify
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
    return text + (f", {s['truncated']:,} truncated" if s.get("truncated") else "")

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
    from decoderjax import corpus

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


def _sft_dataset(cfg, tok, chat_template, train, val) -> TaskDataset:
  split = {}
  for name, records in (("train", train), ("val", val)):
    examples = [sft_example(r, tok, cfg, chat_template, f"{p}:{n}") for p, n, r in records]
    split[name] = (len(examples), *sft_rows(examples, cfg.seq_len))
  (n_train, rows, truncated), (n_val, val_rows, _) = split["train"], split["val"]
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


def _seq2seq_dataset(cfg, tok, train, val) -> TaskDataset:
  if tok is None:  # a model trained from scratch: its tokenizer too
    from decoderjax.tokenizer import build_tokenizer

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
  rows, truncated = _classify(train, tok, cfg, cfg.seq_len, names)
  val_rows, _ = _classify(val, tok, cfg, cfg.seq_len, names)
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
