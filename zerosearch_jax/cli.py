"""What the command-line entry points share: one readable, quiet log format.

Libraries that log their internals at INFO (absl, jax, orbax, bm25s, httpx) are kept to
warnings, and transformers' advisory notice about a missing torch (the runtime install has
none, by design) is silenced, so a run's log says what the run does.
"""

from __future__ import annotations

import logging
import os

_NOISY_LOGGERS = ("absl", "jax._src", "bm25s", "orbax", "httpx", "urllib3", "matplotlib",
                  "huggingface_hub")


def setup_logging(level: int | str = logging.INFO) -> None:
    """`HH:MM:SS message` lines on stderr; call once at the start of a command."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # force: absl's app.run installs its own handler on the root logger first.
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
