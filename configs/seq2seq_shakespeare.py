"""The seed article's decoder on a sequence-to-sequence task: Shakespeare lines, words reversed.

A Transformer decoder whose layers also attend to an encoder's states (cross_attention, as
torch.nn.TransformerDecoderLayer: self-attention, cross-attention, ReLU feed-forward, post-norm;
sinusoidal positions, embeddings x sqrt(D)), with 2 encoder layers over the source bytes. The
built-in task pairs each distinct line of the embedded Shakespeare (3-10 words) with the same
words in reverse order; `--config.data.source=jsonl --config.data.path=FILE` trains on your own
{"source", "target"} records instead (docs/seq2seq.md).
  python -m decoderjax.train --config=configs/seq2seq_shakespeare.py --workdir=/tmp/s2s
  python -m decoderjax.generate --checkpoint=/tmp/s2s --temperature=0 \
    --source="To be, or not to be, that is the question"
"""

from decoderjax.training.experiment import base_config


def get_config():
  config = base_config(
    None,
    vocab_size=0,  # the tokenizer's
    max_seq_len=96,
    num_layers=2,
    num_heads=4,
    embed_dim=128,
    mlp_dim=512,
    position="sinusoidal",
    embed_scale=True,
    norm="layernorm",
    norm_placement="post_ln",
    mlp="relu",
    use_bias=True,
    tie_embeddings=True,
    cross_attention=True,
    encoder_layers=2,
    scan_layers=False,
  )
  config.data.update(
    source="default", task="seq2seq", tokenizer="byte", seq_len=96, pack=False, val_fraction=0.02
  )
  config.optimizer.update(
    learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=200, weight_decay=0.01, b2=0.98
  )
  config.train.update(steps=3000, batch_size=32, log_every=100, sample_tokens=96)
  config.eval.update(every_steps=500, max_batches=8, batch_size=64)
  config.checkpoint.update(every_steps=1000, keep=1)
  return config
