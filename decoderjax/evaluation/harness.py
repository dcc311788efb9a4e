"""The lm-evaluation-harness backend: `lm_eval --model decoderjax --model_args checkpoint=DIR`.

All three request types, on any model directory (converted, fine-tuned, LoRA-merged, quantized;
sharded with mesh_data/mesh_fsdp/mesh_tensor):
- `loglikelihood`: the harness's context/continuation split (TemplateLM), scored by
  `scoring.Scorer` with the `hf` backend's left truncation and `is_greedy`;
- `loglikelihood_rolling`: the harness's own rolling windows (context_len=1);
- `generate_until`: `generator.Generator`, batched, with `until` strings and `max_gen_toks`.
Requests run sorted by length in fixed-size batches, so few programs compile.
"""

from __future__ import annotations

import json
import logging

import jax
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from decoderjax.checkpoints import modeldir
from decoderjax.data import chat_template as chat_template_lib
from decoderjax.evaluation import scoring
from decoderjax.inference import offline
from decoderjax.inference.offline import GenerateConfig, Generator
from decoderjax.inference.prompts import fit_prompts
from decoderjax.runtime import cache_dirs, platforms, sharding

log = logging.getLogger(__name__)
PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "gpu": "gpu", "rocm": "gpu", "tpu": "tpu"}
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


class DecoderJaxLM(TemplateLM):
  """A decoderjax model directory as an lm-eval LM."""

  def __init__(
    self,
    checkpoint: str,
    batch_size: int | str = 8,
    max_length: int | None = None,
    max_gen_toks: int = 256,
    add_bos_token: bool | None = None,
    kv_cache: str = "auto",
    mesh_data: int = 0,
    mesh_fsdp: int = 0,
    mesh_tensor: int = 0,
    seed: int = 0,
    compilation_cache: str | None = None,
    device: str | None = None,
  ):
    super().__init__()
    if not str(batch_size).isdigit():
      raise ValueError(f"batch_size must be a positive integer (no 'auto'), got {batch_size!r}")
    platforms.skip_absent_tpu()
    _check_device(device)
    # evaluations repeat shapes: every program is worth keeping
    cache_dirs.enable_compilation_cache(compilation_cache, min_seconds=0)
    self.mesh = sharding.inference_mesh(mesh_data, mesh_fsdp, mesh_tensor)
    self.model = modeldir.load_model_dir(checkpoint, self.mesh)  # scoring's layout
    cfg, self.checkpoint, self.kv_cache = self.model.config, checkpoint, kv_cache
    cfg.replace(kv_cache=kv_cache)  # checked now, used from the first generate_until
    if cfg.num_labels:
      raise ValueError(f"{checkpoint} is a classifier: it has no next-token likelihoods")
    if cfg.cross_attention:
      raise ValueError(f"{checkpoint} is a seq2seq model: its likelihoods need a source")
    if int(max_length or 0) > cfg.text_len:
      raise ValueError(f"max_length={max_length} exceeds the model's room of {cfg.text_len}")
    self._max_length = int(max_length or cfg.text_len)
    self._max_gen_toks, self._batch_size, self.seed = int(max_gen_toks), int(batch_size), seed
    self.tok = self.model.tokenizer
    self.add_bos_token = self.tok.adds_bos if add_bos_token is None else bool(add_bos_token)
    self.scorer = scoring.Scorer(
      self.model.params, cfg, self._batch_size, self._max_length, self.mesh
    )
    self.generators: dict[GenerateConfig, Generator] = {}
    self.said_truncated = False

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    """--model_args, then the run's --batch_size where model_args lacks one (the harness always
    passes its default of 1, so model_args' batch_size wins). The run's --device, always passed
    too (default cuda:0), names a torch device: JAX uses its default backend, and a
    model_args device= that disagrees with it is an error."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    device = extra.pop("device", None)
    if device is not None and _platform(device) != jax.default_backend():
      log.warning("--device=%s is for torch backends; JAX runs on %s", device, jax.devices()[0])
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

  # What the harness asks of a model.

  @property
  def eot_token_id(self) -> int:
    if self.tok.eos_id is None:
      raise ValueError(f"{self.checkpoint}: the tokenizer has no end-of-text token")
    return self.tok.eos_id

  @property
  def prefix_token_id(self) -> int:
    """What an empty context is: BOS, else end-of-text (as the `hf` backend)."""
    return self.tok.bos_id if self.tok.bos_id is not None else self.eot_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def device(self) -> str:
    return jax.default_backend()

  @property
  def tokenizer_name(self) -> str:
    return self.checkpoint.rstrip("/").replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """Ids as the `hf` backend encodes: BOS first where the tokenizer adds one by default (or
    add_bos_token says so), unless the text already starts with it."""
    if kwargs:
      raise ValueError(f"tok_encode: unexpected arguments {sorted(kwargs)}")
    ids = self.tok.encode(string)
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    bos = self.tok.bos_id
    if add and bos is not None and not (add_special_tokens is None and ids[:1] == [bos]):
      ids = [bos] + ids
    return ids

  def tok_decode(self, tokens) -> str:
    return self.tok.decode(tokens)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    if chat_template is False or chat_template is None:
      return None
    return self.model.generation.get("chat_template")

  def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
    template = self.model.generation.get("chat_template")
    if not template:
      raise ValueError(f"{self.checkpoint} has no chat template (generation.json)")
    return chat_template_lib.render_chat(template, chat_history, self.tok, add_generation_prompt)

  # The three request types.

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """[((context, continuation) | None, context ids, continuation ids)] -> [(log p, greedy)]."""
    with tqdm(total=len(requests), disable=disable_tqdm, desc="decoderjax loglikelihood") as bar:
      results = self.scorer(
        [(c, x) for _, c, x in requests], on_truncate=self._truncated, progress=bar.update
      )
    for (key, _, _), result in zip(requests, results, strict=True):
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each text's log-likelihood over the harness's disjoint rolling windows."""
    windows, owners = [], []
    for i, (text,) in enumerate(req.args for req in requests):
      rolling = lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text),
        prefix_token=self.prefix_token_id,
        max_seq_len=self.max_length,
        context_len=1,
      )
      for window in map(lm_utils.make_disjoint_window, rolling):
        windows.append((None, *window))
        owners.append(i)
    totals = [0.0] * len(requests)
    scores = self._loglikelihood_tokens(windows, disable_tqdm)
    for owner, (logp, _) in zip(owners, scores, strict=True):
      totals[owner] += logp
    for req, total in zip(requests, totals, strict=True):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of each context, grouped by generation settings, batched by length."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out = [""] * len(requests)
    with tqdm(total=len(requests), disable=disable_tqdm, desc="decoderjax generate") as bar:
      for indices in groups.values():
        contexts = [requests[i].args[0] for i in indices]
        texts = self._generate(contexts, requests[indices[0]].args[1], bar)
        for i, text in zip(indices, texts, strict=True):
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out

  # Helpers.

  def _generate(self, contexts: list[str], gen_kwargs: dict, bar) -> list[str]:
    if not self.generators:  # the first generation: the weights move to generation's layout
      offline.for_generation(self.model, self.kv_cache)
      self.scorer.params, self.scorer.cfg = self.model.params, self.model.config
    config = self._generate_config(gen_kwargs)
    if config not in self.generators:
      self.generators[config] = Generator(self.model, config, self.mesh)
    gen = self.generators[config]
    encoded = [self.tok_encode(c) for c in contexts]
    prompts, dropped = fit_prompts(encoded, self.max_length, config.max_new_tokens, truncate=True)
    if any(dropped):
      self._truncated(sum(d > 0 for d in dropped))
    results, _ = gen.batched(prompts, self.batch_size, bar.update)
    return [r["text"] for r in results]

  def _generate_config(self, gen_kwargs: dict) -> GenerateConfig:
    """The harness's generation settings as ours; a setting we do not have is an error."""
    kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
    until = [s for s in kwargs.pop("until") if s]
    max_new, do_sample = kwargs.pop("max_gen_toks"), kwargs.pop("do_sample", False)
    seed = int(kwargs.pop("seed", self.seed))
    unknown = set(kwargs) - set(SAMPLING_KEYS)
    if unknown:
      raise ValueError(f"generation settings the decoderjax backend lacks: {sorted(unknown)}")
    settings = {k: kwargs[k] for k in SAMPLING_KEYS if k in kwargs}
    if not do_sample:
      settings["temperature"] = 0.0  # greedy, as transformers does without do_sample
    sampling = offline.sampling_config({}, **settings)
    stops = offline.stop_ids(self.tok, self.model.generation)
    return GenerateConfig(max_new, sampling, stops, tuple(until), seed=seed)

  def _truncated(self, count: int) -> None:
    if not self.said_truncated:
      self.said_truncated = True
      log.warning(
        "%d request(s) exceed the context of %d tokens: their contexts lose tokens from the "
        "left, as the hf backend does (said once)",
        count,
        self.max_length,
      )


def _platform(device: str) -> str | None:
  """The JAX platform a torch-style device name means (cuda:0 -> gpu)."""
  return PLATFORMS.get(str(device).split(":")[0])


def _check_device(device: str | None) -> None:
  """JAX runs on its default backend; a device= naming another platform is an error."""
  if device is None:
    return
  if _platform(device) is None:
    raise ValueError(f"device {device!r}: expected one of {sorted(PLATFORMS)} (JAX picks the chip)")
  if _platform(device) != jax.default_backend():
    raise ValueError(
      f"device={device}, but JAX runs on {jax.default_backend()} (set JAX_PLATFORMS to choose)"
    )
