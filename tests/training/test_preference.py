"""Preference tuning: DPO and IPO (TRL's DPOTrainer), SimPO (CPOTrainer) and ORPO (ORPOTrainer)
losses, rewards and accuracy equal TRL's on the same converted checkpoints and token ids; the
LoRA reference is the base model exactly; pairs pack whole; the train and evaluate binaries
learn and score a preference; bad input is a one-line error."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")

from conftest import REPO
from test_hf import save_hf, tokenizer_json  # noqa: F401  (fixture)

from decoderjax.checkpoints import exchange, modeldir
from decoderjax.data import examples, rows
from decoderjax.data.data_config import DataConfig
from decoderjax.model import adapters
from decoderjax.model.decoder import init_params
from decoderjax.training import preference, steps
from decoderjax.training.steps import LossConfig

RECORDS = [
  {"prompt": "to be or not", "chosen": " to be, that is", "rejected": " the question"},
  {"prompt": "that is the", "chosen": " question", "rejected": " not to be or to be"},
  {"prompt": "or not to be", "chosen": " that is the question", "rejected": " to be"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_json):  # noqa: F811
  """(policy, reference) as transformers models and as our converted model directories: the
  reference is the policy with every weight moved a little."""
  root = tmp_path_factory.mktemp("pref")
  policy = save_hf("llama3", root / "policy", tokenizer_json, scale=3.0)
  reference = copy.deepcopy(policy)
  torch.manual_seed(1)
  with torch.no_grad():
    for p in reference.parameters():
      p.add_(0.05 * torch.randn_like(p))
  reference.save_pretrained(root / "reference", safe_serialization=True)
  (root / "reference" / "tokenizer.json").write_text(tokenizer_json)
  ours = {}
  for name in ("policy", "reference"):
    exchange.convert_hf(str(root / name), str(root / f"ours-{name}"))
    ours[name] = modeldir.load_model_dir(str(root / f"ours-{name}"))
  return policy, reference, ours


def pairs_of(tok):
  return [examples.preference_example(r, tok, DataConfig(), None, f"r:{i}") for i, r in
          enumerate(RECORDS)]  # fmt: skip


def batch_of(pairs, packed):
  """A row per pair, or all packed into one row, with their loss columns."""
  batch, dropped = examples.preference_rows(pairs, 64)
  assert dropped == 0
  if packed:
    batch = rows.pack_examples(batch, 1, 64)
  batch = rows.with_loss_at(batch, rows.loss_slots(batch["weights"]))
  return {k: jnp.asarray(v) for k, v in batch.items()}


def our_terms(ours, loss_cfg, packed=False):
  """Our mean loss and statistics per pair over RECORDS."""
  reference = ours["reference"].params if loss_cfg.preference in preference.WITH_REFERENCE else {}
  batch = batch_of(pairs_of(ours["policy"].tokenizer), packed)
  _, (pairs, loss_sum, stats) = steps.batch_loss(
    ours["policy"].params, {}, ours["policy"].config, batch, None, loss_cfg, True, reference
  )
  return float(loss_sum / pairs), {k: float(v / pairs) for k, v in stats.items()}


def hf_tokenizer(tokenizer_json):  # noqa: F811
  from tokenizers import Tokenizer

  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer.from_str(tokenizer_json), eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
  )  # fmt: skip


@pytest.mark.parametrize("kind,trl_kind,beta", [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.5)])
def test_dpo_and_ipo_equal_trl(models, tokenizer_json, kind, trl_kind, beta, tmp_path):  # noqa: F811
  """Our loss and statistics, a pair per row and packed, against TRL's DPOTrainer computing on
  the same token ids (its own collator), with the reference model beside the policy."""
  from datasets import Dataset
  from trl.trainer.dpo_trainer import DataCollatorForPreference

  policy, reference, ours = models
  loss_cfg = LossConfig(preference=kind, beta=beta)
  loss, stats = our_terms(ours, loss_cfg)
  packed_loss, packed_stats = our_terms(ours, loss_cfg, packed=True)
  assert packed_loss == pytest.approx(loss, abs=1e-6)
  assert packed_stats == pytest.approx(stats, abs=1e-6)
  tok = hf_tokenizer(tokenizer_json)
  args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, beta=beta,
                       loss_type=[trl_kind])  # fmt: skip
  trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, processing_class=tok,
                           train_dataset=Dataset.from_list(RECORDS))  # fmt: skip
  ids = []
  for (c, c_mask), (r, _) in pairs_of(ours["policy"].tokenizer):
    start = c_mask.index(True)
    ids.append({"prompt_ids": c[:start], "chosen_ids": c[start:], "rejected_ids": r[start:]})
  trainer.model.train()
  with torch.no_grad():
    expected = float(
      trainer.compute_loss(trainer.model, DataCollatorForPreference(tok.pad_token_id)(ids))
    )
  logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
  assert loss == pytest.approx(expected, rel=1e-5, abs=1e-5)
  for ours_name, trl_name in (("chosen", "chosen"), ("rejected", "rejected"),
                              ("margin", "margins"), ("accuracy", "accuracies")):  # fmt: skip
    assert stats[f"rewards_{ours_name}"] == pytest.approx(logged[f"rewards/{trl_name}"], abs=1e-5)


@pytest.mark.parametrize("kind,beta", [("simpo", 2.0), ("orpo", 0.1)])
def test_simpo_and_orpo_equal_trl(models, tokenizer_json, kind, beta, tmp_path):  # noqa: F811
  """SimPO (CPOTrainer, loss_type=simpo, no NLL term) and ORPO (ORPOTrainer, whose NLL covers
  the chosen prompt and response) on a batch of the same token ids in TRL's padded layout."""
  from datasets import Dataset
  from trl.experimental.cpo import CPOConfig, CPOTrainer
  from trl.experimental.orpo import ORPOConfig, ORPOTrainer

  policy, _, ours = models
  loss, stats = our_terms(ours, LossConfig(preference=kind, beta=beta, simpo_gamma=0.5))
  tok = hf_tokenizer(tokenizer_json)
  common = dict(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, bf16=False)
  if kind == "simpo":
    cls, args = CPOTrainer, CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=0.5, **common)
  else:
    cls, args = ORPOTrainer, ORPOConfig(**common)
  trainer = cls(model=policy, args=args, train_dataset=Dataset.from_list(RECORDS),
                processing_class=tok)  # fmt: skip
  batch, pairs = {}, pairs_of(ours["policy"].tokenizer)
  for side, index in (("chosen", 0), ("rejected", 1)):
    width = max(len(pair[index][0]) for pair in pairs)
    ids = torch.full((len(pairs), width), tok.pad_token_id)
    labels = torch.full((len(pairs), width), -100)
    for row, pair in enumerate(pairs):
      tokens, mask = pair[index]
      ids[row, : len(tokens)] = torch.tensor(tokens)
      labels[row, : len(tokens)] = torch.tensor(
        [t if m else -100 for t, m in zip(tokens, mask, strict=True)]
      )
    attention = torch.zeros_like(ids)
    for row, pair in enumerate(pairs):
      attention[row, : len(pair[index][0])] = 1
    batch.update({f"{side}_input_ids": ids, f"{side}_labels": labels,
                  f"{side}_attention_mask": attention})  # fmt: skip
  with torch.no_grad():
    expected, logged = trainer.get_batch_loss_metrics(trainer.model, batch, "train")
  assert loss == pytest.approx(float(expected), rel=1e-5, abs=1e-5)
  for name in ("chosen", "rejected", "accuracies"):
    ours_name = "accuracy" if name == "accuracies" else name
    assert stats[f"rewards_{ours_name}"] == pytest.approx(
      float(logged[f"rewards/{name}"]), abs=1e-5
    )


def test_cdpo_label_smoothing_and_the_lora_reference(models):
  """cDPO: -(1 - e) log s(b d) - e log s(-b d) over the float64 log-ratios; a LoRA model's
  reference is its base with the adapters at zero, exactly."""
  _, _, ours = models
  pairs = pairs_of(ours["policy"].tokenizer)
  batch = batch_of(pairs, packed=False)
  cfg, eps, beta = ours["policy"].config, 0.2, 0.3
  logp = lambda params: np.asarray(
    preference.segment_logps(steps.forward(params, cfg, batch, None, True), batch)[0], np.float64
  )
  policy, ref = logp(ours["policy"].params), logp(ours["reference"].params)
  d = (policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])
  log_sigmoid = lambda x: -np.logaddexp(0.0, -x)
  expected = np.mean(-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d))
  loss, _ = our_terms(ours, LossConfig(preference="dpo", beta=beta, label_smoothing=eps))
  assert loss == pytest.approx(expected, rel=1e-5)

  lora_cfg = adapters.finetuned_config(cfg, adapters.FinetuneConfig(method="lora", lora_rank=4))
  fresh = init_params(lora_cfg, jax.random.key(3))
  trainable, _ = adapters.split_trainable(fresh, "lora")
  trainable = jax.tree.map(lambda x: x + 0.5, trainable)  # adapters far from zero
  base_logits = steps.forward(ours["policy"].params, cfg, batch, None, True)
  base_logps = preference.segment_logps(base_logits, batch)
  got = steps.reference_logps(
    trainable, ours["policy"].params, {}, lora_cfg, batch, LossConfig(preference="dpo")
  )
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(base_logps[0]))


def run(module, *args):
  return subprocess.run([sys.executable, "-m", f"decoderjax.{module}", *args],
                        capture_output=True, text=True, timeout=600)  # fmt: skip


def metrics_of(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
  """A small random char-level base model and pairs whose chosen response is always " yes":
  a preference the model can learn in a few steps, held out on prompts it never saw."""
  import flax.linen as nn

  from decoderjax.data.tokenizer import CharTokenizer
  from decoderjax.model.decoder import Decoder
  from decoderjax.model.presets import get_preset

  root = tmp_path_factory.mktemp("toy")
  tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?")
  cfg = get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=64)
  params = nn.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  modeldir.save_model_dir(str(root / "base"), cfg, params, tok, {"temperature": 0})
  rng = np.random.default_rng(0)
  words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
  for name, n in (("train", 48), ("val", 8)):
    with open(root / f"{name}.jsonl", "w") as f:
      for _ in range(n):
        prompt = " ".join(rng.choice(words, 3)) + "?"
        f.write(json.dumps({"prompt": prompt, "chosen": " yes", "rejected": " no"}) + "\n")
  return root


def test_dpo_lora_learns_the_preference_and_evaluate_scores_it(toy, tmp_path):
  """train (DPO, LoRA): held-out preference accuracy from 0 (policy = reference, no pair won)
  to above chance; evaluate --data_path scores the same pairs as the run's last evaluation."""
  workdir = tmp_path / "w"
  out = run("train", f"--config={REPO}/configs/finetune_dpo_lora.py", f"--workdir={workdir}",
            f"--config.init_from={toy / 'base'}", f"--config.data.path={toy / 'train.jsonl'}",
            f"--config.data.eval_path={toy / 'val.jsonl'}", "--config.data.seq_len=32",
            "--config.train.steps=30", "--config.train.log_every=10", "--config.loss.beta=0.5",
            "--config.eval.every_steps=30", "--config.optimizer.learning_rate=2e-2")  # fmt: skip
  assert out.returncode == 0, out.stderr[-3000:]
  logged = metrics_of(workdir)
  first = next(m for m in logged if "val_loss" in m)
  last = [m for m in logged if "val_loss" in m][-1]
  assert first["step"] == 0 and first["val_rewards_accuracy"] == 0.0
  assert first["val_loss"] == pytest.approx(np.log(2), abs=1e-5)  # no margin yet: log 2
  assert last["val_rewards_accuracy"] > 0.5 and last["val_loss"] < first["val_loss"]
  assert "rewards_margin" in next(m for m in logged if "loss" in m and m["step"] > 0)
  scored = run("evaluate", f"--checkpoint={workdir}", f"--data_path={toy / 'val.jsonl'}",
               f"--output_json={tmp_path / 'e.json'}")  # fmt: skip
  assert scored.returncode == 0, scored.stderr[-3000:]
  result = json.loads((tmp_path / "e.json").read_text())
  assert result["pairs"] == 8 and result["dropped"] == 0
  assert result["loss"] == pytest.approx(last["val_loss"], abs=1e-5)
  assert result["rewards_accuracy"] == pytest.approx(last["val_rewards_accuracy"], abs=1e-6)


def test_full_ipo_resumes_with_the_same_reference(toy, tmp_path):
  """Full fine-tuning holds the init_from model as its reference: a run resumed from its step-2
  checkpoint logs the losses of the uninterrupted run."""
  flags = [f"--config={REPO}/configs/finetune_dpo_lora.py", f"--config.init_from={toy / 'base'}",
           f"--config.data.path={toy / 'train.jsonl'}", "--config.data.seq_len=32",
           "--config.finetune.method=full", "--config.loss.preference=ipo",
           "--config.train.log_every=1", "--config.eval.every_steps=0",
           "--config.eval.at_start=false", "--config.checkpoint.every_steps=2"]  # fmt: skip
  whole = run("train", *flags, f"--workdir={tmp_path / 'a'}", "--config.train.steps=4")
  assert whole.returncode == 0, whole.stderr[-3000:]
  for steps_ in (2, 4):
    part = run("train", *flags, f"--workdir={tmp_path / 'b'}", f"--config.train.steps={steps_}")
    assert part.returncode == 0, part.stderr[-3000:]
  losses = lambda w: {m["step"]: m["loss"] for m in metrics_of(w) if "loss" in m}
  assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-6)


def test_bad_preference_input_is_named(toy, tmp_path):
  from decoderjax.data import tasks
  from decoderjax.data.tokenizer import CharTokenizer
  from decoderjax.training import experiment

  missing = tmp_path / "missing.jsonl"
  missing.write_text('{"prompt": "ab?", "chosen": " yes", "rejected": " no"}\n'
                     '{"prompt": "cd?", "chosen": " yes"}\n')  # fmt: skip
  out = run("train", f"--config={REPO}/configs/finetune_dpo_lora.py", f"--workdir={tmp_path / 'w'}",
            f"--config.init_from={toy / 'base'}", f"--config.data.path={missing}")  # fmt: skip
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert f"error: {missing}:2: no field 'rejected'" in out.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
  tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz ?")
  cfg = DataConfig(source="jsonl", task="preference", path=str(toy / "train.jsonl"), seq_len=8)
  with pytest.raises(ValueError, match="no preference pair fits a row of data.seq_len=8"):
    tasks.load_task_dataset(cfg, tok, None)
  mixed = tmp_path / "mixed.jsonl"  # 4 + 4 + 3 tokens fit 16 together; 18 + 4 + 3 do not
  mixed.write_text("".join(json.dumps({"prompt": p, "chosen": " yes", "rejected": " no"}) + "\n"
                           for p in ("ab?", "ab?", "ab cd ef gh ij kl?", "cd?")))  # fmt: skip
  short = tmp_path / "short.jsonl"
  short.write_text(json.dumps({"prompt": "ef?", "chosen": " yes", "rejected": " no"}) + "\n")
  cfg = dataclasses.replace(cfg, path=str(mixed), eval_path=str(short), seq_len=16)
  data = tasks.load_task_dataset(cfg, tok, None)
  assert (data.stats["examples"], data.stats["dropped"], data.stats["val_examples"]) == (3, 1, 1)
  with pytest.raises(ValueError, match="loss.beta must be positive"):
    LossConfig(preference="dpo", beta=0.0)
  config = experiment.finetune_base_config(method="prompt", task="preference")
  with pytest.raises(ValueError, match="trains by finetune.method full or lora, not 'prompt'"):
    experiment.experiment_from_config(config, 0, base=modeldir.read_config(str(toy / "base")))
  config = experiment.finetune_base_config(method="lora", task="sft")
  config.loss.preference = "dpo"
  with pytest.raises(ValueError, match="loss.preference applies to data.task='preference'"):
    experiment.experiment_from_config(config, 0, base=modeldir.read_config(str(toy / "base")))


def test_chat_pairs_share_the_prompt_and_score_the_last_reply():
  """Chat records: rendered by the template, the mask on the last assistant message alone (an
  earlier reply is prompt); a pair whose conversations differ before it is refused."""
  from decoderjax.data.tokenizer import CharTokenizer

  tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz <>|")
  template = (
    "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}|{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}"
  )
  turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
           {"role": "user", "content": "ok"}]  # fmt: skip
  record = {"chosen": [*turns, {"role": "assistant", "content": "yes"}],
            "rejected": [*turns, {"role": "assistant", "content": "no"}]}  # fmt: skip
  (c, c_mask), (r, r_mask) = examples.preference_example(record, tok, DataConfig(), template, "x")
  assert tok.decode(c) == "<u>hi|<a>yo|<u>ok|<a>yes|" and tok.decode(r)[-3:] == "no|"
  assert tok.decode([t for t, m in zip(c, c_mask, strict=True) if m]) == "yes|"
  assert tok.decode([t for t, m in zip(r, r_mask, strict=True) if m]) == "no|"
  split = {"prompt": turns, "chosen": record["chosen"][-1:], "rejected": record["rejected"][-1:]}
  again = examples.preference_example(split, tok, DataConfig(), template, "x")
  assert again == ((c, c_mask), (r, r_mask))
  record["rejected"][0] = {"role": "user", "content": "ho"}
  with pytest.raises(ValueError, match="x: chosen and rejected do not share their prompt"):
    examples.preference_example(record, tok, DataConfig(), template, "x")
