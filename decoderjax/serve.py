"""Serves a model over the OpenAI API: python -m decoderjax.serve --checkpoint=DIR.

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "NAME", "prompt": "ROMEO.", "max_tokens": 32}'

Requests are batched continuously over --slots decode rows (inference/engine.py); every program
compiles at start-up. SIGTERM stops taking requests, lets the running ones finish (up to
--shutdown_timeout seconds), then exits.
"""

from __future__ import annotations

import os

from absl import flags

from decoderjax import cli
from decoderjax.inference import engine, offline
from decoderjax.model.config import KV_CACHES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model directory (or training workdir).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on.")
_SLOTS = flags.DEFINE_integer("slots", 8, "Requests decoded together (the decode batch).")
_MAX_SEQ_LEN = flags.DEFINE_integer(
  "max_seq_len", 0, "Tokens per slot, prompt plus output (0: the model's context)."
)
_QUEUE = flags.DEFINE_integer("max_queue", 256, "Requests waiting for a slot; more get 429.")
_API_KEY = flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY`.")
_NAME = flags.DEFINE_string("served_model_name", None, "The model's name in the API (default: "
                            "the checkpoint directory's name).")  # fmt: skip
_KV_CACHE = flags.DEFINE_enum("kv_cache", "auto", KV_CACHES, "KV cache storage.")
_SHUTDOWN = flags.DEFINE_float(
  "shutdown_timeout", 30.0, "Seconds running requests get to finish after SIGTERM."
)
_MESH = cli.define_mesh_flags()
flags.mark_flag_as_required("checkpoint")


def main(argv):
  del argv
  try:
    import uvicorn

    from decoderjax.inference import openai_api as server_lib
  except ImportError as e:
    raise ImportError(f"{e}: the server needs pip install -e '.[serve]'") from None

  mesh = _MESH()
  model = offline.load(_CHECKPOINT.value, mesh, _KV_CACHE.value)
  eng = engine.Engine(model, _SLOTS.value, _MAX_SEQ_LEN.value, mesh, _QUEUE.value)
  name = _NAME.value or os.path.basename(os.path.normpath(_CHECKPOINT.value))
  print(f"serving {name}: {_SLOTS.value} slots of {eng.max_len} tokens, prompt buckets "
        f"{eng.buckets}, compiled in {eng.compile_s:.1f}s", flush=True)  # fmt: skip
  app = server_lib.create_app(server_lib.Server(eng, name, _API_KEY.value))
  config = uvicorn.Config(app, host=_HOST.value, port=_PORT.value, log_level="warning",
                          timeout_graceful_shutdown=_SHUTDOWN.value)  # fmt: skip
  print(f"listening on http://{_HOST.value}:{_PORT.value}/v1", flush=True)
  uvicorn.Server(config).run()


if __name__ == "__main__":
  cli.run(main)
