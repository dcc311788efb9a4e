"""Generation: greedy equals full recomputation, batched equals one-by-one, sampling stays in the
allowed set, and greedy/penalized/beam outputs match `transformers`' generate."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decoderjax.checkpoints import exchange, modeldir
from decoderjax.inference import sampling
from decoderjax.inference.beam import beam_search
from decoderjax.inference.sampling import SamplingConfig
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset


@pytest.fixture(scope="module")
def tiny():
  cfg = get_preset("tiny-llama").replace(max_seq_len=96)
  params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p * 4.0, params)  # sharper logits: argmax ties impossible
  return cfg, params


def greedy(cfg, params, prompts, n, stop_ids=(), **kw):
  tokens, mask = sampling.left_pad(prompts)
  return sampling.generate_tokens(
    params, cfg, tokens, mask, jax.random.key(0), n, SamplingConfig(temperature=0, **kw), stop_ids
  )


def test_greedy_equals_argmax_of_full_recomputation(tiny):
  cfg, params = tiny
  prompt = [5, 17, 3, 99, 42]
  out, lengths = greedy(cfg, params, [prompt], 20)
  assert lengths.tolist() == [20]
  sequence = list(prompt)
  for token in out[0]:
    logits, _ = Decoder(cfg).apply({"params": params}, jnp.asarray([sequence]))
    assert int(jnp.argmax(logits[0, -1])) == token
    sequence.append(int(token))


def test_greedy_tokens_is_argmax():
  logits = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
  logits[:, 7] = logits.max(-1)  # ties: the first index wins
  logits[3, 40] = np.nan  # as jnp.argmax: the first NaN
  logits[5, [9, 20]] = np.nan
  got = sampling.greedy_tokens(jnp.asarray(logits))
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(logits), axis=-1))
  assert got.dtype == jnp.int32 and int(got[3]) == 40 and int(got[5]) == 9


def test_batched_generation_equals_one_by_one(tiny):
  cfg, params = tiny
  prompts = [[5, 17, 3], [9, 8, 7, 6, 5, 4, 3], [100], [1, 2]]
  batch, _ = greedy(cfg, params, prompts, 12)
  for row, prompt in enumerate(prompts):
    alone, _ = greedy(cfg, params, [prompt], 12)
    np.testing.assert_array_equal(batch[row], alone[0])
  # Left padding to a length bucket changes nothing either.
  tokens, mask = sampling.left_pad(prompts, sampling.bucket_length(7, 64))
  assert tokens.shape == (4, 16)
  bucketed, _ = sampling.generate_tokens(
    params, cfg, tokens, mask, jax.random.key(0), 12, SamplingConfig(temperature=0)
  )
  np.testing.assert_array_equal(bucketed, batch)


def test_rows_stop_independently_and_chunks_change_nothing(tiny):
  cfg, params = tiny
  prompts = [[5, 17, 3], [9, 8, 7]]
  free, _ = greedy(cfg, params, prompts, 16)
  stop = int(free[0, 4])  # row 0 emits it at step 5
  out, lengths = greedy(cfg, params, prompts, 16, stop_ids=[stop])
  first = [list(row).index(stop) + 1 if stop in row else 16 for row in free]
  assert lengths.tolist() == first
  for row, n in enumerate(first):
    np.testing.assert_array_equal(out[row, :n], free[row, :n])
  seen = []

  def on_chunk(tokens, lengths):
    seen.append(lengths.copy())
    return np.array([False, lengths[1] >= 6])  # the host stops row 1 (as a stop string would)

  tokens, mask = sampling.left_pad(prompts)
  chunked, lengths = sampling.generate_tokens(
    params, cfg, tokens, mask, jax.random.key(0), 16, SamplingConfig(temperature=0), [stop],
    chunk=3, on_chunk=on_chunk,
  )  # fmt: skip
  assert [s.tolist() for s in seen[:2]] == [[3, 3], [first[0], 6]]
  assert lengths.tolist() == [first[0], 6]
  np.testing.assert_array_equal(chunked[1, :6], free[1, :6])


def test_sliding_window_generation_recomputes_the_window_it_keeps(tiny):
  """Past a window of 16, generation goes on from the window's last half at positions from 0:
  each token is the argmax of the model over the text since the last slide, and the first
  window equals plain greedy decoding."""
  from decoderjax.data.tokenizer import ByteTokenizer
  from decoderjax.inference import offline

  cfg, params = tiny
  model = modeldir.ModelDir(cfg, params, ByteTokenizer(), {})
  window, prompts = 16, [[5, 17, 3, 99, 42], [7, 8]]
  config = offline.GenerateConfig(48, SamplingConfig(temperature=0), window=window)
  results, timings = offline.Generator(model, config)(prompts)
  assert timings["windows"] > 3  # rows slide at their own lengths
  forward = jax.jit(lambda t: Decoder(cfg).apply({"params": params}, t)[0][0])
  for prompt, result in zip(prompts, results, strict=True):
    plain, _ = greedy(cfg, params, [prompt], window - len(prompt))
    assert result["tokens"][: window - len(prompt)] == plain[0].tolist()
    text, start = list(prompt), 0
    for token in result["tokens"]:
      if len(text) - start >= window:
        start = len(text) - window // 2
      context = text[start:]  # right-padded to the window: causal, so the padding is unseen
      logits = forward(jnp.asarray([context + [0] * (window - len(context))]))
      assert int(jnp.argmax(logits[len(context) - 1])) == token
      text.append(token)
    assert len(result["tokens"]) == 48
  with pytest.raises(ValueError, match="over the window of 16 tokens, which beam search does not"):
    beams = offline.GenerateConfig(48, num_beams=2, window=window)
    offline.Generator(model, beams)(prompts)
  with pytest.raises(ValueError, match="exceeds the model's context of 96"):
    offline.Generator(model, offline.GenerateConfig(8, window=97))


@pytest.mark.parametrize(
  "config",
  [
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=0.7, top_p=0.5),
    SamplingConfig(temperature=1.3, min_p=0.2),
    SamplingConfig(temperature=1.0, top_k=20, top_p=0.8),
  ],
  ids=["top_k", "top_p", "min_p", "top_k_top_p"],
)
def test_sampling_never_leaves_the_allowed_set(config):
  logits = np.random.default_rng(0).normal(0, 3, (64, 50)).astype(np.float32)
  scaled = logits / config.temperature
  allowed = np.ones_like(logits, bool)
  order = np.argsort(-scaled, axis=1)
  if config.top_k:
    allowed &= scaled >= np.take_along_axis(scaled, order[:, config.top_k - 1 : config.top_k], 1)
  if config.top_p < 1:  # independently: keep the shortest prefix (by probability) reaching top_p
    masked = np.where(allowed, scaled, -np.inf)
    probs = np.exp(masked - masked.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    for row in range(len(logits)):
      ranked = np.argsort(-probs[row])
      n = np.searchsorted(np.cumsum(probs[row, ranked]), config.top_p) + 1
      allowed[row] &= np.isin(np.arange(50), ranked[:n])
  if config.min_p:
    probs = np.exp(scaled - scaled.max(1, keepdims=True))
    allowed &= probs >= config.min_p
  sample = jax.jit(lambda key: sampling.sample_logits(jnp.asarray(logits), key, config))
  counts = np.zeros_like(logits)
  for seed in range(200):
    tokens = np.asarray(sample(jax.random.key(seed)))
    counts[np.arange(64), tokens] += 1
  assert counts[~allowed].sum() == 0
  assert (counts > 0).sum() > 64  # it does sample: more than one token per row over the seeds


def test_bad_sampling_values_are_refused():
  for kwargs, message in (
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"min_p": 1.0}, "min_p must be in [0, 1)"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
  ):
    with pytest.raises(ValueError, match=re.escape(message)):
      SamplingConfig(**kwargs)


def test_penalties_discourage_repeats(tiny):
  cfg, params = tiny
  plain, _ = greedy(cfg, params, [[5, 17, 3]], 40)
  penalized, _ = greedy(cfg, params, [[5, 17, 3]], 40, frequency_penalty=100.0)
  assert len(set(plain[0].tolist())) < 40  # a random model loops
  assert len(set(penalized[0].tolist())) == 40  # a huge frequency penalty forbids any repeat


def test_bucket_length():
  assert [sampling.bucket_length(n, 1000) for n in (1, 16, 17, 100, 600)] == [16, 16, 32, 128, 1000]
  assert sampling.bucket_length(100, 110) == 110  # capped by the room left in the context
  assert sampling.bucket_length(120, 110) == 120  # never shorter than the prompt
  fine = [sampling.bucket_length(n, 1000, fine=True) for n in (1, 16, 17, 25, 33, 49, 97, 600)]
  assert fine == [16, 16, 24, 32, 48, 64, 128, 768]


# Parity with transformers' generate on converted tiny random models.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from test_hf import save_hf, tokenizer_json  # noqa: E402, F401  (fixture)


@pytest.fixture(scope="module", params=["gpt2", "llama3"])
def converted(request, tmp_path_factory, tokenizer_json):  # noqa: F811
  directory = tmp_path_factory.mktemp(request.param)
  context = {"n_positions": 128} if request.param == "gpt2" else {"max_position_embeddings": 128}
  model = save_hf(request.param, directory / "hf", tokenizer_json, **context)
  with torch.no_grad():  # sharper logits than the 0.02 init: no near-ties between tokens
    for p in model.parameters():
      p.mul_(3.0)
  model.save_pretrained(directory / "hf", safe_serialization=True)
  exchange.convert_hf(str(directory / "hf"), str(directory / "ours"))
  return model, modeldir.load_model_dir(str(directory / "ours"))


PROMPT = [[11, 200, 7, 42, 3, 99, 150, 8]]


def hf_generate(model, prompt, eos=None, **kwargs):
  with torch.no_grad():
    out = model.generate(
      torch.tensor(prompt), attention_mask=torch.ones(len(prompt), len(prompt[0]), dtype=int),
      eos_token_id=eos, pad_token_id=0, **kwargs,
    )  # fmt: skip
  return out[:, len(prompt[0]) :].numpy()


def test_greedy_matches_transformers(converted):
  model, ours = converted
  expected = hf_generate(model, PROMPT, max_new_tokens=64, do_sample=False)
  got, _ = greedy(ours.config, ours.params, PROMPT, 64)
  np.testing.assert_array_equal(got, expected)
  expected = hf_generate(model, PROMPT, max_new_tokens=32, do_sample=False, repetition_penalty=1.5)
  got, _ = greedy(ours.config, ours.params, PROMPT, 32, repetition_penalty=1.5)
  np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
  "length_penalty,early_stopping", [(1.0, False), (0.5, True), (2.0, "never")]
)
def test_beam_search_matches_transformers(converted, length_penalty, early_stopping):
  model, ours = converted
  n, beams = 24, 4
  free = hf_generate(model, PROMPT, max_new_tokens=n, num_beams=beams, do_sample=False)
  for eos in (None, int(free[0, 6])):  # never stopping, then stopping mid-way
    kwargs = dict(length_penalty=length_penalty, early_stopping=early_stopping)
    expected = hf_generate(model, PROMPT, eos, max_new_tokens=n, num_beams=beams, **kwargs)
    tokens, mask = sampling.left_pad(PROMPT)
    stop = jnp.asarray([-1 if eos is None else eos], jnp.int32)
    got, lengths, _ = beam_search(
      ours.params, ours.config, tokens, mask, stop, n, beams, length_penalty, early_stopping
    )
    length = int(lengths[0])
    assert length == expected.shape[1] or eos is not None and expected[0, length - 1] == eos
    np.testing.assert_array_equal(np.asarray(got)[0, :length], expected[0, :length])


# The generate binary on a small char-level model directory.
ALPHABET = "abcdefghij klmnop"


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
  import flax.linen as nn

  from decoderjax.data.tokenizer import CharTokenizer

  tok = CharTokenizer(ALPHABET)
  cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=64)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32))["params"])
  params = jax.tree.map(lambda p: p * 4.0, params)
  directory = tmp_path_factory.mktemp("char") / "m"
  modeldir.save_model_dir(str(directory), cfg, params, tok, {"temperature": 0})
  return directory, cfg, params, tok


def run_generate(directory, *flags, stdin=None, env=None):
  import subprocess
  import sys

  return subprocess.run(
    [sys.executable, "-m", "decoderjax.generate", f"--checkpoint={directory}", *flags],
    capture_output=True, text=True, timeout=300, input=stdin, env=env,
  )  # fmt: skip


def test_generate_cli_keeps_compiled_programs_in_the_user_cache(char_model, tmp_path):
  import os

  directory = char_model[0]
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XDG_CACHE_HOME=str(tmp_path / "home"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  flags = ["--prompt=abc", "--max_new_tokens=8", "--ignore_eos"]
  first = run_generate(directory, *flags, env=env)
  assert first.returncode == 0, first.stderr
  [cache] = (tmp_path / "home" / "decoderjax").glob("xla-*")  # keyed by this host's CPU
  assert {"jit_prefill", "jit_decode"} <= {p.name.split("-")[0] for p in cache.iterdir()}
  again = run_generate(directory, *flags, env=env)  # the programs come from the cache
  assert again.returncode == 0, again.stderr
  assert again.stdout.splitlines()[0] == first.stdout.splitlines()[0]
  env["XDG_CACHE_HOME"] = str(tmp_path / "off")
  off = run_generate(directory, *flags, "--compilation_cache=none", env=env)
  assert off.returncode == 0, off.stderr
  assert not (tmp_path / "off").exists()


def test_generate_cli_streams_stops_on_strings_and_reads_jsonl(char_model, tmp_path):
  import json

  directory, cfg, params, tok = char_model
  base = ["--prompt=abc", "--max_new_tokens=30", "--ignore_eos", f"--output_json={tmp_path / 'a'}"]
  free = run_generate(directory, *base)
  assert free.returncode == 0, free.stderr
  [record] = json.loads((tmp_path / "a").read_text())
  text = record["text"]
  assert len(record["tokens"]) == 30 and tok.decode(record["tokens"]) == text
  assert free.stdout.startswith("abc" + text)  # streamed: the prompt, then the new text
  long = run_generate(directory, "--prompt=abc", "--max_new_tokens=150", "--ignore_eos",
                      f"--output_json={tmp_path / 'long'}")  # fmt: skip
  assert long.returncode == 0, long.stderr  # past the 64-token context: the window slides
  [record] = json.loads((tmp_path / "long").read_text())
  assert len(record["tokens"]) == 150 and record["text"].startswith(text)
  assert long.stdout.startswith("abc" + record["text"] + "\n")  # streamed across windows
  assert "windows]" in long.stdout
  stop = text[12:14]
  stopped = run_generate(directory, *base, f"--stop={stop}")
  assert stopped.returncode == 0, stopped.stderr
  [record] = json.loads((tmp_path / "a").read_text())
  assert record["text"] == text[: text.find(stop)]  # cut before the stop string
  assert tok.decode(record["tokens"]).endswith(stop)  # generation ended on the stop string
  assert stopped.stdout.startswith("abc" + record["text"] + "\n")

  prompts = tmp_path / "p.jsonl"
  prompts.write_text('{"prompt": "abc"}\n{"prompt": "kl mn"}\n')
  batch = run_generate(directory, f"--prompt_file={prompts}", "--max_new_tokens=30",
                       "--ignore_eos", f"--output_json={tmp_path / 'b'}")  # fmt: skip
  assert batch.returncode == 0, batch.stderr
  records = json.loads((tmp_path / "b").read_text())
  assert [r["prompt"] for r in records] == ["abc", "kl mn"] and records[0]["text"] == text


def test_generate_cli_beam_search_and_interactive(char_model, tmp_path):
  import json

  directory, cfg, params, tok = char_model
  beam = run_generate(directory, "--prompt=abc", "--max_new_tokens=12", "--num_beams=3",
                      "--ignore_eos", f"--output_json={tmp_path / 'a'}")  # fmt: skip
  assert beam.returncode == 0, beam.stderr
  tokens, mask = sampling.left_pad([tok.encode("abc")], 16)
  expected, _, _ = beam_search(params, cfg, tokens, mask, jnp.asarray([-1], jnp.int32), 12, 3)
  assert json.loads((tmp_path / "a").read_text())[0]["tokens"] == np.asarray(expected)[0].tolist()

  chat = run_generate(directory, "--interactive", "--max_new_tokens=5", stdin="abc\nkl\n\n")
  assert chat.returncode == 0, chat.stderr
  assert chat.stdout.count("> ") == 3 and chat.stdout.count("[prefill") == 2


@pytest.mark.parametrize(
  "flags,message",
  [
    (["--prompt=abc", "--temperature=-1"], "temperature must be >= 0"),
    (["--prompt=abc", "--top_p=0"], "top_p must be in (0, 1]"),
    (["--prompt=abc", "--max_new_tokens=100", "--window=0"], "over the model's context"),
    (["--prompt="], "empty prompt"),
    (["--prompt=xyz"], "is not in the char tokenizer"),
    (["--prompt=abc", "--chat"], "has no chat template"),
    ([], "give --prompt"),
  ],
)
def test_generate_cli_bad_input(char_model, flags, message):
  result = run_generate(char_model[0], *flags)
  assert result.returncode == 1 and message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr


def in_process_greedy(directory, prompt_ids, max_new):
  """The text the Generator continues `prompt_ids` with, as the generate binary sets it up."""
  from decoderjax.inference import offline as generator_lib

  model = generator_lib.load(str(directory))
  config = generator_lib.GenerateConfig(max_new, SamplingConfig(temperature=0), window=64)
  results, _ = generator_lib.Generator(model, config)([prompt_ids])
  return results[0]["text"]


def test_generate_cli_refuses_a_prompt_over_the_context_unless_told_to_cut_it(char_model):
  """70 tokens do not fit the 64-token context: an error naming both lengths; with
  --truncate_prompt the prompt loses its first 7 tokens (said once) and generation continues
  the 63 that are left."""
  directory, _, _, tok = char_model
  prompt = ("abcdefghij klmnop" * 5)[:70]
  refused = run_generate(directory, f"--prompt={prompt}", "--max_new_tokens=4")
  assert refused.returncode == 1 and refused.stdout == ""
  assert refused.stderr.strip() == (
    "error: a prompt of 70 tokens plus 1 (the first new token) is over the model's context of "
    "64 tokens"
  )
  cut = run_generate(directory, f"--prompt={prompt}", "--max_new_tokens=4", "--truncate_prompt",
                     "--ignore_eos")  # fmt: skip
  assert cut.returncode == 0, cut.stderr
  assert cut.stderr.count("note: 1 prompt(s) lost 7 token(s) from the left") == 1
  expected = in_process_greedy(directory, tok.encode(prompt)[7:], 4)
  assert cut.stdout.splitlines()[0] == prompt + expected


def test_generate_cli_chat_prints_the_reply_alone_and_no_tpu_start_up(char_model, tmp_path):
  """--chat prints the model's reply, not the user's message glued to it; with libtpu installed
  and JAX_PLATFORMS unset (as a user's shell has it), nothing about a TPU reaches stderr."""
  import os

  directory, cfg, params, tok = char_model
  chat_dir = tmp_path / "chat"
  template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
  modeldir.save_model_dir(str(chat_dir), cfg, params, tok, {"temperature": 0,
                                                           "chat_template": template})  # fmt: skip
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  chat = run_generate(chat_dir, "--chat", "--prompt=abc", "--max_new_tokens=8", "--ignore_eos",
                      env=env)  # fmt: skip
  assert chat.returncode == 0, chat.stderr
  reply = in_process_greedy(chat_dir, tok.encode("abc "), 8)
  assert chat.stdout.splitlines()[0] == reply and not reply.startswith("abc")
  assert "TPU" not in chat.stderr and "libtpu" not in chat.stderr, chat.stderr
