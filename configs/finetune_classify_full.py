"""Sequence classification, every parameter trained at a small learning rate, with adversarial
training (FGM on the input embeddings) as a regularizer.

  python -m decoderjax.train --config=configs/finetune_classify_full.py --workdir=/tmp/ft_full \
    --config.init_from=MODEL_DIR --config.data.path=train.jsonl --config.data.eval_path=val.jsonl

--config.loss.adversarial=none turns the adversarial term off; pgd uses loss.adv_steps steps.
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="full", task="classify")
  config.data.update(seq_len=128)
  config.optimizer.update(learning_rate=5e-5, end_learning_rate=5e-6, warmup_steps=20)
  config.loss.update(adversarial="fgm", adv_epsilon=1.0, adv_weight=1.0)
  config.train.update(best_metric="val_accuracy", early_stopping_patience=4)
  return config
