"""LoRA adapters to and from `peft`: the same logits on both sides, both ways, and round trips."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_hf import save_hf, tokenizer_json  # noqa: E402, F401  (fixture)

from decoderjax.checkpoints import exchange, modeldir, peft_io
from decoderjax.data.tokenizer import load_tokenizer  # noqa: E402
from decoderjax.model import adapters
from decoderjax.model.decoder import Decoder, init_params  # noqa: E402

TOKENS = np.random.default_rng(0).integers(0, 256, (2, 16))
ALL = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module", params=["llama3", "gemma2"])
def base(request, tmp_path_factory, tokenizer_json):  # noqa: F811
  """A tiny random transformers model and our conversion of it (GQA; Gemma 2: heads of 32 in a
  width of 64, norms around every sublayer)."""
  directory = tmp_path_factory.mktemp(request.param)
  model = save_hf(request.param, directory / "hf", tokenizer_json)
  exchange.convert_hf(str(directory / "hf"), str(directory / "ours"))
  return model, str(directory / "ours"), directory


def our_logits(directory):
  model = modeldir.load_model_dir(directory)  # LoRA merged into the weights
  return np.asarray(Decoder(model.config).apply({"params": model.params}, TOKENS)[0])


def peft_logits(hf_model, adapter_dir):
  with torch.no_grad():
    tuned = peft.PeftModel.from_pretrained(hf_model, adapter_dir)
    logits = tuned(torch.from_numpy(TOKENS)).logits.numpy()
    tuned.unload()  # the base module as it was, for the next test
  return logits


def write_adapter(base_dir, out, targets, seed=0):
  """A decoderjax LoRA adapter directory over `base_dir` with random A and B (B off zero)."""
  meta = modeldir.read_metadata(base_dir)
  cfg = meta["model"].replace(lora_rank=4, lora_alpha=8.0, lora_targets=",".join(targets))
  params = nn.unbox(init_params(cfg, jax.random.key(seed)))
  lora, _ = adapters.split_trainable(params, "lora")
  rng = np.random.default_rng(seed)
  lora = jax.tree.map(lambda x: 0.2 * rng.standard_normal(x.shape).astype(np.float32), lora)
  tok = load_tokenizer(os.path.join(base_dir, modeldir.TOKENIZER_DIR))
  extra = {"base": base_dir, "method": "lora"}
  modeldir.write_metadata(str(out), cfg, tok, modeldir.read_generation(base_dir), extra)
  modeldir.save_params(str(out), lora)
  return lora


def test_adapters_trained_here_load_in_peft(base, tmp_path):
  hf_model, base_dir, _ = base
  lora = write_adapter(base_dir, tmp_path / "ours", ALL)
  peft_io.export_peft(str(tmp_path / "ours"), str(tmp_path / "peft"))
  expected = our_logits(str(tmp_path / "ours"))
  assert not np.allclose(expected, our_logits(base_dir), atol=1e-3)  # the adapters matter
  np.testing.assert_allclose(peft_logits(hf_model, str(tmp_path / "peft")), expected, atol=1e-5)
  peft_io.import_peft(str(tmp_path / "peft"), base_dir, str(tmp_path / "back"))  # round trip
  back = modeldir.load_model_dir(str(tmp_path / "back"), merge_lora=False)
  back_lora, _ = adapters.split_trainable(back.params, "lora")
  jax.tree.map(np.testing.assert_array_equal, back_lora, lora)
  assert back.config == modeldir.read_metadata(str(tmp_path / "ours"))["model"]


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapters_convert_to_the_same_logits(base, tmp_path, rslora):
  hf_model, base_dir, _ = base
  torch.manual_seed(1)
  config = peft.LoraConfig(
    r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=rslora,
    init_lora_weights=False,  # B random too: the adapters change the logits
  )  # fmt: skip
  tuned = peft.get_peft_model(hf_model, config)
  tuned.save_pretrained(tmp_path / "peft")
  with torch.no_grad():
    expected = tuned(torch.from_numpy(TOKENS)).logits.numpy()
  tuned.unload()
  peft_io.import_peft(str(tmp_path / "peft"), base_dir, str(tmp_path / "ours"))
  np.testing.assert_allclose(our_logits(str(tmp_path / "ours")), expected, atol=1e-5)


def test_convert_cli_and_bad_adapters(base, tmp_path):
  import json

  _, base_dir, _ = base
  write_adapter(base_dir, tmp_path / "ours", ("q", "v"))
  run = lambda *a: subprocess.run(
    [sys.executable, "-m", "decoderjax.convert", *a], capture_output=True, text=True, timeout=300
  )
  out = run("--to=peft", f"--input={tmp_path / 'ours'}", f"--output={tmp_path / 'peft'}")
  assert out.returncode == 0, out.stderr
  config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
  assert config["target_modules"] == ["q_proj", "v_proj"] and config["r"] == 4
  back = run("--from=peft", f"--input={tmp_path / 'peft'}", f"--base={base_dir}",
             f"--output={tmp_path / 'back'}")  # fmt: skip
  assert back.returncode == 0, back.stderr
  no_base = run("--from=peft", f"--input={tmp_path / 'peft'}", f"--output={tmp_path / 'x'}")
  assert no_base.returncode == 1 and "--from=peft needs --base=MODEL_DIR" in no_base.stderr

  import shutil

  bad = tmp_path / "bad"
  shutil.copytree(tmp_path / "peft", bad)
  for changes, message in [
    ({"target_modules": ["q_proj", "lm_head"]}, "target module(s) ['lm_head'] not supported"),
    ({"modules_to_save": ["score"]}, "modules_to_save=['score'] not supported"),
    ({"r": 8}, "is it the adapter's base model?"),
  ]:
    (bad / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    output = f"--output={tmp_path / 'o'}"
    result = run("--from=peft", f"--input={bad}", f"--base={base_dir}", output)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "o")
  not_lora = run("--to=peft", f"--input={base_dir}", f"--output={tmp_path / 'p'}")
  assert not_lora.returncode == 1 and "not a LoRA adapter directory" in not_lora.stderr
