"""Fine-tuning data: SFT and chat masks, packing, classification rows, batches, augmentation."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest

from decoderjax.data import augmentation, chat_template, tasks
from decoderjax.data import examples as examples_lib
from decoderjax.data import records as records_lib
from decoderjax.data import rows as rows_lib
from decoderjax.data.data_config import DataConfig
from decoderjax.data.tokenizer import ByteTokenizer, CharTokenizer, HFTokenizer

CHATML = (
  "{% for message in messages %}"
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
  {"role": "system", "content": "You are a helpful assistant."},
  {"role": "user", "content": "how are you"},
  {"role": "assistant", "content": "I am well, thank you."},
  {"role": "user", "content": "what sat on the mat"},
  {"role": "assistant", "content": "the cat sat on the mat"},
]
PAIRS = [
  ("Translate: cat", "chat"),
  ("Translate: dog", "chien"),
  ("2 + 2 =", " 4"),
  ("Say hi.", "hi!"),
  ("Capital of France?", "Paris"),
]


@pytest.fixture(scope="module")
def chat_tok() -> HFTokenizer:
  """A byte-level BPE trained here, with ChatML special tokens and an EOS."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator([m["content"] for m in CONVERSATION] * 3, trainer)
  return HFTokenizer(tok.to_str())


def write_jsonl(path, records) -> str:
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return str(path)


def write_csv(path, fields, rows) -> str:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(fields)
    writer.writerows(rows)
  return str(path)


def runs(weights_T: np.ndarray) -> list[slice]:
  """The maximal runs of nonzero weights in a row."""
  edges = np.diff(np.concatenate([[0], weights_T > 0, [0]]).astype(int))
  return [
    slice(a, b)
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True)
  ]


# Reading.


def test_read_records_jsonl_and_csv_with_line_numbers(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
  write_csv(tmp_path / "b.csv", ["x", "y"], [["3", "p, q"], ["4", "r"]])
  records = records_lib.read_records(str(tmp_path / "*"))
  a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.csv")
  assert records == [
    (a, 1, {"x": 1}),
    (a, 3, {"x": 2}),
    (b, 2, {"x": "3", "y": "p, q"}),
    (b, 3, {"x": "4", "y": "r"}),
  ]
  with pytest.raises(ValueError, match="no file matches"):
    records_lib.read_records(str(tmp_path / "none*.jsonl"))
  (tmp_path / "bad.jsonl").write_text('{"x": 1}\n[1, 2]\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object"):
    records_lib.read_records(str(tmp_path / "bad.jsonl"))
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match="holds no records"):
    records_lib.read_records(str(tmp_path / "empty.jsonl"))


def test_render_chat_generation_prompt(chat_tok):
  messages = CONVERSATION[:2]
  plain = chat_template.render_chat(CHATML, messages, chat_tok, add_generation_prompt=False)
  assert plain == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
  assert chat_template.render_chat(CHATML, messages, chat_tok) == plain + "<|im_start|>assistant\n"


# Instruction tuning.


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.train([p + c for p, c in PAIRS])])
def test_sft_weights_cover_exactly_the_completion(tok, tmp_path):
  path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
  cfg = DataConfig(path=path, eval_path=path, task="sft", seq_len=64)
  ds = tasks.load_task_dataset(cfg, tok, None)
  bos = [] if tok.bos_id is None else [tok.bos_id]
  for row, (prompt, completion) in enumerate(PAIRS):  # training rows keep the file's order
    tokens = bos + tok.encode(prompt) + tok.encode(completion) + [tok.eos_id]
    n = len(tokens) - 1
    np.testing.assert_array_equal(ds.train["inputs"][row, :n], tokens[:-1])
    np.testing.assert_array_equal(ds.train["targets"][row, :n], tokens[1:])
    weighted = ds.train["targets"][row][ds.train["weights"][row] > 0]
    np.testing.assert_array_equal(weighted, tok.encode(completion) + [tok.eos_id])
    assert tok.decode(weighted) == completion
    np.testing.assert_array_equal(ds.train["segment_ids"][row], [1] * n + [0] * (64 - n))
    np.testing.assert_array_equal(ds.train["positions"][row, :n], np.arange(n))
  assert ds.stats["loss_tokens"] == sum(len(tok.encode(c)) + 1 for _, c in PAIRS)


def test_chat_weights_cover_exactly_the_assistant_messages(chat_tok, tmp_path):
  path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}] * 2)
  cfg = DataConfig(path=path, task="sft", seq_len=128)
  ds = tasks.load_task_dataset(cfg, chat_tok, CHATML)
  row = ds.train
  n = int((row["segment_ids"][0] > 0).sum())
  text = chat_template.render_chat(CHATML, CONVERSATION, chat_tok, add_generation_prompt=False)
  decode = lambda ids: chat_tok.tok.decode([int(i) for i in ids], skip_special_tokens=False)
  assert decode([*row["inputs"][0, :n], row["targets"][0, n - 1]]) == text
  spans = [decode(row["targets"][0, s]) for s in runs(row["weights"][0])]
  assistant = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
  assert spans == [f"{content}<|im_end|>\n" for content in assistant]
  weighted = chat_tok.decode(row["targets"][0][row["weights"][0] > 0])
  assert weighted == "".join(f"{content}\n" for content in assistant)  # without special tokens
  for message in CONVERSATION:
    if message["role"] != "assistant":
      assert message["content"] not in weighted


def test_sft_record_errors_name_the_file_and_line(chat_tok, tmp_path):
  cfg = DataConfig(task="sft", seq_len=64)
  cases = [
    ({"messages": CONVERSATION}, None, "chat records need a chat template"),
    ({"prompt": "hi", "completion": ""}, CHATML, "empty completion"),
    ({"prompt": "hi"}, CHATML, "empty completion"),
    ({"question": "hi"}, CHATML, "expected fields 'prompt' and 'completion', or 'messages'"),
    ({"messages": CONVERSATION[:2]}, CHATML, "no assistant message"),
    ({"messages": [*CONVERSATION[:2], {"role": "assistant", "content": ""}]}, CHATML, "empty"),
    ({"messages": [{"role": "user"}]}, CHATML, "must be a list of"),
    ({"messages": CONVERSATION}, "{{ messages|length }}" + CHATML, "continuation"),
  ]
  good = {"prompt": "how are you", "completion": "well"}
  for n, (record, template, message) in enumerate(cases):
    path = write_jsonl(tmp_path / f"case{n}.jsonl", [good, good, record])
    run = dataclasses.replace(cfg, path=path, eval_path=path)
    with pytest.raises(ValueError, match=f"case{n}.jsonl:3: .*{message}"):
      tasks.load_task_dataset(run, chat_tok, template)


# Packing.


def naive_first_fit(lengths, order, capacity):
  rooms, placed = [], []
  for i in order:
    row = next((r for r, room in enumerate(rooms) if room >= lengths[i]), len(rooms))
    if row == len(rooms):
      rooms.append(capacity)
    rooms[row] -= lengths[i]
    placed.append(row)
  return placed


def test_packing_keeps_examples_whole_and_counts_truncation():
  rng = np.random.default_rng(0)
  seq_len, shards = 16, 3
  examples = []
  for i in range(60):
    n = int(rng.integers(2, 22))  # some longer than seq_len + 1 = 17
    tokens = list(range(1000 * (i + 1), 1000 * (i + 1) + n))  # every token names its example
    examples.append((tokens, [bool(b) for b in rng.random(n) < 0.5]))
  one_each, truncated = examples_lib.sft_rows(examples, seq_len)
  assert truncated == sum(len(t) > seq_len + 1 for t, _ in examples)
  assert len(one_each["inputs"]) == len(examples) and (one_each["segment_ids"].max(1) == 1).all()
  rows = rows_lib.pack_examples(one_each, shards, seq_len)
  assert len(rows["inputs"]) % shards == 0 and len(rows["inputs"]) < len(examples)
  per_shard = len(rows["inputs"]) // shards
  expected = {t[0] // 1000: (t[: seq_len + 1], m[: seq_len + 1]) for t, m in examples}
  found, where = {}, {}
  for r in range(len(rows["inputs"])):
    seg = rows["segment_ids"][r]
    k = int(seg.max())
    real = seg > 0
    assert real[: real.sum()].all()  # padding only at the end of a row
    np.testing.assert_array_equal(np.unique(seg[real]), np.arange(1, k + 1))
    for name in ("inputs", "targets", "weights", "positions"):
      assert not rows[name][r][~real].any()
    for s in range(1, k + 1):
      at = np.flatnonzero(seg == s)
      assert np.array_equal(at, np.arange(at[0], at[0] + len(at)))  # one contiguous piece
      np.testing.assert_array_equal(rows["positions"][r, at], np.arange(len(at)))
      tokens = [*rows["inputs"][r, at], rows["targets"][r, at[-1]]]
      np.testing.assert_array_equal(rows["targets"][r, at][:-1], rows["inputs"][r, at][1:])
      example = tokens[0] // 1000
      assert example not in found  # never split, never twice
      assert (example - 1) // 20 == r // per_shard  # each shard packs its own examples
      found[example], where[example] = (tokens, rows["weights"][r, at]), r
  assert found.keys() == expected.keys()
  for example, (tokens, weights) in found.items():
    want_tokens, want_mask = expected[example]
    assert tokens == want_tokens
    np.testing.assert_array_equal(weights, np.array(want_mask[1:], np.float32))
  # Each shard's rows agree with a plain first-fit, longest example first.
  lengths = [min(len(t), seq_len + 1) - 1 for t, _ in examples]
  for g in range(shards):
    order = sorted(range(20 * g, 20 * g + 20), key=lambda i: -lengths[i])
    rows_of = [where[i + 1] - g * per_shard for i in order]
    assert rows_of == naive_first_fit(lengths, order, seq_len)


def test_bucket_lengths():
  assert [rows_lib.bucket_length(n, 128) for n in (0, 1, 16, 17, 24, 25, 33, 49, 65, 97)] == [
    16, 16, 16, 24, 24, 32, 48, 64, 96, 128,
  ]  # fmt: skip
  assert rows_lib.bucket_length(200, 256) == 256 and rows_lib.bucket_length(100, 100) == 100


# Classification.

REVIEWS = [
  ("a fine film, truly", "pos"),
  ("dull and far too long", "neg"),
  ("I loved every minute", "pos"),
  ("meh", "neutral"),
  ("the plot, such as it is, drags", "neg"),
  ("wonderful", "pos"),
]


def test_classify_rows_from_csv_and_jsonl_agree(tmp_path):
  tok = ByteTokenizer()
  csv_path = write_csv(tmp_path / "r.csv", ["text", "label"], REVIEWS)
  jsonl_path = write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
  built = []
  for path in (csv_path, jsonl_path):
    cfg = DataConfig(path=path, eval_path=path, task="classify", seq_len=12)
    built.append(tasks.load_task_dataset(cfg, tok, None))
  a, b = built
  assert a.label_names == b.label_names == ["neg", "neutral", "pos"]
  for key in a.train:
    np.testing.assert_array_equal(a.train[key], b.train[key])
  rows = a.train
  for r, (text, label) in enumerate(REVIEWS):
    ids = tok.encode(text)[:11] + [tok.eos_id]
    n = len(ids)
    np.testing.assert_array_equal(rows["inputs"][r], ids + [0] * (12 - n))
    np.testing.assert_array_equal(rows["segment_ids"][r], [1] * n + [0] * (12 - n))
    np.testing.assert_array_equal(rows["positions"][r, :n], np.arange(n))
    assert rows["inputs"][r, rows["last"][r, 0]] == tok.eos_id and rows["last"][r, 0] == n - 1
    assert a.label_names[rows["labels"][r, 0]] == label
  assert a.stats["truncated"] == sum(len(t) > 11 for t, _ in REVIEWS)
  assert (rows["example_weights"] == 1).all()


def test_classify_label_names_and_errors(tmp_path):
  tok = CharTokenizer.train([t for t, _ in REVIEWS])
  records = [{"text": t, "label": i % 2} for i, (t, _) in enumerate(REVIEWS)]
  path = write_jsonl(tmp_path / "train.jsonl", records)
  cfg = DataConfig(path=path, task="classify", seq_len=16, val_fraction=0.3)
  ds = tasks.load_task_dataset(cfg, tok, None)
  assert ds.label_names == ["0", "1"]  # integer labels compare as strings
  assert ds.stats["examples"] + ds.stats["val_examples"] == len(REVIEWS)
  ds = tasks.load_task_dataset(dataclasses.replace(cfg, labels="1, 0, 2"), tok, None)
  assert ds.label_names == ["1", "0", "2"]
  labels = [r["label"] for r in records]
  real = lambda rows: rows["labels"][rows["example_weights"] > 0]  # packed: empty slots too
  both = np.concatenate([real(ds.train), real(ds.val)])
  np.testing.assert_array_equal(np.sort(both), np.sort([1 - y for y in labels]))  # "1" is index 0
  with pytest.raises(ValueError, match=r"train.jsonl:1: label 0 is not one of \['1', '2'\]"):
    tasks.load_task_dataset(dataclasses.replace(cfg, labels="1,2"), tok, None)
  with pytest.raises(ValueError, match="at least 2 labels"):
    tasks.load_task_dataset(dataclasses.replace(cfg, labels="1"), tok, None)
  val = write_jsonl(
    tmp_path / "val.jsonl", [{"text": "meh", "label": 0}, {"text": "meh", "label": 7}]
  )
  with pytest.raises(ValueError, match=r"val.jsonl:2: label 7 is not one of \['0', '1'\]"):
    tasks.load_task_dataset(dataclasses.replace(cfg, eval_path=val), tok, None)
  no_label = write_jsonl(tmp_path / "no_label.jsonl", [{"text": "meh"}])
  with pytest.raises(ValueError, match="no_label.jsonl:1: no field 'label'"):
    tasks.load_task_dataset(dataclasses.replace(cfg, eval_path=no_label), tok, None)
  with pytest.raises(ValueError, match="data.task"):
    tasks.load_task_dataset(dataclasses.replace(cfg, task="lm"), tok, None)


# Batches.


def sft_dataset(tmp_path, n=23, **overrides) -> tasks.TaskDataset:
  records = [{"prompt": f"question {i}?", "completion": f"answer {i}"} for i in range(n)]
  path = write_jsonl(tmp_path / "sft.jsonl", records)
  cfg = DataConfig(path=path, eval_path=path, task="sft", **{"seq_len": 32, **overrides})
  return tasks.load_task_dataset(cfg, ByteTokenizer(), None)


def row_ids(ds, batch) -> list[int]:
  """Which training row each batch row is (the rows are distinct; batches may be cut short)."""
  t = batch["inputs"].shape[1]
  index = {ds.train["inputs"][r, :t].tobytes(): r for r in range(len(ds.train["inputs"]))}
  return [index[row.tobytes()] for row in batch["inputs"]]


def test_train_batches_are_deterministic_and_hosts_partition_them(tmp_path):
  ds = sft_dataset(tmp_path, pack=False)
  n = len(ds.train["inputs"])
  assert n > 8
  a, b = ds.train_batches(8, seed=5), ds.train_batches(8, seed=5)
  for step in (4, 0, 9):  # any order of access gives the same batch
    for key in a.batch(step):
      np.testing.assert_array_equal(a.batch(step)[key], b.batch(step)[key])
  assert row_ids(ds, a.batch(0)) != row_ids(ds, a.batch(1))
  assert row_ids(ds, a.batch(0)) != row_ids(ds, ds.train_batches(8, seed=6).batch(0))
  stream = [r for step in range(6) for r in row_ids(ds, a.batch(step))]
  for epoch in range(len(stream) // n):  # each epoch visits every row once
    assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
  hosts = [ds.train_batches(8, seed=5, rows=slice(i, i + 4)) for i in (0, 4)]
  for key, value in a.batch(3).items():
    np.testing.assert_array_equal(np.concatenate([h.batch(3)[key] for h in hosts]), value)
  records = [{"prompt": f"q{i}", "completion": "a" * (3 + 40 * (i % 7 == 0))} for i in range(40)]
  path = write_jsonl(tmp_path / "mixed.jsonl", records)  # a few long examples, many short
  cfg = DataConfig(path=path, eval_path=path, task="sft", seq_len=96)
  packed = tasks.load_task_dataset(cfg, ByteTokenizer(), None)
  whole = packed.train_batches(8, seed=5, shards=2).batch(3)
  assert whole["segment_ids"].max() > 1 and len(whole["inputs"]) < 8
  hosts = [packed.train_batches(8, seed=5, rows=slice(i, i + 4), shards=2) for i in (0, 4)]
  for key, value in whole.items():  # each host packs its own shard's examples
    np.testing.assert_array_equal(np.concatenate([h.batch(3)[key] for h in hosts]), value)
  plain = dataclasses.replace(packed, config=dataclasses.replace(packed.config, pack=False))
  one_each = plain.train_batches(8, seed=5).batch(3)  # the same examples, a row each
  for key in ("inputs", "targets", "weights"):
    real = [np.sort(b[key][b["segment_ids"] > 0]) for b in (whole, one_each)]
    np.testing.assert_array_equal(*real)


def test_fewer_rows_than_the_batch(tmp_path):
  ds = sft_dataset(tmp_path, n=3, pack=False)
  batches = ds.train_batches(8, seed=1)
  stream = [r for step in range(3) for r in row_ids(ds, batches.batch(step))]
  assert len(stream) == 24
  for epoch in range(8):
    assert sorted(stream[3 * epoch : 3 * epoch + 3]) == [0, 1, 2]


def test_eval_batches_cover_every_row_once(tmp_path):
  ds = sft_dataset(tmp_path, pack=False, bucket=False)
  n = len(ds.val["inputs"])
  batches = list(ds.eval_batches(4))
  assert len(batches) == -(-n // 4) and all(len(b["inputs"]) == 4 for b in batches)
  inputs = np.concatenate([b["inputs"] for b in batches])
  weights = np.concatenate([b["weights"] for b in batches])
  np.testing.assert_array_equal(inputs[:n], ds.val["inputs"])
  np.testing.assert_array_equal(weights[:n], ds.val["weights"])
  assert not weights[n:].any() and not inputs[n:].any()
  assert len(list(ds.eval_batches(4, max_batches=2))) == 2


def test_classify_eval_batches_pad_with_zero_example_weights(tmp_path):
  path = write_jsonl(tmp_path / "r.jsonl", [{"text": t, "label": y} for t, y in REVIEWS])
  cfg = DataConfig(path=path, eval_path=path, task="classify", seq_len=8)
  ds = tasks.load_task_dataset(cfg, ByteTokenizer(), None)
  last = list(ds.eval_batches(4, multiple=4))[-1]  # 6 rows on 4 devices: batches of 4
  np.testing.assert_array_equal(last["example_weights"], [[1], [1], [0], [0]])  # a row each
  np.testing.assert_array_equal(last["labels"][:2], ds.val["labels"][4:])


# Augmentation.


def test_augmentation_off_leaves_batches_alone(tmp_path):
  ds = sft_dataset(tmp_path)
  batch = ds.train_batches(8, seed=0).batch(2)
  ids, t = row_ids(ds, batch), batch["inputs"].shape[1]
  np.testing.assert_array_equal(batch["inputs"], ds.train["inputs"][ids, :t])
  assert not ds.train["segment_ids"][ids, t:].any()  # bucketing cut padding alone


@pytest.mark.parametrize("name", ["token_dropout", "random_replace", "span_mask"])
def test_augmentation_changes_only_real_inputs_at_its_rate(name, tmp_path):
  p = 0.1
  records = [{"prompt": "p" * 100, "completion": "c" * (100 + i % 50)} for i in range(64)]
  path = write_jsonl(tmp_path / "long.jsonl", records)
  cfg = DataConfig(path=path, eval_path=path, task="sft", seq_len=256, **{name: p})
  ds = tasks.load_task_dataset(cfg, ByteTokenizer(), None)
  plain = tasks.load_task_dataset(dataclasses.replace(cfg, **{name: 0.0}), ByteTokenizer(), None)
  batches, clean = ds.train_batches(64, seed=2), plain.train_batches(64, seed=2)
  batch, reference = batches.batch(1), clean.batch(1)
  for key in ("targets", "weights", "segment_ids", "positions"):
    np.testing.assert_array_equal(batch[key], reference[key])
  np.testing.assert_array_equal(batches.batch(1)["inputs"], batch["inputs"])  # deterministic
  assert not np.array_equal(batches.batch(2)["inputs"][0], batch["inputs"][0])
  real = reference["segment_ids"] > 0
  changed = batch["inputs"] != reference["inputs"]
  assert not changed[~real].any()
  if name != "random_replace":
    assert (batch["inputs"][changed] == ByteTokenizer.eos_id).all()
  rate = changed[real].mean()
  if name == "span_mask":  # a token is covered unless no span reaching it starts before it
    q = 1 / cfg.span_length
    p = 1 - np.prod([1 - p * (1 - q) ** k for k in range(200)])
  assert abs(rate - p) < 0.02, (rate, p)
  hosts = [ds.train_batches(64, seed=2, rows=slice(i, i + 32)) for i in (0, 32)]
  np.testing.assert_array_equal(
    np.concatenate([h.batch(1)["inputs"] for h in hosts]), batch["inputs"]
  )


def test_augmentation_probabilities_are_checked(tmp_path):
  with pytest.raises(ValueError, match=r"data.token_dropout must be in \[0, 1\)"):
    sft_dataset(tmp_path, token_dropout=1.0)
  inputs = np.arange(12).reshape(2, 6)
  with pytest.raises(ValueError, match="data.span_mask"):
    augmentation.augment(
      inputs, inputs, np.random.default_rng(0), DataConfig(span_mask=-0.1), 20, 0
    )


@pytest.mark.parametrize(
  "n,batch_size,multiple,sizes",
  [(23, 16, 1, [12, 12]), (23, 16, 8, [16, 16]), (17, 16, 4, [12, 12]), (16, 16, 1, [16]),
   (5, 16, 2, [6])],
)  # fmt: skip
def test_row_batches_are_balanced_and_keep_every_row_once(n, batch_size, multiple, sizes):
  """As few batches as hold the rows, of one size (a multiple of the devices), padded with
  zero-weight rows at the end only: the last batch is no longer mostly padding."""
  rows = {
    "inputs": np.arange(1, n + 1)[:, None] * np.ones((1, 4), np.int32),
    "weights": np.ones((n, 4), np.float32),
  }
  batches = list(tasks.row_batches(rows, batch_size, multiple=multiple))
  assert [len(b["inputs"]) for b in batches] == sizes
  inputs = np.concatenate([b["inputs"][:, 0] for b in batches])
  weights = np.concatenate([b["weights"][:, 0] for b in batches])
  assert inputs[:n].tolist() == list(range(1, n + 1)) and not inputs[n:].any()
  assert weights.sum() == n
