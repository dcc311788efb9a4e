"""Sequence classification by prompt tuning: learned soft-prompt vectors and a classification
head train; every base parameter stays frozen.

  python -m decoderjax.train --config=configs/finetune_classify_prompt.py --workdir=/tmp/ft_pt \
    --config.init_from=MODEL_DIR --config.data.path=train.jsonl --config.data.eval_path=val.jsonl
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="prompt", task="classify")
  config.data.update(seq_len=128)
  config.finetune.update(prompt_tokens=20)
  config.optimizer.update(learning_rate=3e-3, end_learning_rate=3e-4, warmup_steps=20)
  config.train.update(best_metric="val_accuracy", early_stopping_patience=4)
  return config
