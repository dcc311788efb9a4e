"""Scores a model: python -m decoderjax.evaluate --checkpoint=DIR (--text_file=F | --data_path=F).

--text_file: the text scored as lm-eval's wikitext and transformers' perplexity guide do: its own
tokens only (no end-of-text target), the first read after BOS (else end-of-text) where the
tokenizer has one, long texts in windows of --seq_len tokens starting every --stride tokens,
each token predicted once. Reports the log-likelihood, token-, word- and byte-level perplexity
and bits per byte.
--data_path with a language model (SFT records {"prompt", "completion"} or chat): the loss over
the completion tokens; with --generate, greedy completions of every prompt too, scored against
the record's answer (exact match, ROUGE-L, BLEU, chrF) with the generation speed.
--data_path with a classifier ({"text", "label"}): accuracy, macro-F1, examples, mean loss.
--data_path with a preference-tuned model ({"prompt", "chosen", "rejected"} or chats): the
training loss, chosen and rejected rewards, their margin and the preference accuracy, against
the reference model the run trained with.
--data_path with a cross-attention (seq2seq) model ({"source", "target"}): the loss over the
target tokens and EOS; with --generate, greedy targets from each source, scored likewise.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
from absl import flags

from decoderjax import cli
from decoderjax.checkpoints import modeldir
from decoderjax.data import data_config, tasks
from decoderjax.data import examples as examples_lib
from decoderjax.data import records as records_lib
from decoderjax.data import rows as rows_lib
from decoderjax.evaluation import scoring
from decoderjax.inference import offline
from decoderjax.runtime import sharding
from decoderjax.runtime.progress import Progress
from decoderjax.training import metrics
from decoderjax.training.preference import WITH_REFERENCE
from decoderjax.training.steps import LossConfig, eval_step

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_TEXT_FILE = flags.DEFINE_string("text_file", None, "Plain-text file to score.")
_DATA_PATH = flags.DEFINE_string(
  "data_path",
  None,
  "Records to score: classification {text, label}, SFT {prompt, completion}, seq2seq "
  "{source, target}.",
)
_SEQ_LEN = flags.DEFINE_integer(
  "seq_len", 0, "Window / row length (0: the training data.seq_len, else max_seq_len)."
)
_STRIDE = flags.DEFINE_integer(
  "stride", 0, "--text_file: tokens between window starts (0: --seq_len, disjoint windows)."
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
_GENERATE = flags.DEFINE_bool(
  "generate", False, "--data_path SFT records: also generate greedy answers and score them."
)
_MAX_NEW = flags.DEFINE_integer(
  "max_new_tokens", 0, "--generate: tokens per answer (0: the longest reference's, plus one)."
)
_PREDICTIONS = flags.DEFINE_string(
  "predictions", None, "--generate: write {where, prediction, reference} JSON lines here."
)
_TRUNCATE = cli.define_truncate_flag()
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Write the result JSON here.")
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def row_length(model, meta: dict) -> int:
  """Rows as long as in training (config.json "seq_len"), else as the model allows."""
  room = model.config.text_len
  if _SEQ_LEN.value > room:
    raise ValueError(f"--seq_len={_SEQ_LEN.value} exceeds the model's room of {room} tokens")
  return _SEQ_LEN.value or min(meta.get("seq_len") or room, room)


def score(model, rows, mesh) -> dict:
  """Loss over rows in batches (and a classifier's accuracy / macro-F1)."""
  step = jax.jit(lambda p, b: eval_step(p, b, cfg=model.config, loss_cfg=LossConfig()))
  bar = Progress(-(-len(rows["inputs"]) // _BATCH.value), "evaluate", "batches")
  with sharding.activate(mesh):
    outputs = batch_outputs(lambda batch: step(model.params, batch), rows, bar.advance)
    totals = metrics.eval_totals(outputs, model.config.num_labels)
  bar.close()
  weight, loss = totals.pop("weight"), totals["loss"]
  if not weight:
    raise ValueError("nothing to score: no tokens or examples")
  if model.config.num_labels:
    return totals
  return {"tokens": int(weight), "loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def batch_outputs(step, rows, advance=None):
  """(step(batch) on the host, batch) over `rows` in batches of --batch_size, shortest rows
  first (tight buckets; the totals do not depend on the order)."""
  ordered = rows_lib.take_rows(rows, rows_lib.by_length(rows))
  for batch in tasks.row_batches(ordered, _BATCH.value, 0, True):
    yield jax.device_get(step(batch)), batch
    if advance is not None:
      advance()


def score_preferences(model, records, fields, mesh) -> dict:
  """A preference-tuned model on {prompt, chosen, rejected} pairs: its loss, rewards, margin and
  preference accuracy, against the reference it trained with (config.json "preference")."""
  settings = dict(model.metadata["preference"])
  reference_dir = settings.pop("reference")
  loss_cfg = LossConfig(**settings)
  template = model.generation.get("chat_template")
  pairs = [examples_lib.preference_example(r, model.tokenizer, fields, template, f"{p}:{n}")
           for p, n, r in records]  # fmt: skip
  seq_len = row_length(model, model.metadata)
  rows, dropped = examples_lib.preference_rows(pairs, seq_len)
  if not len(rows["inputs"]):
    raise ValueError(f"{_DATA_PATH.value}: no pair fits a row of {seq_len} tokens")
  reference = {}
  if loss_cfg.preference in WITH_REFERENCE:
    reference = modeldir.load_model_dir(reference_dir, mesh).params
  step = jax.jit(lambda p, b, r: eval_step(p, b, None, r, cfg=model.config, loss_cfg=loss_cfg))
  with sharding.activate(mesh):
    totals = metrics.eval_totals(
      batch_outputs(lambda batch: step(model.params, batch, reference), rows)
    )
  return {"pairs": int(totals.pop("weight")), "dropped": dropped, **totals}


def score_text(model, path: str, seq_len: int, mesh) -> dict:
  """A text's log-likelihood in windows, and its perplexities."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  tok = model.tokenizer
  prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
  windows = scoring.text_windows(tok.encode(text), prefix, seq_len, _STRIDE.value or seq_len)
  scorer = scoring.Scorer(model.params, model.config, _BATCH.value, seq_len, mesh)
  bar = Progress(len(windows), "evaluate", "windows")
  logp = sum(lp for lp, _ in scorer.score(windows, bar.advance))
  bar.close()
  predicted = int(sum(weights.sum() for _, _, weights in windows))
  return {"windows": len(windows), "logprob": logp, **scoring.perplexities(logp, predicted, text)}


def score_generations(model, records, fields, mesh) -> dict:
  """Greedy answers to every record's prompt (a seq2seq model: source) against its reference,
  and the speed."""
  tok, where = model.tokenizer, [f"{p}:{n}" for p, n, _ in records]
  sources = None
  if model.config.cross_attention:
    pairs = [[tok.encode(records_lib.record_text(r, f, w)) for f in examples_lib.SEQ2SEQ_FIELDS]
             for w, (_, _, r) in zip(where, records, strict=True)]  # fmt: skip
    sources, references = [s for s, _ in pairs], [tok.decode(t) for _, t in pairs]
    prompts = [[examples_lib.start_id(tok)] for _ in records]
  else:
    template = model.generation.get("chat_template")
    pairs = [examples_lib.generation_example(r, tok, fields, template, w)
             for w, (_, _, r) in zip(where, records, strict=True)]  # fmt: skip
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
  max_new = _MAX_NEW.value or 1 + max(len(tok.encode(r)) for r in references)
  sampling = offline.sampling_config({}, temperature=0.0)
  stops = offline.stop_ids(tok, model.generation)
  gen = offline.Generator(model, offline.GenerateConfig(max_new, sampling, stops), mesh)
  prompts, dropped = gen.fit(prompts, truncate=_TRUNCATE.value)
  cli.note_truncated(dropped)
  bar = Progress(len(prompts), "generate", "answers")
  results, t = gen.batched(prompts, _BATCH.value, bar.advance, sources)
  bar.close()
  predictions = [r["text"] for r in results]
  if _PREDICTIONS.value:
    rows = zip(where, predictions, references, strict=True)
    with open(_PREDICTIONS.value, "w", encoding="utf-8") as f:
      for w, p, r in rows:
        f.write(json.dumps({"where": w, "prediction": p, "reference": r}) + "\n")
  seconds = t["prefill_s"] + t["decode_s"]
  return {
    **metrics.generation_metrics(predictions, references),
    "generated_tokens": t["new_tokens"],
    "generation_tokens_per_s": t["new_tokens"] / max(seconds, 1e-9),
    "compile_s": t["compile_s"],
  }


def check_flags(model) -> None:
  """One source to score, and no flag its mode would not use."""
  if (_TEXT_FILE.value is None) == (_DATA_PATH.value is None):
    raise ValueError("give exactly one of --text_file (plain text) or --data_path (records)")
  answers = _DATA_PATH.value is not None and not model.config.num_labels
  answers = answers and "preference" not in model.metadata  # pairs: scored, not generated from
  generating = answers and _GENERATE.value
  for name, value, applies in (
    ("--stride", _STRIDE.value, _TEXT_FILE.value is not None),
    ("--generate", _GENERATE.value, answers),
    ("--max_new_tokens", _MAX_NEW.value, generating),
    ("--predictions", _PREDICTIONS.value, generating),
    ("--truncate_prompt", _TRUNCATE.value, generating),
  ):
    if value and not applies:
      raise ValueError(f"{name} does not apply to this evaluation")
  if model.config.num_labels and _DATA_PATH.value is None:
    raise ValueError(f"{_CHECKPOINT.value} is a classifier: give --data_path=RECORDS")
  if model.config.cross_attention and _DATA_PATH.value is None:
    raise ValueError(f"{_CHECKPOINT.value} is a seq2seq model: give --data_path={{source, target}}")


def main(argv):
  del argv
  mesh = _MESH()
  model = (offline.load if _GENERATE.value else modeldir.load_model_dir)(_CHECKPOINT.value, mesh)
  check_flags(model)
  tok, seq_len, meta = model.tokenizer, row_length(model, model.metadata), model.metadata
  fields = dataclasses.replace(data_config.DataConfig(), **meta.get("data_fields", {}))
  if _TEXT_FILE.value is not None:
    result = score_text(model, _TEXT_FILE.value, seq_len, mesh)
  elif model.config.num_labels:
    records = records_lib.read_records(_DATA_PATH.value)
    rows = examples_lib.classify_rows(records, tok, fields, seq_len, model.labels)
    result = score(model, rows, mesh)
  elif "preference" in meta:
    result = score_preferences(model, records_lib.read_records(_DATA_PATH.value), fields, mesh)
  elif model.config.cross_attention:
    records = records_lib.read_records(_DATA_PATH.value)
    rows, _ = examples_lib.seq2seq_rows(records, tok, seq_len)
    result = {**score(model, rows, mesh), "examples": len(records)}
    if _GENERATE.value:
      result.update(score_generations(model, records, fields, mesh))
  else:
    records = records_lib.read_records(_DATA_PATH.value)
    template = model.generation.get("chat_template")
    examples = [
      examples_lib.sft_example(r, tok, fields, template, f"{p}:{n}") for p, n, r in records
    ]
    rows, _ = examples_lib.sft_rows(examples, seq_len)
    result = score(model, rows, mesh)
    result["examples"] = len(examples)
    if _GENERATE.value:
      result.update(score_generations(model, records, fields, mesh))
  print(json.dumps(result))
  if _OUTPUT_JSON.value:
    cli.write_json(_OUTPUT_JSON.value, result)


if __name__ == "__main__":
  cli.run(main)
