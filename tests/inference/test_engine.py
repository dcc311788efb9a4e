"""The continuous-batching engine in process: slots filled, freed and refilled give the same
greedy tokens as the Generator decoding each prompt alone; the int8 cache runs; bad requests
are refused before they queue."""

import threading

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from decoderjax.checkpoints import modeldir
from decoderjax.data.tokenizer import CharTokenizer
from decoderjax.inference import engine, offline
from decoderjax.model.decoder import Decoder
from decoderjax.model.presets import get_preset

PROMPTS = ["ROMEO.", "To be, or not to be", "a", "Friends, Romans, countrymen, lend me"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?\n")
  cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=64)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(5), jnp.zeros((1, 1), jnp.int32))["params"])
  directory = str(tmp_path_factory.mktemp("engine") / "m")
  modeldir.save_model_dir(directory, cfg, jax.tree.map(lambda p: 4.0 * p, params), tok, {})
  return directory


@pytest.fixture(scope="module")
def float_engine(model_dir):
  return engine.Engine(offline.load(model_dir), slots=2, max_len=64)


def serve_all(eng, prompts, max_tokens, **settings) -> list[list[dict]]:
  """Every prompt through the running engine -> each one's events."""
  events = [[] for _ in prompts]
  done = threading.Semaphore(0)

  def emitter(i):
    def emit(event):
      events[i].append(event)
      if "finish_reason" in event:
        done.release()

    return emit

  stop = threading.Event()
  loop = threading.Thread(target=eng.run, args=(stop,))
  loop.start()
  tok = eng.model.tokenizer
  for i, p in enumerate(prompts):
    eng.submit(
      engine.Request(tok.encode(p), max_tokens, emitter(i), settings, stop_ids=(tok.eos_id,))
    )
  for _ in prompts:
    assert done.acquire(timeout=120)
  stop.set()
  loop.join()
  return events


def test_slots_reused_give_each_prompts_solo_greedy_tokens(float_engine):
  eng, model = float_engine, float_engine.model  # 4 prompts through 2 slots
  events = serve_all(eng, PROMPTS, 16, temperature=0.0)
  greedy = offline.sampling_config({}, temperature=0.0)
  config = offline.GenerateConfig(16, greedy, stop_ids=(model.tokenizer.eos_id,))
  solo = offline.Generator(model, config)
  for prompt, got in zip(PROMPTS, events, strict=True):
    [want], _ = solo([model.tokenizer.encode(prompt)])
    assert [e["token"] for e in got if "token" in e] == want["tokens"]
    assert "".join(e.get("text", "") for e in got) == want["text"]
  assert not eng.live and eng.pending.empty()


def test_the_int8_cache_serves_full_lengths(model_dir):
  eng = engine.Engine(offline.load(model_dir, kv_cache="int8"), slots=2, max_len=64)
  events = serve_all(eng, PROMPTS[:3], 12, temperature=0.8, top_k=5)
  for got in events:
    assert got[-1]["completion_tokens"] <= 12 and got[-1]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
  "prompt,max_tokens,settings,message",
  [
    ([], 4, {}, "empty prompt"),
    ([1] * 40, 25, {}, r"a prompt of 40 tokens plus 25 \(max_tokens\) is over"),
    ([999], 4, {}, "prompt token ids must be in"),
    ([1], 4, {"temperature": -1.0}, "temperature must be >= 0"),
  ],
)
def test_requests_the_engine_cannot_run_are_refused(
  float_engine, prompt, max_tokens, settings, message
):
  eng = float_engine
  with pytest.raises(ValueError, match=message):
    eng.submit(engine.Request(prompt, max_tokens, lambda e: None, settings))
  assert eng.pending.empty()
