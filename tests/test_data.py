"""Tokenizers, packing and the deterministic batch pipeline."""

import json

import numpy as np
import pytest

from decoderjax import data
from decoderjax.tokenizer import (
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
  b = data.pack_window(window, eos)
  np.testing.assert_array_equal(b["inputs"], [[1, 2, eos, 3, 4, 5, eos, 6]])
  np.testing.assert_array_equal(b["targets"], [[2, eos, 3, 4, 5, eos, 6, 7]])
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 3]])
  np.testing.assert_array_equal(b["positions"], [[0, 1, 2, 0, 1, 2, 3, 0]])
  # No loss where an EOS input would predict the next document's first token.
  np.testing.assert_array_equal(b["weights"], [[1, 1, 0, 1, 1, 1, 0, 1]])


def test_batches_are_a_function_of_step_and_cover_each_epoch():
  tokens = np.arange(1000, dtype=np.int32)
  a = data.Batches(tokens, seq_len=10, batch_size=4, seed=3, eos_id=None)
  b = data.Batches(tokens, seq_len=10, batch_size=4, seed=3, eos_id=None)
  for step in (0, 7, 30):  # any order of access gives the same batch
    np.testing.assert_array_equal(a.batch(step)["inputs"], b.batch(step)["inputs"])
  assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
  epoch = [tuple(a.batch(s)["inputs"][:, 0]) for s in range(a.windows_per_epoch // 4)]
  firsts = [x for row in epoch for x in row]
  assert len(set(firsts)) == len(firsts)  # no window twice within an epoch
  np.testing.assert_array_equal(a.batch(2)["targets"][:, :-1], a.batch(2)["inputs"][:, 1:])


def test_hosts_read_disjoint_rows_of_the_global_batch():
  tokens = np.arange(1000, dtype=np.int32)
  whole = data.Batches(tokens, 10, 4, 0, None).batch(5)["inputs"]
  parts = [
    data.Batches(tokens, 10, 4, 0, None, slice(2 * i, 2 * i + 2)).batch(5)["inputs"]
    for i in range(2)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_jsonl_source_and_bad_input(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps({"body": f"doc {i} " * 20}) for i in range(10)))
  cfg = data.DataConfig(source="jsonl", path=str(path), text_field="body", seq_len=16)
  ds = data.load_dataset(cfg, str(tmp_path / "cache"))
  assert ds.tokenizer.decode(ds.train_tokens[:6]) == "doc 0 "
  assert (ds.train_tokens == ds.tokenizer.eos_id).sum() >= 8
  with pytest.raises(FileNotFoundError, match="no file matches"):
    data.load_dataset(data.DataConfig(source="text", path=str(tmp_path / "nope*.txt")), "")
  (tmp_path / "empty.txt").write_text("  \n")
  with pytest.raises(ValueError, match="holds no text"):
    data.load_dataset(data.DataConfig(source="text", path=str(tmp_path / "empty.txt")), "")
  with pytest.raises(ValueError, match="no field 'text'"):
    data.load_dataset(data.DataConfig(source="jsonl", path=str(path)), "")


def test_eval_batches_cover_the_split_once():
  tokens = np.arange(105, dtype=np.int32)
  batches = list(data.eval_batches(tokens, seq_len=10, batch_size=4, eos_id=None))
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
  cfg = data.DataConfig(source="text", path=str(text), tokenizer="hf", tokenizer_path=str(path))
  ds = data.load_dataset(cfg, str(tmp_path / "cache"))
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
  cfg = data.DataConfig(source="tfds", tfds_name="tiny_plays", tfds_split="train",
                        tfds_eval_split="test", tfds_data_dir=str(tmp_path / "tfds"),
                        tokenizer="byte", seq_len=16)  # fmt: skip
  ds = data.load_dataset(cfg, str(tmp_path / "cache"))
  train_docs = ds.tokenizer.decode(ds.train_tokens).split("Scene ")
  assert len(ds.train_tokens) > 40 * 30 and (ds.train_tokens == ds.tokenizer.eos_id).sum() == 40
  assert (ds.val_tokens == ds.tokenizer.eos_id).sum() == 10
  assert any(doc.startswith("7. Enter the king") for doc in train_docs)
