"""Tokenizers, packing and the deterministic batch pipeline."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from decoderjax.data import batches as batches_lib
from decoderjax.data import data_config, pipeline
from decoderjax.data.tokenizer import (
  ByteTokenizer,
  CharTokenizer,
  SentencePieceTokenizer,
  build_tokenizer,
  load_tokenizer,
)

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_tokenizer_round_trip_and_save(kind, tmp_path):
  tok = build_tokenizer(kind, [TEXT])
  assert tok.decode(tok.encode(TEXT)) == TEXT
  assert max(tok.encode(TEXT)) < tok.vocab_size and tok.eos_id < tok.vocab_size
  tok.save(str(tmp_path))
  again = load_tokenizer(str(tmp_path))
  assert again.encode(TEXT) == tok.encode(TEXT) and again.vocab_size == tok.vocab_size


def test_char_tokenizer_matches_nanogpt_vocabulary(shakespeare_text):
  tok = CharTokenizer.train([shakespeare_text])
  assert tok.vocab_size == 65 + 1  # nanoGPT's 65 characters, then EOS
  chars = sorted(set(shakespeare_text))
  assert tok.encode("hello") == [chars.index(c) for c in "hello"]
  with pytest.raises(ValueError, match="not in the char tokenizer"):
    tok.encode("ä")


def test_byte_tokenizer_handles_unicode():
  tok = ByteTokenizer()
  assert tok.decode(tok.encode("naïve ☃")) == "naïve ☃"


def test_sentencepiece_trains_saves_and_loads(tmp_path, shakespeare_text):
  tok = SentencePieceTokenizer.train([shakespeare_text[:200_000]], vocab_size=500)
  assert tok.vocab_size == 500 and tok.eos_id == 2
  ids = tok.encode("To be, or not to be: that is the question.")
  assert len(ids) < 30 and tok.decode(ids) == "To be, or not to be: that is the question."
  assert tok.decode(tok.encode("unseen ∑ char")) == "unseen ∑ char"  # byte fallback
  tok.save(str(tmp_path))
  assert load_tokenizer(str(tmp_path)).encode("the king") == tok.encode("the king")


def test_pack_window_segments_positions_and_weights():
  eos = 9
  window = np.array([[1, 2, eos, 3, 4, 5, eos, 6, 7]])
  b = batches_lib.pack_window(window, eos)
  np.testing.assert_array_equal(b["inputs"], [[1, 2, eos, 3, 4, 5, eos, 6]])
  np.testing.assert_array_equal(b["targets"], [[2, eos, 3, 4, 5, eos, 6, 7]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 0]])
  # No loss where an EOS input would predict the next document's first token.
  np.testing.assert_array_equal(b["weights"], [[1, 1, 0, 1, 1, 1, 0, 1]])


def test_batches_are_a_function_of_step_and_cover_each_epoch():
  tokens = np.arange(1000, dtype=np.int32)
  a = batches_lib.Batches(tokens, seq_len=10, batch_size=4, seed=3, eos_id=None)
  b = batches_lib.Batches(tokens, seq_len=10, batch_size=4, seed=3, eos_id=None)
  for step in (0, 7, 30):  # any order of access gives the same batch
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
  epoch = [tuple(a.batch(s)["inputs"][:, 0]) for s in range(a.windows_per_epoch // 4)]
  firsts = [x for row in epoch for x in row]
  assert len(set(firsts)) == len(firsts)  # no window twice within an epoch
  np.testing.assert_array_equal(a.batch(2)["targets"][:, :-1], a.batch(2)["inputs"][:, 1:])


def test_hosts_read_disjoint_rows_of_the_global_batch():
  tokens = np.arange(1000, dtype=np.int32)
  whole = batches_lib.Batches(tokens, 10, 4, 0, None).batch(5)["inputs"]
  parts = [
    batches_lib.Batches(tokens, 10, 4, 0, None, slice(2 * i, 2 * i + 2)).batch(5)["inputs"]
    for i in range(2)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_jsonl_source_and_bad_input(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps({"body": f"doc {i} " * 20}) for i in range(10)))
  cfg = data_config.DataConfig(source="jsonl", path=str(path), text_field="body", seq_len=16)
  ds = pipeline.load_dataset(cfg, str(tmp_path / "cache"))
  assert ds.tokenizer.decode(ds.train_tokens[:6]) == "doc 0 "
  assert (ds.train_tokens[:] == ds.tokenizer.eos_id).sum() >= 8
  with pytest.raises(FileNotFoundError, match="no file matches"):
    pipeline.load_dataset(
      data_config.DataConfig(source="text", path=str(tmp_path / "nope*.txt")), ""
    )
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="holds no text"):
    pipeline.load_dataset(
      data_config.DataConfig(source="text", path=str(tmp_path / "empty.txt")), str(tmp_path)
    )
  with pytest.raises(ValueError, match="no field 'text'"):
    pipeline.load_dataset(data_config.DataConfig(source="jsonl", path=str(path)), str(tmp_path))


def test_eval_batches_cover_the_split_once():
  tokens = np.arange(105, dtype=np.int32)
  batches = list(batches_lib.eval_batches(tokens, seq_len=10, batch_size=4, eos_id=None))
  assert sum(b["weights"].sum() for b in batches) == 100
  assert all(b["inputs"].shape == (4, 10) for b in batches)


def test_hf_tokenizer_json_trains_a_model_and_saves(tmp_path, shakespeare_text):
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"])
  hf.train_from_iterator([shakespeare_text[:100_000]], trainer)
  path = tmp_path / "tokenizer.json"
  hf.save(str(path))

  text = tmp_path / "t.txt"
  text.write_text(shakespeare_text[:20_000])
  cfg = data_config.DataConfig(
    source="text", path=str(text), tokenizer="hf", tokenizer_path=str(path)
  )
  ds = pipeline.load_dataset(cfg, str(tmp_path / "cache"))
  tok = ds.tokenizer
  assert tok.kind == "hf" and tok.eos_id == hf.token_to_id("<|endoftext|>")
  assert ds.train_tokens[:10].tolist() == hf.encode(shakespeare_text[:200]).ids[:10]
  tok.save(str(tmp_path / "saved"))
  again = load_tokenizer(str(tmp_path / "saved"))
  assert again.encode("Good morrow") == tok.encode("Good morrow")
  assert again.eos_id == tok.eos_id and again.vocab_size == tok.vocab_size


def test_tfds_source_reads_a_locally_built_dataset(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")  # the `tfds` extra; CI installs it

  class TinyPlays(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(0, 40), "test": self._generate_examples(40, 50)}

    def _generate_examples(self, lo, hi):
      for i in range(lo, hi):
        yield i, {"text": f"Scene {i}. Enter the king, and speaks line {i}."}

  TinyPlays(data_dir=str(tmp_path / "tfds")).download_and_prepare()  # built here, no download
  cfg = data_config.DataConfig(source="tfds", tfds_name="tiny_plays", tfds_split="train",
                        tfds_eval_split="test", tfds_data_dir=str(tmp_path / "tfds"),
                        tokenizer="byte", seq_len=16)  # fmt: skip
  ds = pipeline.load_dataset(cfg, str(tmp_path / "cache"))
  train_docs = ds.tokenizer.decode(ds.train_tokens[:]).split("Scene ")
  assert len(ds.train_tokens) > 40 * 30 and (ds.train_tokens[:] == ds.tokenizer.eos_id).sum() == 40
  assert (ds.val_tokens[:] == ds.tokenizer.eos_id).sum() == 10
  assert any(doc.startswith("7. Enter the king") for doc in train_docs)


# Prepared sources and mixtures.


def prepared(directory, text: str, tokenizer="byte"):
  """A prepared directory of one text file's tokens."""
  from decoderjax.data import ingest

  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "in.txt")
  with open(path, "w") as f:
    f.write(text)
  cfg = ingest.PrepareConfig(inputs=path, tokenizer=tokenizer, chunk_mb=0.01)
  ingest.prepare(cfg, os.path.join(directory, "prepared"), quiet=True)
  return os.path.join(directory, "prepared")


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  """A large source of letters a-m and a small one of letters n-z."""
  root = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  big = "".join(rng.choice(list("abcdefghijklm"), 40_000))
  small = "".join(rng.choice(list("nopqrstuvwxyz"), 3_000))
  return prepared(str(root / "big"), big), prepared(str(root / "small"), small)


def mixture_dataset(two_sources, weights="0.7,0.3", **changes):
  a, b = two_sources
  wa, wb = weights.split(",")
  cfg = data_config.DataConfig(
    source="prepared", mixture=f"{a}:{wa},{b}:{wb}", tokenizer="byte", seq_len=16, **changes
  )
  return pipeline.load_dataset(cfg, "")


def test_mixture_gives_each_source_its_share_and_repeats_small_epochs(two_sources):
  ds = mixture_dataset(two_sources)
  batches = ds.train_batches(100, seed=1)
  for first in (0, 123_456):  # any 10,000 consecutive rows
    source, _ = batches.schedule(np.arange(first, first + 10_000))
    assert abs((source == 0).mean() - 0.7) < 0.01 and abs((source == 1).mean() - 0.3) < 0.01
  for step in (0, 40, 99):  # rows hold the tokens of the source the schedule names
    rows = batches.batch(step)["inputs"]
    source, _ = batches.schedule(np.arange(step * 100, step * 100 + 100))
    is_small = np.isin(rows, np.frombuffer(b"nopqrstuvwxyz", np.uint8)).all(axis=1)
    np.testing.assert_array_equal(is_small, source == 1)
  small = batches.sources[1]  # ~170 windows: each epoch visits each once, in a fresh order
  n = small.windows_per_epoch
  epochs = [small.window_starts(np.arange(k * n, (k + 1) * n)) for k in range(3)]
  for starts in epochs:
    assert len(set((starts - starts.min()) // 16)) == n
  assert not np.array_equal(epochs[0], epochs[1])
  seen = batches.tokens_seen(100)
  assert sum(seen.values()) == 100 * 100 * 16
  assert abs(seen["tokens_seen/small/prepared"] / 160_000 - 0.3) < 0.01


def test_mixture_batches_are_a_function_of_step_and_split_over_hosts(two_sources):
  ds = mixture_dataset(two_sources)
  a, b = ds.train_batches(8, seed=5), mixture_dataset(two_sources).train_batches(8, seed=5)
  for step in (3, 0, 50):
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  hosts = [ds.train_batches(8, seed=5, rows=slice(i, i + 4)) for i in (0, 4)]
  whole = a.batch(9)["inputs"]
  np.testing.assert_array_equal(np.concatenate([h.batch(9)["inputs"] for h in hosts]), whole)
  val = list(ds.eval_batches(8))
  assert val and sum(v["weights"].sum() for v in val) > 0


@pytest.mark.parametrize(
  "weights, message",
  [("0.7,x", "is not DIR:WEIGHT"), ("0,0", "no source with a positive weight"), ("1,-1", ">= 0")],
)
def test_bad_mixture_weights_are_refused(two_sources, weights, message):
  with pytest.raises(ValueError, match=message):
    mixture_dataset(two_sources, weights)


@pytest.mark.parametrize(
  "changes, message",
  [
    (
      dict(source="default", path="my.txt"),
      "data.path='my.txt' is not read by data.source='default'",
    ),
    (dict(source="text", path="a.txt", tfds_name="lm1b"), "data.tfds_name='lm1b' is not read"),
    (dict(source="prepared", path="D", vocab_size=8), "data.vocab_size is not used"),
    (dict(source="prepared"), "needs data.path=DIR or data.mixture"),
    (dict(source="jsonl"), "needs data.path"),
  ],
)
def test_an_input_the_source_would_not_read_is_an_error(changes, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    pipeline.load_dataset(data_config.DataConfig(**changes), "")


HOST_SCRIPT = """
import sys, numpy as np, jax
from decoderjax.data import data_config, pipeline
from decoderjax.runtime import sharding
port, n, i, out, single, mixture = sys.argv[1:]
if int(n) > 1:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", int(n), int(i))
mesh = sharding.make_mesh(sharding.MeshConfig())
rows = sharding.local_batch_rows(mesh, 8)
arrays = {}
for name, cfg in (("single", dict(path=single)), ("mixture", dict(mixture=mixture))):
  cfg = data_config.DataConfig(source="prepared", tokenizer="byte", seq_len=16, **cfg)
  ds = pipeline.load_dataset(cfg, "")
  batches = ds.train_batches(8, seed=2, rows=rows)
  for step in (0, 1, 7, 300):
    arrays[f"{name}{step}"] = batches.batch(step)["inputs"]
np.savez(out, start=rows.start, **arrays)
if int(n) > 1:
  jax.distributed.shutdown()
"""


def test_processes_read_disjoint_rows_that_make_the_global_batch(tmp_path, two_sources):
  from test_sharding import _free_port

  a, b = two_sources
  mixture = f"{a}:0.5,{b}:0.5"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}

  def run(n):
    port = _free_port()
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          "-c",
          HOST_SCRIPT,
          str(port),
          str(n),
          str(i),
          str(tmp_path / f"{n}-{i}.npz"),
          a,
          mixture,
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
      )  # fmt: skip
      for i in range(n)
    ]
    for p in procs:
      assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    return [np.load(tmp_path / f"{n}-{i}.npz") for i in range(n)]

  (one,) = run(1)
  for n in (2, 4):
    parts = sorted(run(n), key=lambda p: int(p["start"]))
    assert [int(p["start"]) for p in parts] == list(range(0, 8, 8 // n))
    for key in one.files:
      if key != "start":
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), one[key])
