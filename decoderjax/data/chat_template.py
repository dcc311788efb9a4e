"""Chat messages rendered through a model's Jinja chat template."""

from __future__ import annotations


def render_chat(template: str, messages: list[dict], tok, add_generation_prompt=True) -> str:
  """A conversation through a Jinja chat template (as transformers renders them)."""
  import jinja2.sandbox

  def special(token_id):
    if token_id is None:
      return ""
    return tok.tok.id_to_token(token_id) if tok.kind == "hf" else tok.decode([token_id])

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  return env.from_string(template).render(
    messages=messages,
    add_generation_prompt=add_generation_prompt,
    bos_token=special(tok.bos_id),
    eos_token=special(tok.eos_id),
  )
