"""The one rule for a prompt that does not fit: the generate binary, the server's engine,
`evaluate --generate` and the lm-eval backend all ask `fit_prompts`, and say what it says."""

from __future__ import annotations


def fit_prompts(
  encoded: list[list[int]],
  context: int,
  reserve: int = 0,
  *,
  truncate: bool = False,
  reserve_name: str = "max_new_tokens",
  where: str | None = None,
) -> tuple[list[list[int]], list[int]]:
  """Prompts that leave `reserve` of `context` positions (the tokens to generate) -> (the
  prompts, tokens each lost). A longer prompt is an error naming both lengths, unless
  `truncate` (asked for, or the harness's convention): then it loses its first tokens, as
  lm-eval's `hf` backend cuts them. `where` names the context in messages."""
  if any(not e for e in encoded):
    raise ValueError("empty prompt: every prompt needs at least one token")
  where = where or f"the model's context of {context} tokens"
  room, longest = context - reserve, max(map(len, encoded), default=0)
  if longest > room and not truncate:
    plus = f" plus {reserve} ({reserve_name})" if reserve else ""
    raise ValueError(f"a prompt of {longest} tokens{plus} is over {where}")
  if room < 1:
    raise ValueError(f"{reserve_name}={reserve} leaves no room for a prompt in {where}")
  return [e[-room:] for e in encoded], [max(len(e) - room, 0) for e in encoded]


def truncation_note(dropped: list[int]) -> str:
  """The one line a caller logs (once) when prompts were cut."""
  cut, total = sum(d > 0 for d in dropped), sum(dropped)
  return f"{cut} prompt(s) lost {total} token(s) from the left to fit the context (left truncation)"
