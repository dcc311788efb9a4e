"""Evaluation against the references the field trusts, on the same weights.

Tiny random Llama (its tokenizer prepends BOS) and GPT-2 models are converted to model
directories and exported back with `convert --to=hf`. The lm-eval backend `decoderjax` runs three
local tasks built from Shakespeare (multiple choice, rolling perplexity over texts longer than
the 64-token context, greedy generation) against the harness's own `hf` backend, request by
request; `evaluate --text_file` against transformers' loss on the same tokens; `evaluate
--generate` against transformers' greedy generation, and its scores against rouge-score's and
sacrebleu's own.
"""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.tasks import TaskManager  # noqa: E402
from test_hf import save_hf  # noqa: E402

from decoderjax.checkpoints import exchange, modeldir
from decoderjax.evaluation import scoring  # noqa: E402
from decoderjax.training import metrics

TASKS = ("my_choice", "my_perplexity", "my_generation")
from conftest import REPO  # noqa: E402

DOCS = os.path.join(REPO, "docs", "lm_eval_tasks")
V = 320


def bpe_tokenizer(text: str, bos: bool) -> str:
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  specials = ["<|endoftext|>", "<s>"]
  trainer = trainers.BpeTrainer(
    vocab_size=V, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator([text[:100_000]], trainer)
  if bos:  # as Llama's tokenizer.json: <s> before every text
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  return tok.to_str()


def task_dir(tmp_path, text: str) -> str:
  """docs/lm_eval_tasks' YAMLs with their data files written from Shakespeare's lines."""
  lines = [line.strip() for line in text.splitlines() if len(line.split()) >= 7][:200]
  rng = random.Random(0)
  words = sorted({w for line in lines for w in line.split()})
  records = {"my_choice": [], "my_perplexity": [], "my_generation": []}
  for i, line in enumerate(lines[:30]):
    w = line.split()
    choices = [w[4], *rng.sample(words, 3)]
    rng.shuffle(choices)
    context = " ".join(w[:4]) if i % 10 else " ".join(lines[100:106] + w[:4])  # over 64 tokens
    records["my_choice"].append({"context": context, "choices": choices,
                                 "label": choices.index(w[4])})  # fmt: skip
  for i in range(4):
    records["my_perplexity"].append({"text": "\n".join(lines[40 + 8 * i : 48 + 8 * i])})
  for line in lines[80:96]:
    w = line.split()
    records["my_generation"].append({"context": " ".join(w[:4]), "answer": " ".join(w[4:])})
  out = tmp_path / "tasks"
  out.mkdir()
  for name, rows in records.items():
    data = out / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(os.path.join(DOCS, f"{name}.yaml")) as f:
      yaml = f.read().replace(f"test: {name}.jsonl", f"test: {data}")
    (out / f"{name}.yaml").write_text(yaml)
  return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory, shakespeare_text):
  """{family: (our model directory, its convert --to=hf export, task folder)}."""
  root = tmp_path_factory.mktemp("harness")
  tasks = task_dir(root, shakespeare_text)
  made = {}
  for family, name, bos in (("llama", "llama3", True), ("gpt2", "gpt2", False)):
    hf_dir = root / f"{family}-source"
    ids = {"bos_token_id": 1 if bos else 0, "eos_token_id": 0}
    save_hf(name, hf_dir, bpe_tokenizer(shakespeare_text, bos), vocab_size=V, **ids)
    ours, exported = str(root / family), str(root / f"{family}-hf")
    exchange.convert_hf(str(hf_dir), ours)
    exchange.export_hf(ours, exported)
    made[family] = ours, exported, tasks
  return made


def evaluate(model: str, args: str, tasks: str) -> dict:
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  out = lm_eval.simple_evaluate(
    model=model, model_args=args, tasks=list(TASKS), batch_size=4, log_samples=True,
    task_manager=TaskManager(include_path=tasks),
  )  # fmt: skip
  return out


def responses(out: dict, task: str) -> list:
  """Each document's responses in document order: [(log p, is_greedy)] or [text]."""
  return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_backend_matches_the_hf_backend(models, family, caplog):
  ours, exported, tasks = models[family]
  hf = evaluate("hf", f"pretrained={exported},dtype=float32,device=cpu", tasks)
  got = evaluate("decoderjax", f"checkpoint={ours}", tasks)
  truncated = [r for r in caplog.records if "lose tokens from the left" in r.getMessage()]
  assert len(truncated) == 1  # long contexts cut as hf cuts them, said once

  for a, b in zip(responses(hf, "my_choice"), responses(got, "my_choice"), strict=True):
    assert len(a) == len(b) == 4
    np.testing.assert_allclose([r[0][0] for r in b], [r[0][0] for r in a], atol=1e-4, rtol=0)
    assert [r[0][1] for r in b] == [r[0][1] for r in a]  # is_greedy
  for metric in ("acc,none", "acc_norm,none"):
    assert got["results"]["my_choice"][metric] == hf["results"]["my_choice"][metric]

  rolling = zip(responses(hf, "my_perplexity"), responses(got, "my_perplexity"), strict=True)
  for a, b in rolling:
    assert b[0][0] == pytest.approx(a[0][0], rel=1e-6)
  for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
    want = hf["results"]["my_perplexity"][metric]
    assert got["results"]["my_perplexity"][metric] == pytest.approx(want, rel=1e-4)

  assert responses(got, "my_generation") == responses(hf, "my_generation")
  assert any(r[0] for r in responses(got, "my_generation"))  # text was generated
  em = "exact_match,none"
  assert got["results"]["my_generation"][em] == hf["results"]["my_generation"][em]


def test_lm_eval_command_line_finds_the_backend(models, tmp_path):
  """`lm_eval --model decoderjax` from the shell, as installed (entry point or .pth hook)."""
  ours, _, tasks = models["llama"]
  lm_eval_bin = os.path.join(os.path.dirname(sys.executable), "lm_eval")
  env = {**os.environ, "HF_DATASETS_OFFLINE": "1"}
  run = lambda *args: subprocess.run(
    [lm_eval_bin, "--include_path", tasks, "--output_path", str(tmp_path / "out"), *args],
    capture_output=True, text=True, env=env, timeout=600,
  )  # fmt: skip
  out = run("--model", "decoderjax", "--model_args", f"checkpoint={ours},batch_size=8",
            "--tasks", "my_choice")  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  assert "my_choice" in out.stdout and "acc" in out.stdout
  (result,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs]
  with open(result) as f:
    saved = json.load(f)
  assert saved["config"]["model"] == "decoderjax"
  bad = run("--model", "decoderjax", "--model_args", f"checkpoint={tmp_path}", "--tasks",
            "my_choice")  # fmt: skip
  assert bad.returncode != 0 and "is not a decoderjax model directory" in bad.stderr


def run_evaluate(*args):
  return subprocess.run([sys.executable, "-m", "decoderjax.evaluate", *args],
                        capture_output=True, text=True, timeout=600)  # fmt: skip


def reference_logprob(torch_model, ids: list[int], length: int, stride: int) -> tuple[float, int]:
  """transformers' sliding-window log-likelihood (its perplexity guide's loop): windows of
  `length` inputs every `stride` tokens, each token predicted once."""
  nll, done, count = 0.0, 0, 0
  for begin in range(0, len(ids) - 1, stride):
    end = min(begin + length, len(ids) - 1)
    chunk = torch.tensor([ids[begin : end + 1]])
    with torch.no_grad():
      logp = torch.log_softmax(torch_model(chunk[:, :-1]).logits[0].double(), -1)
    for j in range(end - begin):
      if begin + 1 + j > done:
        nll -= float(logp[j, chunk[0, j + 1]])
        count += 1
    done = end
    if end == len(ids) - 1:
      break
  return -nll, count


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_file_scores_as_transformers_does(models, family, tmp_path, shakespeare_text):
  ours, exported, _ = models[family]
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  tok = modeldir.load_model_dir(ours).tokenizer
  prefix = 1 if family == "llama" else 0  # BOS, else end-of-text
  for text, length, stride in ((shakespeare_text[:150], 64, 64), (shakespeare_text[:700], 48, 20)):
    path = tmp_path / "t.txt"
    path.write_text(text)
    out = run_evaluate(f"--checkpoint={ours}", f"--text_file={path}", f"--seq_len={length}",
                       f"--stride={stride}", "--batch_size=4")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ids = tok.encode(text)
    assert ids[-1] != tok.eos_id and got["tokens"] == len(ids)  # no end-of-text target
    want, count = reference_logprob(torch_model, [prefix, *ids], length, stride)
    assert count == len(ids)
    assert got["loss"] == pytest.approx(-want / count, abs=1e-5)
    assert got["bits_per_byte"] == pytest.approx(-want / len(text.encode()) / np.log(2), rel=1e-5)
    assert got["word_perplexity"] == pytest.approx(np.exp(-want / len(text.split())), rel=1e-4)


def test_text_windows_predict_every_token_once():
  tokens = list(range(10, 47))
  for length, stride in ((8, 8), (8, 3), (40, 5), (5, 1)):
    windows = scoring.text_windows(tokens, 1, length, stride)
    predicted = np.concatenate([t[w > 0] for _, t, w in windows])
    np.testing.assert_array_equal(predicted, tokens)
    assert all(len(i) <= length and (i[1:] == t[:-1]).all() for i, t, _ in windows)
  no_prefix = scoring.text_windows(tokens, None, 8, 8)
  np.testing.assert_array_equal(np.concatenate([t[w > 0] for _, t, w in no_prefix]), tokens[1:])
  with pytest.raises(ValueError, match="stride must be in"):
    scoring.text_windows(tokens, 1, 8, 9)


def test_generation_metrics_equal_the_libraries():
  import sacrebleu
  from rouge_score import rouge_scorer

  predictions = ["the cat sat on the mat", "To be, or not to be", "a b c", "今天天气很好"]
  references = ["the cat is on the mat", "to be or not to be", "a b c", "今天天气不错"]
  got = metrics.generation_metrics(predictions, references)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  pairs = zip(predictions, references, strict=True)
  ascii_rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
  assert got["exact_match"] == 0.25
  # rouge-score's own tokenizer drops CJK text (score 0); ours reads it a character a token
  assert got["rougeL"] == pytest.approx((sum(ascii_rouge[:3]) + 4 / 6) / 4)
  assert got["bleu"] == sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score
  assert got["chrf"] == sacrebleu.corpus_chrf(predictions, [references]).score
  english = metrics.generation_metrics(predictions[:3], references[:3])
  assert english["rougeL"] == pytest.approx(np.mean(ascii_rouge[:3]), abs=1e-12)
  assert english["bleu"] == sacrebleu.corpus_bleu(predictions[:3], [references[:3]]).score


def test_generate_scores_greedy_answers(models, tmp_path, shakespeare_text):
  ours, exported, _ = models["llama"]
  lines = [line for line in shakespeare_text.splitlines() if len(line.split()) >= 6][:6]
  records = [{"prompt": " ".join(w.split()[:3]), "completion": " " + " ".join(w.split()[3:])}
             for w in lines]  # fmt: skip
  data = tmp_path / "qa.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in records))
  predictions = tmp_path / "p.jsonl"
  out = run_evaluate(f"--checkpoint={ours}", f"--data_path={data}", "--generate",
                     "--max_new_tokens=6", f"--predictions={predictions}",
                     "--batch_size=4")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  rows = [json.loads(line) for line in predictions.read_text().splitlines()]
  assert [r["reference"] for r in rows] == [r["completion"] for r in records]

  torch_model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
  tok = modeldir.load_model_dir(ours).tokenizer
  for record, row in zip(records, rows, strict=True):
    ids = torch.tensor([[tok.bos_id, *tok.encode(record["prompt"])]])
    with torch.no_grad():
      new = torch_model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert row["prediction"] == tok.decode([t for t in new.tolist() if t != tok.eos_id])
  want = metrics.generation_metrics([r["prediction"] for r in rows], [r["reference"] for r in rows])
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-12)
  assert got["generated_tokens"] > 0 and got["generation_tokens_per_s"] > 0
  assert got["examples"] == len(records) and got["loss"] > 0


def test_bad_input_is_one_line(models, tmp_path):
  ours, _, _ = models["gpt2"]
  text = tmp_path / "t.txt"
  text.write_text("to be or not to be")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  fieldless = tmp_path / "f.jsonl"
  fieldless.write_text('{"question": "who?", "answer": "me"}\n')
  long = tmp_path / "long.jsonl"  # with 60 new tokens, over the 64-token context: refused
  long.write_text('{"prompt": "to be or not to be, that is the question", "completion": "me"}\n')
  cases = {
    (f"--checkpoint={ours}", f"--data_path={long}", "--generate", "--max_new_tokens=60"): "plus "
    "60 (max_new_tokens) is over the model's context of 64 tokens",
    (f"--checkpoint={ours}", f"--text_file={text}", "--truncate_prompt"): "--truncate_prompt does "
    "not apply",
    (f"--checkpoint={tmp_path}", f"--text_file={text}"): "is not a decoderjax model directory",
    (f"--checkpoint={ours}", f"--data_path={empty}", "--generate"): "holds no records",
    (f"--checkpoint={ours}", f"--data_path={fieldless}", "--generate"): "expected fields 'prompt'",
    (f"--checkpoint={ours}", f"--text_file={text}", "--generate"): "--generate does not apply",
    (f"--checkpoint={ours}", f"--data_path={fieldless}", "--stride=4"): "--stride does not apply",
  }
  for args, message in cases.items():
    out = run_evaluate(*args)
    assert out.returncode == 1 and message in out.stderr, (args, out.stderr[-2000:])
    assert "Traceback" not in out.stderr


BACKEND_RUN = """
import json, sys
from lm_eval.api.instance import Instance
from decoderjax.evaluation.harness import DecoderJaxLM

lm = DecoderJaxLM(checkpoint=sys.argv[1], batch_size=2, **json.loads(sys.argv[2]))
pairs = [("to be or", " not to be"), ("to be or", " a question"), ("", "that is"),
         ("whether tis nobler in the mind", " to suffer")]
scores = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
gen = ("to be", {"until": ["\\n"], "max_gen_toks": 6, "do_sample": False})
texts = lm.generate_until([Instance("generate_until", {}, gen, 0)] * 3)
print(json.dumps({"scores": scores, "texts": texts}))
"""


def test_backend_runs_quantized_and_sharded_models(models, tmp_path):
  ours, _, _ = models["gpt2"]
  quantized = str(tmp_path / "int8")
  command = [sys.executable, "-m", "decoderjax.quantize", f"--checkpoint={ours}",
             f"--output={quantized}"]  # fmt: skip
  out = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]

  def run(checkpoint, env=None, **args):
    command = [sys.executable, "-c", BACKEND_RUN, checkpoint, json.dumps(args)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])

  one = run(ours)
  eight = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  sharded = run(ours, eight, mesh_data=2, mesh_fsdp=2, mesh_tensor=2)
  np.testing.assert_allclose([s[0] for s in sharded["scores"]], [s[0] for s in one["scores"]],
                             rtol=1e-5)  # fmt: skip
  assert sharded["texts"] == one["texts"] and len(set(one["texts"])) == 1
  int8 = run(quantized, kv_cache="int8")
  logp, want = [s[0] for s in int8["scores"]], [s[0] for s in one["scores"]]
  assert logp != want  # the int8 weights, not the float ones
  np.testing.assert_allclose(logp, want, rtol=0.05)


TEMPLATE = (
  "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
  "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_template_prompts_match_the_hf_backend(models, tmp_path):
  """--apply_chat_template: both backends render the same prompts and answer them alike; and
  evaluate --generate reads a chat record's last assistant message as its reference."""
  import shutil

  source, _, tasks = models["gpt2"]
  ours = tmp_path / "chat"
  shutil.copytree(source, ours)
  generation = json.loads((ours / "generation.json").read_text())
  (ours / "generation.json").write_text(json.dumps({**generation, "chat_template": TEMPLATE}))
  exported = str(tmp_path / "chat-hf")
  exchange.export_hf(str(ours), exported)
  runs = {}
  for name, args in (("hf", f"pretrained={exported},dtype=float32,device=cpu"),
                     ("decoderjax", f"checkpoint={ours}")):  # fmt: skip
    out = lm_eval.simple_evaluate(
      model=name, model_args=args, tasks=["my_generation"], batch_size=4, log_samples=True,
      apply_chat_template=True, task_manager=TaskManager(include_path=tasks),
    )  # fmt: skip
    runs[name] = sorted(out["samples"]["my_generation"], key=lambda s: s["doc_id"])
  prompts = {k: [s["arguments"][0][0] for s in v] for k, v in runs.items()}
  assert prompts["decoderjax"] == prompts["hf"] and prompts["hf"][0].startswith("<|user|>")
  assert [s["resps"] for s in runs["decoderjax"]] == [s["resps"] for s in runs["hf"]]

  records = tmp_path / "chat.jsonl"
  messages = [{"role": "user", "content": "to be"}, {"role": "assistant", "content": " or not"}]
  records.write_text(json.dumps({"messages": messages}) + "\n")
  predictions = tmp_path / "p.jsonl"
  out = run_evaluate(f"--checkpoint={ours}", f"--data_path={records}", "--generate",
                     f"--predictions={predictions}")  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(predictions.read_text())["reference"] == " or not"
