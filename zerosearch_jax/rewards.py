"""Answer extraction and QA metrics: the RL reward (F1) and the reported metrics (EM, cover EM).

ZeroSearch trains on the token F1 of the final answer (EM invited reward hacking with long
answers) and reports "EM" in its tables, which upstream computes as *cover* EM: the normalized gold
answer is a substring of the normalized prediction. Both are reported here, as `em` (strict) and
`cover_em`; see docs/method.md §5.

Normalization follows SQuAD / Search-R1: lower-case, drop `string.punctuation`, replace the words
a/an/the by a space, collapse white space.

Upstream bug fixed here: Search-R1/ZeroSearch search the *prompt + response* for the last
`<answer>..</answer>` span. The prompt's own example (`<answer> Beijing </answer>`) then counts as
the answer of a response that gives none, so a no-answer response scores like the answer
"Beijing". `extract_answer` takes the response text only, and a response without a complete
answer span scores 0 on every metric.

Further conventions (documented choices):
- The training reward `f1_score` is upstream's (`qa_em.py`): plain token F1, so "yes it is" vs
  "yes" scores 0.5. The HotpotQA / FlashRAG evaluation scripts add a rule: when the normalized
  prediction or gold is one of "yes", "no", "noanswer" and the two differ, F1 is 0. That is
  `flashrag_f1_score`, which the evaluation harness reports (`score_response(...,
  flashrag_f1=True)`) so its tables compare with FlashRAG's.
- A gold answer that normalizes to the empty string (e.g. "The") matches nothing; upstream's
  substring test would give it cover EM 1 for every prediction.
- Cover EM is a *character* substring test (upstream, author-confirmed), so it does not imply a
  token overlap: gold "cat" is covered by "concatenate", whose F1 is 0.

All functions are host-side Python on strings; rewards enter the device as a float array.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_OPEN, _CLOSE = "<answer>", "</answer>"
# Answers that get no partial credit against a different answer (HotpotQA convention).
_SPECIAL_ANSWERS = frozenset({"yes", "no", "noanswer"})


def normalize_answer(s: str) -> str:
    """Lower-case, drop punctuation, replace a/an/the by a space, collapse white space."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _golds(golden_answers: str | Sequence[str]) -> list[str]:
    """Normalized, non-empty gold answers; a single string counts as one answer."""
    if isinstance(golden_answers, str):
        golden_answers = [golden_answers]
    normalized = (normalize_answer(str(g)) for g in golden_answers)
    return [g for g in normalized if g]


def _best(
    metric: Callable[[str, str], float],
    prediction: str | None,
    golden_answers: str | Sequence[str],
) -> float:
    """Max of `metric(normalized_prediction, normalized_gold)` over gold answers; 0 for None."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return max((metric(pred, gold) for gold in _golds(golden_answers)), default=0.0)


def _f1(pred: str, gold: str) -> float:
    pred_tokens, gold_tokens = pred.split(), gold.split()
    num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1_flashrag(pred: str, gold: str) -> float:
    if pred != gold and (pred in _SPECIAL_ANSWERS or gold in _SPECIAL_ANSWERS):
        return 0.0
    return _f1(pred, gold)


def f1_score(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """Token-level F1 (bag of words), max over gold answers; in [0, 1]. The training reward
    (upstream's rule: no special case for yes / no)."""
    return _best(_f1, prediction, golden_answers)


def flashrag_f1_score(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """`f1_score` with the HotpotQA / FlashRAG evaluation rule: 0 when the normalized
    prediction or gold is "yes", "no" or "noanswer" and the two differ."""
    return _best(_f1_flashrag, prediction, golden_answers)


def exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 iff the normalized prediction equals some normalized gold answer, else 0.0."""
    return _best(lambda pred, gold: float(pred == gold), prediction, golden_answers)


def cover_exact_match(prediction: str | None, golden_answers: str | Sequence[str]) -> float:
    """1.0 iff some normalized gold answer is a substring of the normalized prediction.

    This is the "EM" of the paper's tables (upstream `subem_check`).
    """
    return _best(lambda pred, gold: float(gold in pred), prediction, golden_answers)


def extract_answer(response_text: str) -> str | None:
    """The stripped text of the last complete `<answer>...</answer>` span, or None.

    Pass the response only (never the prompt, whose example contains an answer span). The span is
    the last `</answer>` with its nearest preceding `<answer>`, so an unclosed trailing `<answer>`
    is ignored and `<answer> a <answer> b </answer>` gives "b".
    """
    close = response_text.rfind(_CLOSE)
    if close < 0:
        return None
    open_ = response_text.rfind(_OPEN, 0, close)
    if open_ < 0:
        return None
    return response_text[open_ + len(_OPEN) : close].strip()


def score_response(response_text: str, golden_answers: str | Sequence[str],
                   flashrag_f1: bool = False) -> dict:
    """Extract the answer of one response and score it. flashrag_f1: F1 by the FlashRAG
    evaluation rule (`flashrag_f1_score`) instead of the training reward's.

    Returns:
      {"answer": str | None, "f1": float, "em": float, "cover_em": float}; all metrics are 0.0
      when the response has no complete answer span.
    """
    answer = extract_answer(response_text)
    return {
        "answer": answer,
        "f1": (flashrag_f1_score if flashrag_f1 else f1_score)(answer, golden_answers),
        "em": exact_match(answer, golden_answers),
        "cover_em": cover_exact_match(answer, golden_answers),
    }
