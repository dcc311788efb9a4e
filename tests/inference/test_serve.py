"""The OpenAI-compatible server, through the real `openai` client, against a server started in
a subprocess on a tiny character-level model (random weights, sharpened so that greedy choices
have no near-ties)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from conftest import REPO  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import serve_reliability  # noqa: E402

from decoderjax.checkpoints import modeldir  # noqa: E402
from decoderjax.data.tokenizer import CharTokenizer
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset

ALPHABET = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:;!?'\n<>|"
TEMPLATE = (
  "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KEY = "sekret"
CONTEXT = 96
PROMPTS = ["ROMEO.", "To be, or not", "Friends, Romans", "a", "What light", "JULIET:", "O!", "Now"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tok = CharTokenizer(ALPHABET)
  cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=CONTEXT)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(3), jnp.zeros((1, 1), jnp.int32))["params"])
  params = jax.tree.map(lambda p: p * 4.0, params)
  directory = tmp_path_factory.mktemp("served") / "tiny"
  generation = {"temperature": 0, "chat_template": TEMPLATE}
  modeldir.save_model_dir(str(directory), cfg, params, tok, generation)
  return str(directory), cfg, params, tok


def start_server(directory, *flags):
  """The serve binary in a subprocess, once /health answers -> (proc, base URL)."""
  flags = (f"--max_seq_len={CONTEXT}", "--served_model_name=tiny", *flags)  # last flag wins
  proc, url = serve_reliability.start_server(directory, *flags)
  return proc, url


@pytest.fixture(scope="module")
def server(model_dir):
  proc, url = start_server(model_dir[0], "--slots=4", f"--api_key={KEY}", "--max_queue=8")
  yield url
  proc.terminate()
  proc.wait(60)


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


EXTRA = ("top_k", "min_p", "repetition_penalty")  # our fields beyond OpenAI's


def complete(client, prompt, **kw):
  kw = {"max_tokens": 24, "temperature": 0, **kw}
  extra = {k: kw.pop(k) for k in EXTRA if k in kw}
  return client.completions.create(model="tiny", prompt=prompt, extra_body=extra, **kw)


def test_greedy_completions_equal_the_generate_binary(model_dir, client, tmp_path):
  out = tmp_path / "g.json"
  result = subprocess.run(
    [sys.executable, "-m", "decoderjax.generate", f"--checkpoint={model_dir[0]}",
     *[f"--prompt={p}" for p in PROMPTS[:3]], "--temperature=0", "--max_new_tokens=24",
     f"--output_json={out}"],
    capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  expected = json.loads(out.read_text())
  tok = model_dir[3]
  for prompt, want in zip(PROMPTS[:3], expected, strict=True):
    got = complete(client, prompt, logprobs=0)
    choice = got.choices[0]
    assert choice.text == want["text"]
    assert [tok.encode(t)[0] for t in choice.logprobs.tokens] == want["tokens"]
    stopped = len(want["tokens"]) < 24
    assert choice.finish_reason == ("stop" if stopped else "length")
    assert got.usage.prompt_tokens == len(prompt)
    assert got.usage.completion_tokens == len(want["tokens"]) + stopped


def test_seeds_repeat_samples_and_streams_join_to_the_text(client):
  a = complete(client, "ROMEO.", temperature=1.0, seed=7).choices[0].text
  b = complete(client, "ROMEO.", temperature=1.0, seed=7).choices[0].text
  c = complete(client, "ROMEO.", temperature=5.0, seed=8, n=4)  # hot: samples differ
  assert a == b and len({ch.text for ch in c.choices} | {a}) > 1
  for kw in ({}, {"temperature": 0.9, "seed": 3, "top_p": 0.9, "top_k": 5}):
    whole = complete(client, "Friends", **kw).choices[0].text
    chunks = list(complete(client, "Friends", stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text_before_them(client):
  full = complete(client, "What light", max_tokens=30).choices[0].text
  stop = full[6:8]
  cut = complete(client, "What light", max_tokens=30, stop=[stop, "@@"]).choices[0]
  assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
  streamed = complete(client, "What light", max_tokens=30, stop=stop, stream=True)
  assert "".join(ch.choices[0].text for ch in streamed) == cut.text


def test_concurrent_requests_give_the_sequential_results(server, client):
  sequential = [complete(client, p).choices[0].text for p in PROMPTS]
  aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)

  async def all_at_once():
    calls = [aclient.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0)
             for p in PROMPTS]  # fmt: skip
    return [r.choices[0].text for r in await asyncio.gather(*calls)]

  assert asyncio.run(all_at_once()) == sequential  # 8 requests over 4 slots


def test_echoed_prompt_logprobs_equal_the_models_log_likelihood(model_dir, client):
  _, cfg, params, tok = model_dir
  prompt = "To be, or not to be, that is the question"
  for max_tokens in (0, 1):  # scoring only, and as lm-eval's local-completions asks
    got = complete(client, prompt, max_tokens=max_tokens, echo=True, logprobs=1).choices[0]
    assert got.text.startswith(prompt)
    lp = got.logprobs
    assert lp.tokens[: len(prompt)] == list(prompt) and lp.token_logprobs[0] is None
    ids = jnp.asarray([tok.encode(prompt)])
    logits, _ = Decoder(cfg).apply({"params": params}, ids)
    want = jax.nn.log_softmax(logits[0, :-1], -1)[jnp.arange(ids.shape[1] - 1), ids[0, 1:]]
    np.testing.assert_allclose(lp.token_logprobs[1 : len(prompt)], want, atol=1e-4, rtol=1e-4)
    greedy = [max(t, key=t.get) for t in lp.top_logprobs[1 : len(prompt)]]
    assert greedy == [tok.decode([int(i)]) for i in jnp.argmax(logits[0, :-1], -1)]


def test_chat_completions_use_the_chat_template(model_dir, client):
  tok = model_dir[3]
  messages = [{"role": "user", "content": "Good morrow"}]
  chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                        temperature=0)  # fmt: skip
  rendered = "<|user|>Good morrow\n<|assistant|>"
  assert (
    chat.choices[0].message.content == complete(client, rendered, max_tokens=20).choices[0].text
  )
  assert chat.usage.prompt_tokens == len(tok.encode(rendered))
  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20,
                                          temperature=0, stream=True)  # fmt: skip
  text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
  assert text == chat.choices[0].message.content


@pytest.mark.parametrize(
  "kw,error,message",
  [
    ({"temperature": -1}, "BadRequestError", "temperature"),
    ({"top_p": 0}, "BadRequestError", "top_p"),
    ({"max_tokens": 91}, "BadRequestError", r"plus 91 \(max_tokens\) is over the model's context"),
    ({"extra_body": {"bogus": 1}}, "BadRequestError", "bogus"),
    ({"model": "gpt-4"}, "NotFoundError", "does not exist"),
    ({"prompt": "~~~"}, "BadRequestError", "not in the char tokenizer"),
  ],
)
def test_bad_requests_raise_the_clients_errors(client, kw, error, message):
  kw = {"model": "tiny", "prompt": "ROMEO.", "max_tokens": 8, **kw}
  with pytest.raises(getattr(openai, error), match=message) as raised:
    client.completions.create(**kw)
  body = raised.value.body
  assert set(body) >= {"message", "type", "param", "code"}


def test_a_wrong_key_is_refused(server):
  wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
  with pytest.raises(openai.AuthenticationError, match="invalid API key"):
    wrong.models.list()
  assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_disconnects_free_their_slots_and_a_full_queue_says_429(server, client):
  with httpx.stream("POST", f"{server}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                    json={"model": "tiny", "prompt": "a", "max_tokens": 90 - 1, "stream": True,
                          "temperature": 1.0, "stop": []}) as response:  # fmt: skip
    lines = response.iter_lines()
    assert next(lines).startswith("data: ")
  deadline = time.time() + 30
  while httpx.get(f"{server}/health").json()["active"] and time.time() < deadline:
    time.sleep(0.1)
  assert httpx.get(f"{server}/health").json()["active"] == 0

  aclient = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)

  async def flood():  # 4 slots and 8 queue places: 16 long requests cannot all wait
    calls = [aclient.completions.create(model="tiny", prompt="a", max_tokens=60, temperature=1.0,
                                        seed=i) for i in range(16)]  # fmt: skip
    return await asyncio.gather(*calls, return_exceptions=True)

  results = asyncio.run(flood())
  limited = [r for r in results if isinstance(r, openai.RateLimitError)]
  served = [r for r in results if not isinstance(r, Exception)]
  assert limited and served and len(limited) + len(served) == 16
  assert all(r.choices[0].finish_reason in ("stop", "length") for r in served)


def test_sigterm_lets_running_requests_finish(model_dir):
  proc, url = start_server(model_dir[0], "--slots=2")
  client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
  stream = client.completions.create(model="tiny", prompt="a", max_tokens=60, temperature=1.0,
                                     seed=1, stream=True, stop=None)  # fmt: skip
  first = next(iter(stream))
  os.kill(proc.pid, signal.SIGTERM)
  rest = list(stream)
  assert rest[-1].choices[0].finish_reason in ("stop", "length")
  text = first.choices[0].text + "".join(ch.choices[0].text for ch in rest)
  assert len(text) > 1
  proc.wait(60)
  with pytest.raises(httpx.HTTPError):
    httpx.get(f"{url}/health", timeout=2)


def test_a_storm_of_clients_leaves_the_server_as_it_found_it(model_dir):
  """256 requests from 64 clients, one in eight malformed, one in eight dropped mid-stream."""
  result = serve_reliability.run(
    model_dir[0], requests=256, clients=64, new=24, slots=8, max_len=CONTEXT
  )
  assert result["malformed"] == 32 and result["dropped"] == 32
  assert result["answered"] + result["streamed"] == 192
