"""nanoGPT's "baby GPT" char model: 6 layers, 6 heads, width 384, block 256, dropout 0.2.

Sized for an accelerator (nanoGPT reports validation loss about 1.47 after 5,000 steps):
  python -m decoderjax.train --config=configs/shakespeare_char.py --workdir=/tmp/baby \
    --config.data.source=text --config.data.path=tinyshakespeare.txt
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    "tiny-gpt2",
    vocab_size=0,
    max_seq_len=256,
    num_layers=6,
    num_heads=6,
    embed_dim=384,
    mlp_dim=1536,
    use_bias=False,
    embed_dropout=0.2,
    attn_dropout=0.2,
    resid_dropout=0.2,
    remat="dots",  # the backward pass recomputes all but matmul outputs: under half the memory
  )
  config.data.update(source="default", path="", tokenizer="char", seq_len=256, val_fraction=0.1)
  config.optimizer.update(
    learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100, b2=0.99, weight_decay=0.1
  )
  config.train.update(steps=5000, batch_size=64, log_every=100, sample_every=1000)
  config.eval.update(every_steps=250, max_batches=200, batch_size=64)
  config.checkpoint.update(every_steps=1000, keep=2)
  return config
