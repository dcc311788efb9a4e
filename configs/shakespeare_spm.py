"""Word-piece Shakespeare: a SentencePiece BPE tokenizer (4,096 pieces) trained on the corpus.

python -m decoderjax.train --config=configs/shakespeare_spm.py --workdir=/tmp/spm
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    "tiny-llama",
    vocab_size=0,
    max_seq_len=128,  # the rows it trains on: generation slides its window past them
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    embed_dim=192,
    mlp_dim=512,
    scan_layers=False,
  )
  config.data.update(
    source="default", tokenizer="sentencepiece", vocab_size=4096, seq_len=128, val_fraction=0.05
  )
  config.optimizer.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100)
  config.train.update(steps=2000, batch_size=16, log_every=100, sample_prompt="ROMEO.")
  config.eval.update(every_steps=500, max_batches=20)
  config.checkpoint.update(every_steps=500, keep=2)
  return config
