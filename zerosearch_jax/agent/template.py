"""The ZeroSearch policy template and action parsing (docs/method.md §2).

The texts are interface constants: released checkpoints were trained on them, typo included
("as your want").
"""

from __future__ import annotations

import dataclasses
import re

POLICY_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {question}\n"
)
INVALID_ACTION = (
    "\nMy previous action is invalid. If I want to search, I should put the query between "
    "<search> and </search>. If I want to give the final answer, I should put the answer between "
    "<answer> and </answer>. Let me try again.\n"
)
STOP_TAGS = ("</search>", "</answer>")


def information_block(documents_text: str) -> str:
    """What the environment appends after a valid search."""
    return f"\n\n<information>{documents_text.strip()}</information>\n\n"


def policy_prompt(question: str) -> str:
    """The user message: the question stripped, with a '?' added when it has none."""
    question = question.strip()
    if question and not question.endswith("?"):
        question += "?"
    return POLICY_TEMPLATE.format(question=question)


@dataclasses.dataclass(frozen=True)
class Action:
    """kind: "search" | "answer" | "invalid"; content: the query or the answer (stripped)."""

    kind: str
    content: str = ""


_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def parse_action(turn_text: str) -> Action:
    """The first complete `<search>..</search>` or `<answer>..</answer>` of a policy turn, as
    upstream (Search-R1 `postprocess_predictions`); anything else is an invalid action."""
    m = _ACTION.search(turn_text)
    if m is None:
        return Action("invalid")
    return Action(m.group(1), m.group(2).strip())
