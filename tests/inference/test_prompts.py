"""The one prompt-length rule that generate, the server, evaluate and the lm-eval backend share."""

import pytest

from decoderjax.inference.prompts import fit_prompts, truncation_note


def test_prompts_that_fit_pass_unchanged():
  prompts, dropped = fit_prompts([[1, 2, 3], [4]], context=8, reserve=5)
  assert prompts == [[1, 2, 3], [4]] and dropped == [0, 0]


def test_a_prompt_over_the_context_names_both_lengths():
  with pytest.raises(ValueError) as e:
    fit_prompts([[1] * 6, [2]], context=8, reserve=3, reserve_name="max_tokens")
  assert (
    str(e.value)
    == "a prompt of 6 tokens plus 3 (max_tokens) is over the model's context of 8 tokens"
  )
  with pytest.raises(ValueError, match="^a prompt of 9 tokens is over the window of 8$"):
    fit_prompts([[1] * 9], context=8, where="the window of 8")


def test_truncation_cuts_from_the_left_and_counts_the_tokens():
  prompts, dropped = fit_prompts([list(range(10)), [7, 8]], context=8, reserve=2, truncate=True)
  assert prompts == [list(range(4, 10)), [7, 8]] and dropped == [4, 0]
  assert truncation_note(dropped) == (
    "1 prompt(s) lost 4 token(s) from the left to fit the context (left truncation)"
  )


@pytest.mark.parametrize(
  "encoded,kw,message",
  [
    ([[1], []], {}, "empty prompt"),
    ([[1]], {"reserve": 8, "truncate": True}, "max_new_tokens=8 leaves no room for a prompt"),
  ],
)
def test_prompts_that_cannot_run(encoded, kw, message):
  with pytest.raises(ValueError, match=message):
    fit_prompts(encoded, context=8, **kw)
