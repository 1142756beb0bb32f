"""docs/method.md quotes the interface prompts verbatim: they must equal the code's constants."""

import ast
import pathlib
import re

from zerosearch_jax.agent import template
from zerosearch_jax.search import simulator
from zerosearch_jax.search.base import QueryContext

_DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "method.md"
_FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", re.S | re.M)


def _blocks(lang: str) -> list[str]:
    """The contents of the doc's fenced blocks of one language, each ending with a newline."""
    return [body for kind, body in _FENCE.findall(_DOC.read_text()) if kind == lang]


def test_policy_texts_are_quoted_verbatim():
    literals = [ast.literal_eval(body.strip()) for body in _blocks("python")]
    assert template.POLICY_TEMPLATE in literals
    assert template.INVALID_ACTION in literals
    assert template.information_block("{documents}") in literals


def test_simulator_prompts_are_quoted_verbatim():
    texts = _blocks("text")
    context = QueryContext("{question}", ("{answer}",))
    for variant in simulator.SIMULATOR_VARIANTS:
        for useful in (True, False):
            prompt = simulator.simulator_prompt("{query}", context, useful, variant)
            assert prompt in texts, (variant, useful)
