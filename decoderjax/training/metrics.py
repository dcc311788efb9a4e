"""FLOP accounting, machine peaks, classification and generation-quality scores, and the
training logger (JSONL, TensorBoard, terminal)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from decoderjax.model.config import ModelConfig
from decoderjax.runtime import chips
from decoderjax.runtime.progress import Progress
from decoderjax.training.preference import STATISTICS


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters of the model's matrices (projections, MLP, embedding / head), from the config."""
  d, h = cfg.embed_dim, cfg.head_size
  attn = d * h * (2 * cfg.num_heads + 2 * cfg.kv_heads)
  mlp = (3 if cfg.gated_mlp else 2) * d * cfg.mlp_dim
  return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, weight_grads: bool = True) -> float:
  """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM appendix B).

  A frozen base (LoRA, prompt tuning) computes no weight gradients: 4 x instead of 6 x.
  """
  h = cfg.head_size
  attention_scores = 2 * 2 * cfg.num_layers * seq_len * cfg.num_heads * h / 2  # causal half
  return (6 if weight_grads else 4) * matmul_params(cfg) + 3 * attention_scores


def matmul_flops(n: int, dtype: str = "float32", repeats: int = 5) -> float:
  """Best FLOP/s of an [n, n] x [n, n] matmul on the default device (float32 accumulation)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


@functools.cache
def peak_flops(dtype: str = "float32") -> float:
  """Per-device peak: the published figure for accelerators, a measured matmul on CPU."""
  chip = chips.chip_for(jax.devices()[0].device_kind)
  if chip is not None:
    return chip.bf16_flops if dtype != "float32" else chip.bf16_flops / 2
  return matmul_flops(1024)


def classification_metrics(predictions_N, labels_N, num_labels: int) -> dict[str, float]:
  """Accuracy and macro-F1 (the mean over labels of per-label F1; a label never predicted nor
  present scores 0, as scikit-learn's default `zero_division` does)."""
  predictions_N, labels_N = np.asarray(predictions_N), np.asarray(labels_N)
  f1 = []
  for c in range(num_labels):
    tp = np.sum((predictions_N == c) & (labels_N == c))
    predicted, actual = np.sum(predictions_N == c), np.sum(labels_N == c)
    f1.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
  accuracy = float(np.mean(predictions_N == labels_N)) if len(labels_N) else 0.0
  return {"accuracy": accuracy, "macro_f1": float(np.mean(f1)), "examples": int(len(labels_N))}


# CJK ideographs, kana and hangul: one token a character (rouge-score's tokenizer drops them).
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"


class _RougeTokens:
  """rouge-score's tokenization (lowercase alphanumeric runs) that keeps CJK characters."""

  pattern = re.compile(f"[{CJK}]|[^\\W_{CJK}]+")

  def tokenize(self, text: str) -> list[str]:
    return self.pattern.findall(text.lower())


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
  """Exact match (after stripping whitespace), ROUGE-L F1 (rouge-score), corpus BLEU and chrF
  (sacrebleu, 0-100; BLEU tokenized for Chinese when a reference has CJK text)."""
  try:
    import sacrebleu
    from rouge_score import rouge_scorer
  except ImportError:
    raise ImportError("generation metrics need `pip install decoderjax[eval]`") from None
  pairs = list(zip(predictions, references, strict=True))
  scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_RougeTokens())
  rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in pairs]
  cjk = any(re.search(f"[{CJK}]", r) for r in references)
  bleu = sacrebleu.corpus_bleu(predictions, [references], tokenize="zh" if cjk else "13a")
  return {
    "exact_match": float(np.mean([p.strip() == r.strip() for p, r in pairs])),
    "rougeL": float(np.mean(rouge)),
    "bleu": float(bleu.score),
    "chrf": float(sacrebleu.corpus_chrf(predictions, [references]).score),
  }


def eval_totals(outputs, num_labels: int = 0) -> dict:
  """(eval_step output on the host, batch) pairs -> {"loss", "weight"} summed over all of them,
  plus a classifier's accuracy, macro-F1 and example count over the real (weighted) rows, and
  a preference batch's statistics (preference.STATISTICS) per pair."""
  loss_sum = weight = 0.0
  predictions, labels, stats = [], [], {}
  for out, batch in outputs:
    loss_sum, weight = loss_sum + float(out["loss_sum"]), weight + float(out["weight_sum"])
    for k in STATISTICS:
      if k in out:
        stats[k] = stats.get(k, 0.0) + float(out[k])
    if "predictions" in out:
      real = batch["example_weights"] > 0
      predictions.append(np.asarray(out["predictions"])[real])
      labels.append(batch["labels"][real])
  totals = {"loss": loss_sum / max(weight, 1.0), "weight": weight}
  totals.update({k: v / max(weight, 1.0) for k, v in stats.items()})
  if predictions:
    totals.update(
      classification_metrics(np.concatenate(predictions), np.concatenate(labels), num_labels)
    )
  return totals


class Logger:
  """metrics.jsonl + TensorBoard + a progress line (a bar on a TTY, plain lines otherwise)."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self.total, self.tty = total_steps, sys.stdout.isatty()
    self.tokens_per_sec = None  # the last logged rate, shown on the bar
    self.start = time.perf_counter()
    self.bar = None
    for path in (self.path, self.samples_path):  # a resumed run re-logs steps after its checkpoint
      if os.path.exists(path) and jax.process_index() == 0:
        with open(path) as f:
          kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(path, "w") as f:
          f.writelines(kept)
    self.file = open(self.path, "a")
    self.tb = None
    if jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        pass

  def log(self, step: int, record: dict | None, loss: float | None = None) -> None:
    """`record` (on logging steps) into the files and as a line; every step moves the bar."""
    if self.bar is None:  # rates count from the first step logged (compiled by then)
      self.bar = Progress(self.total, "train", "steps", out=sys.stdout, start=step)
    if self.tty:
      self.bar.done = step
      if record and "tokens_per_sec" in record:
        self.tokens_per_sec = record["tokens_per_sec"]
      rate = {} if self.tokens_per_sec is None else {"tokens/s": f"{self.tokens_per_sec:,.0f}"}
      shown = {**rate, **({} if loss is None else {"loss": loss})}
      self.bar.update(step, **shown)
    else:
      self.bar.done = step
    if record is None or jax.process_index() != 0:
      return
    elapsed = round(time.perf_counter() - self.start, 3)  # wall clock, in the file alone
    self.file.write(json.dumps({**record, "elapsed_s": elapsed}) + "\n")
    self.file.flush()
    if self.tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, int | float):
          self.tb.add_scalar(key, value, step)
    text = " ".join(
      f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
    )
    self.print(text if self.tty else f"{text} ({self.bar.timing()})")

  def print(self, text: str) -> None:
    """A line of the run's output (above the bar on a terminal)."""
    if self.tty and self.bar is not None:
      self.bar.write(text)
    else:
      print(text, flush=True)

  def sample(self, step: int, text: str) -> None:
    if jax.process_index() == 0:
      with open(self.samples_path, "a") as f:
        f.write(json.dumps({"step": step, "text": text}) + "\n")

  def close(self) -> None:
    if self.tty and self.bar is not None:
      print(flush=True)  # below the bar
    self.file.close()
    if self.tb is not None:
      self.tb.close()
