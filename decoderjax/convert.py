"""Converts checkpoints into decoderjax model directories.

  python -m decoderjax.convert --from=hf --input=HF_DIR --output=MODEL_DIR [--dtype=bfloat16]
  python -m decoderjax.convert --from=gguf --input=FILE.gguf --output=MODEL_DIR
  python -m decoderjax.convert --to=hf --input=MODEL_DIR --output=HF_DIR
  python -m decoderjax.convert --to=decoderjax --input=WORKDIR --output=MODEL_DIR
  python -m decoderjax.convert --to=peft --input=LORA_WORKDIR --output=PEFT_DIR
  python -m decoderjax.convert --from=peft --input=PEFT_DIR --base=MODEL_DIR --output=ADAPTER_DIR

--to=decoderjax writes a self-contained model directory from a training workdir or adapter
directory: the best checkpoint's parameters, with LoRA adapters merged into the weights.
--to=peft writes a LoRA fine-tune's adapters as a peft adapter (adapter_config.json,
adapter_model.safetensors) for the base exported by --to=hf; --from=peft reads one as an adapter
directory over --base, the decoderjax model directory converted from its Hugging Face base.

HF_DIR is a Hugging Face model folder: config.json, safetensors weights (single or sharded),
and tokenizer.json or tokenizer.model (or --tokenizer=DIR naming the folder that has them, for a
checkpoint saved without its tokenizer). The output is written to a temporary folder beside
MODEL_DIR and renamed into place only when complete.
"""

from __future__ import annotations

import os

from absl import flags

from decoderjax import cli
from decoderjax.checkpoints import exchange, modeldir, peft_io

_FROM = flags.DEFINE_enum(
  "from", None, ["hf", "gguf", "peft"], "Source format (into a model or adapter directory)."
)
_TO = flags.DEFINE_enum(
  "to", None, ["hf", "decoderjax", "peft"], "Target format (from a model directory or workdir)."
)
_BASE = flags.DEFINE_string(
  "base", None, "--from=peft: the model directory of the adapter's base (converted from it)."
)
_INPUT = flags.DEFINE_string("input", None, "Source checkpoint folder.")
_OUTPUT = flags.DEFINE_string("output", None, "Model directory to write (must not exist).")
_TOKENIZER = flags.DEFINE_string(
  "tokenizer",
  None,
  "--from=hf: the folder with tokenizer.json or tokenizer.model, when the "
  "checkpoint was saved without them (the tokenizer's folder or the original model's).",
)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored parameter dtype.")
flags.mark_flags_as_required(["input", "output"])


def main(argv):
  del argv
  if (_FROM.value is None) == (_TO.value is None):
    raise ValueError(
      "give exactly one of --from=hf|gguf|peft (into decoderjax) or --to=hf|decoderjax|peft"
    )
  if _TOKENIZER.value and _FROM.value != "hf":
    raise ValueError(
      "--tokenizer applies to --from=hf only (GGUF files and model directories "
      "carry their tokenizer)"
    )
  if flags.FLAGS["dtype"].present and _FROM.value not in ("hf", "gguf"):
    raise ValueError(
      "--dtype applies to --from=hf and --from=gguf (an adapter and an export keep the dtypes "
      "they have)"
    )
  if (_BASE.value is not None) != (_FROM.value == "peft"):
    raise ValueError("--from=peft needs --base=MODEL_DIR, and --base applies to it alone")
  if os.path.exists(_OUTPUT.value):
    raise ValueError(f"--output={_OUTPUT.value} already exists")
  if _FROM.value == "hf":
    exchange.convert_hf(_INPUT.value, _OUTPUT.value, _DTYPE.value, _TOKENIZER.value)
  elif _FROM.value == "gguf":
    exchange.convert_gguf(_INPUT.value, _OUTPUT.value, _DTYPE.value)
  elif _FROM.value == "peft":
    peft_io.import_peft(_INPUT.value, _BASE.value, _OUTPUT.value)
  elif _TO.value == "decoderjax":
    modeldir.export_model_dir(_INPUT.value, _OUTPUT.value)
  elif _TO.value == "peft":
    peft_io.export_peft(_INPUT.value, _OUTPUT.value)
  else:
    exchange.export_hf(_INPUT.value, _OUTPUT.value)
  print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
