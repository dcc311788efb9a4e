"""GPT-2 small (124M) pretraining for accelerators, on a TFDS text dataset.

  pip install -e '.[tfds]'
  python -m decoderjax.train --config=configs/gpt2_124m.py --workdir=gs://bucket/gpt2 \
    --config.data.tfds_name=lm1b
GPT-2 vocabulary sizes need a GPT-2 tokenizer.json (data.tokenizer=hf); by default a 32k
SentencePiece BPE is trained on the data.
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config("gpt2", vocab_size=0, dtype="bfloat16", remat="dots_no_batch")
  config.data.update(
    source="tfds",
    tfds_name="lm1b",
    tfds_split="train",
    tfds_eval_split="test",
    text_field="text",
    tokenizer="sentencepiece",
    vocab_size=32768,
    seq_len=1024,
  )
  config.optimizer.update(
    learning_rate=6e-4, end_learning_rate=6e-5, warmup_steps=2000, b2=0.95, weight_decay=0.1
  )
  config.loss.update(z_loss=1e-4)
  config.train.update(steps=100_000, batch_size=512, log_every=100, sample_every=5000)
  config.eval.update(every_steps=2000, max_batches=50)
  config.checkpoint.update(every_steps=2000, keep=3)
  return config
