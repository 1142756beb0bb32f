"""The simulator quality report: does a simulator follow the format, and do its useful documents
carry the answer while its noisy ones do not?

For every held-out (question, gold answer, query), each simulator writes one useful and one noisy
output (the coin flip forced through `QueryContext.useful`, so both kinds see the same queries).
Per kind: the share of outputs that contain a gold answer, the share that are format-valid
(exactly `topk` lines `Doc 1:` ... `Doc k:`), and words per document. The real engine's documents
for the same queries (the SFT targets) are the reference row. Written as a markdown table, JSON
and a bar plot.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from zerosearch_jax.search.base import QueryContext
from zerosearch_jax.simulator_sft.label import contains_answer

_DOC_LINE = re.compile(r"^Doc (\d+):\s*(.*)$")
METRICS = ("contains_answer", "format_valid", "words_per_doc")


def output_quality(text: str, golden_answers: Sequence[str], topk: int = 5) -> dict[str, float]:
    """Metrics of one simulator output (raw text, `Doc i:` lines)."""
    from zerosearch_jax.search.simulator import clean_simulator_output

    lines = clean_simulator_output(text, topk)
    parsed = [_DOC_LINE.match(line) for line in lines]
    valid = len(lines) == topk and all(
        m is not None and int(m.group(1)) == i + 1 for i, m in enumerate(parsed))
    docs = [m.group(2) if m else line for m, line in zip(parsed, lines, strict=True)]
    return {"contains_answer": float(contains_answer(" ".join(docs), golden_answers)),
            "format_valid": float(valid),
            "words_per_doc": float(np.mean([len(d.split()) for d in docs])) if docs else 0.0}


def summarize(rows: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """{kind: {metric: mean}} over rows of {kind, **output_quality}."""
    out = {}
    for kind in ("useful", "noisy"):
        sel = [r for r in rows if r["kind"] == kind]
        out[kind] = {m: float(np.mean([r[m] for r in sel])) if sel else float("nan")
                     for m in METRICS} | {"n": len(sel)}
    return out


def queries_for_report(heldout: Sequence[dict], n: int, seed: int) -> list[dict]:
    """Up to n distinct held-out queries, each with its real useful / noisy targets."""
    by_query: dict[tuple[str, str], dict] = {}
    for e in heldout:
        q = by_query.setdefault((e["question"], e["query"]), {
            "question": e["question"], "query": e["query"],
            "golden_answers": e["golden_answers"], "targets": {}})
        q["targets"][e["label"]] = e["target"]
    items = sorted(by_query.values(), key=lambda q: (q["question"], q["query"]))
    rng = np.random.default_rng(seed)
    pick = sorted(rng.choice(len(items), min(n, len(items)), replace=False)) if items else []
    return [items[i] for i in pick]


def evaluate_simulator(engine, queries: Sequence[dict], topk: int = 5) -> list[dict]:
    """Rows of {kind, query, output, **output_quality} for one simulator engine."""
    rows = []
    for useful in (True, False):
        contexts = [QueryContext(q["question"], tuple(q["golden_answers"]), useful=useful)
                    for q in queries]
        results = engine.search([q["query"] for q in queries], contexts=contexts)
        for q, r in zip(queries, results, strict=True):
            raw = r.metadata.get("raw", "\n".join(r.documents))
            rows.append({"kind": "useful" if useful else "noisy", "query": q["query"],
                         "output": raw, **output_quality(raw, q["golden_answers"], topk)})
    return rows


def reference_rows(queries: Sequence[dict], topk: int = 5) -> list[dict]:
    """The real engine's targets scored like simulator outputs."""
    return [{"kind": kind, "query": q["query"], "output": text,
             **output_quality(text, q["golden_answers"], topk)}
            for q in queries for kind, text in sorted(q["targets"].items())]


def write_report(results: Mapping[str, Mapping[str, Mapping[str, float]]], out_dir: str) -> str:
    """report.md, report.json and report.png; returns the markdown table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    header = ("| simulator | useful: contains answer | noisy: contains answer | useful: format "
              "valid | noisy: format valid | words/doc | outputs (useful / noisy) |\n"
              "|---|---|---|---|---|---|---|")
    lines = [header]
    for name, r in results.items():
        u, n = r["useful"], r["noisy"]
        lines.append(f"| {name} | {u['contains_answer']:.2f} | {n['contains_answer']:.2f} | "
                     f"{u['format_valid']:.2f} | {n['format_valid']:.2f} | "
                     f"{np.nanmean([u['words_per_doc'], n['words_per_doc']]):.1f} | "
                     f"{u['n']} / {n['n']} |")
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("# Simulator quality on held-out queries\n\n" + table + "\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(results, f, indent=2)

    bars = [("useful: contains answer", "useful", "contains_answer"),
            ("noisy: contains answer", "noisy", "contains_answer"),
            ("useful: format valid", "useful", "format_valid"),
            ("noisy: format valid", "noisy", "format_valid")]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / max(1, len(results))
    x = np.arange(len(bars))
    for j, (name, r) in enumerate(results.items()):
        ax.bar(x + j * width, [r[kind][m] for _, kind, m in bars], width, label=name)
    ax.set_xticks(x + width * (len(results) - 1) / 2, [b[0] for b in bars], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of outputs")
    ax.set_title("Simulator quality (held-out queries)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "report.png"), dpi=110)
    plt.close(fig)
    return table
