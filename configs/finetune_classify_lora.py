"""Sequence classification with LoRA adapters and a new classification head.

  python -m decoderjax.train --config=configs/finetune_classify_lora.py --workdir=/tmp/ft_cls \
    --config.init_from=MODEL_DIR --config.data.path=train.jsonl --config.data.eval_path=val.jsonl

Records are {"text", "label"} (JSONL, or CSV with those columns); label names come from the
training data or --config.data.labels=neg,pos. Each step's 8 examples are packed, whole, into
rows no longer than 128 tokens (docs/finetuning.md); the head reads each text's last token (an
appended EOS).
The best checkpoint by validation accuracy is kept; training stops after `patience` evaluations
without improvement. Then: python -m decoderjax.evaluate --checkpoint=WORKDIR --data_path=F
and python -m decoderjax.predict --checkpoint=WORKDIR --text=...
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="lora", task="classify")
  config.data.update(seq_len=128, text_field="text", label_field="label", labels="")
  config.finetune.update(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, lora_targets="q,v")
  config.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=20)
  config.train.update(best_metric="val_accuracy", early_stopping_patience=4)
  return config
