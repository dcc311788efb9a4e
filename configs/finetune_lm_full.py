"""Continued causal-LM training of a pretrained model on text, every parameter trained.

  python -m decoderjax.train --config=configs/finetune_lm_full.py --workdir=/tmp/ft_lm \
    --config.init_from=MODEL_DIR --config.data.path='docs/*.txt'

Any pretraining data source works (data.source: text, jsonl, tfds, default); the tokenizer is
the base model's. Learning rates sit two orders below pretraining; freeze the first layers with
--config.finetune.freeze_layers=N.
"""

from decoderjax.training.experiment import finetune_base_config


def get_config():
  config = finetune_base_config(method="full", task="lm")
  config.data.update(source="text", path="", seq_len=256, val_fraction=0.05)
  config.optimizer.update(learning_rate=5e-5, end_learning_rate=5e-6, schedule="cosine")
  config.finetune.update(freeze_layers=0, freeze_embeddings=False)
  return config
