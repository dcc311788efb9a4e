"""A Llama-3.2-1B-shaped model pretrained on a TFDS dataset, for accelerators (bfloat16, remat).

  pip install -e '.[tfds]'
  python -m decoderjax.train --config=configs/llama_1b.py --workdir=gs://bucket/llama \
    --config.data.tfds_name=c4/en
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    "llama-3.2-1b", vocab_size=0, max_seq_len=2048, dtype="bfloat16", remat="dots_no_batch"
  )
  config.data.update(
    source="tfds",
    tfds_name="c4/en",
    tfds_split="train",
    tfds_eval_split="validation",
    text_field="text",
    tokenizer="sentencepiece",
    vocab_size=32768,
    seq_len=2048,
  )
  config.optimizer.update(
    learning_rate=3e-4, end_learning_rate=3e-5, warmup_steps=2000, b2=0.95, weight_decay=0.1
  )
  config.loss.update(z_loss=1e-4)
  config.train.update(steps=200_000, batch_size=256, log_every=100, sample_every=5000)
  config.eval.update(every_steps=2000, max_batches=50)
  config.checkpoint.update(every_steps=2000, keep=3)
  return config
