"""Fine-tuning examples from records: SFT (prompt / completion, or chat), seq2seq and
classification."""

from __future__ import annotations

import itertools

import numpy as np

from decoderjax.data.chat_template import render_chat
from decoderjax.data.data_config import DataConfig
from decoderjax.data.records import Record, record_field, record_text
from decoderjax.data.rows import Rows
from decoderjax.data.tokenizer import Tokenizer

TASKS = ("sft", "classify", "seq2seq", "preference")


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


def preference_example(
  record: dict, tok: Tokenizer, cfg: DataConfig, chat_template: str | None, where: str
) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
  """One preference record -> (chosen, rejected), each its tokens and a mask of the response
  the loss covers. Text records {"prompt", "chosen", "rejected"} share the prompt; chat records
  {"chosen": [messages], "rejected": [messages]} (or a "prompt" list of messages and one
  assistant message each) are rendered with the chat template, the loss on the last assistant
  message alone, and must share everything before it."""
  for field in (cfg.chosen_field, cfg.rejected_field):
    if field not in record:
      raise ValueError(f"{where}: no field {field!r} (preference records hold both responses)")
  if isinstance(record[cfg.chosen_field], list):
    pair = [_chat_response(record, field, tok, chat_template, cfg, where) for field in
            (cfg.chosen_field, cfg.rejected_field)]  # fmt: skip
    (c, c_mask), (r, r_mask) = pair
    if c[: c_mask.index(True)] != r[: r_mask.index(True)]:
      raise ValueError(f"{where}: chosen and rejected do not share their prompt")
    return (c, c_mask), (r, r_mask)
  prompt = record_text(record, cfg.prompt_field, where)
  head = ([] if tok.bos_id is None else [tok.bos_id]) + tok.encode(prompt)
  out = []
  for field in (cfg.chosen_field, cfg.rejected_field):
    tail = tok.encode(record_text(record, field, where))
    tail += [] if tok.eos_id is None else [tok.eos_id]
    out.append((head + tail, [False] * len(head) + [True] * len(tail)))
  return out[0], out[1]


def _chat_response(record, field, tok, template, cfg: DataConfig, where: str):
  """A chat response (the prompt's messages, if given apart, then the field's) -> its tokens
  and a mask of its last assistant message."""
  messages = record[field]
  if isinstance(record.get(cfg.prompt_field), list):
    messages = record[cfg.prompt_field] + messages
  if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
    raise ValueError(f"{where}: {field!r} must end with the assistant's response")
  tokens, mask = _chat_example(messages, tok, template, cfg, where)
  last = len(mask) - mask[::-1].index(True)  # the end of the last assistant span
  first = last
  while first > 0 and mask[first - 1]:
    first -= 1
  return tokens, [first <= i < last for i in range(len(mask))]


def preference_rows(pairs, seq_len: int) -> tuple[Rows, int]:
  """Pairs -> one row [seq_len] each, chosen (segment 1) then rejected (segment 2), with
  `pair_weights` [rows, 1]; and how many pairs were dropped for not fitting a row together."""
  fits = [(c, r) for c, r in pairs if len(c[0]) + len(r[0]) - 2 <= seq_len]
  fits = [(c, r) for c, r in fits if min(len(c[0]), len(r[0])) >= 2]
  examples = [e for pair in fits for e in pair]
  lengths = [len(tokens) - 1 for tokens, _ in examples]
  placed = [(i, i // 2) for i in range(len(examples))]
  rows = _fill_rows(examples, lengths, placed, seq_len)
  rows["pair_weights"] = np.ones((len(fits), 1), np.float32)
  return rows, len(pairs) - len(fits)


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
    names = sorted({str(record_field(r, cfg.label_field, f"{p}:{n}")) for p, n, r in records})
  if len(names) < 2:
    source = "data.labels" if cfg.labels else "the training data"
    raise ValueError(f"classification needs at least 2 labels; {source} has {names}")
  return names


def classify_rows(
  records: list[Record], tok: Tokenizer, cfg: DataConfig, seq_len: int, label_names: list[str]
) -> Rows:
  """Classifier rows of `records`, one each: classify_examples's rows."""
  return classify_examples(records, tok, cfg, seq_len, label_names)[0]


def classify_examples(records, tok, cfg, seq_len, label_names) -> tuple[Rows, int]:
  """Classifier rows of `records`, one each, and how many texts were cut to seq_len."""
  index = {name: i for i, name in enumerate(label_names)}
  texts, labels = [], []
  for path, line, record in records:
    where = f"{path}:{line}"
    text, label = (
      record_text(record, cfg.text_field, where),
      record_field(record, cfg.label_field, where),
    )
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
