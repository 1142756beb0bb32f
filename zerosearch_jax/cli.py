"""What the command-line entry points share: one readable, quiet log format, and one `main`.

Libraries that log their internals at INFO (absl, jax, orbax, bm25s, httpx) are kept to
warnings, and transformers' advisory notice about a missing torch (the runtime install has
none, by design) is silenced, so a run's log says what the run does.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from zerosearch_jax import checkpoints

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


DEFAULT_COMPILATION_CACHE = "~/.cache/zerosearch_jax/xla"


def enable_compilation_cache(path: str) -> None:
    """Points JAX's persistent compilation cache at `path` ('' leaves it off), unless the
    JAX_COMPILATION_CACHE_DIR environment variable already chose one (JAX reads it itself).

    Compiling the rollout and update programs is a large part of a short run's time (about 40%
    of the tests' tiny runs on CPU) and minutes on a TPU pod; a cache hit is the same
    executable, keyed by the program, the devices and the JAX version, so results do not
    change. Only executables that took over `jax_persistent_cache_min_compile_time_secs`
    (1 s by default) to compile are written.
    """
    if path and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def run_command(command: Callable[[ml_collections.ConfigDict, str | None], int],
                default_config: str, workdir_help: str, *, workdir_required: bool = True,
                errors: tuple[type[Exception], ...] = (), multi_host: bool = False,
                argv=None) -> None:
    """The entry points' shared `main`: `--config` (an ml_collections config file, default
    `configs/<default_config>`, overridable as `--config.key=value`) and `--workdir`; with
    `multi_host`, `--distributed` or `--coordinator_address` / `--num_processes` /
    `--process_id` start `jax.distributed` before anything touches a device.
    `command(config, workdir)` prints its result and returns the exit status; an exception of
    `errors`, or a full disk (`checkpoints.DiskSpaceError`), is printed as `error: ...` with
    status 2."""
    config_flag = config_flags.DEFINE_config_file(
        "config", os.path.join(CONFIGS_DIR, default_config), "ml_collections config file",
        lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", None, workdir_help, required=workdir_required)
    cache_flag = flags.DEFINE_string(
        "compilation_cache_dir", DEFAULT_COMPILATION_CACHE,
        "JAX's persistent compilation cache: a re-run, a resumed run or another run of the same "
        "shapes loads its programs instead of compiling them again ('' turns it off; the "
        "JAX_COMPILATION_CACHE_DIR environment variable, when set, wins)")
    if multi_host:
        distributed = flags.DEFINE_bool(
            "distributed", False, "multi-host: jax.distributed.initialize() with the cluster "
            "auto-detected (Cloud TPU pod slices, SLURM); see --coordinator_address otherwise")
        coordinator = flags.DEFINE_string(
            "coordinator_address", None, "multi-host by hand: host:port of process 0's "
            "coordinator (with --num_processes and --process_id)")
        num_processes = flags.DEFINE_integer("num_processes", None, "with --coordinator_address")
        process_id = flags.DEFINE_integer("process_id", None, "with --coordinator_address")

    def run(_) -> int:
        setup_logging()
        enable_compilation_cache(cache_flag.value)
        if multi_host and coordinator.value:
            if num_processes.value is None or process_id.value is None:
                print("error: --coordinator_address needs --num_processes and --process_id",
                      file=sys.stderr)
                return 2
            jax.distributed.initialize(coordinator_address=coordinator.value,
                                       num_processes=num_processes.value,
                                       process_id=process_id.value)
        elif multi_host and distributed.value:
            jax.distributed.initialize()
        try:
            return command(config_flag.value, workdir_flag.value)
        except (*errors, checkpoints.DiskSpaceError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    app.run(lambda a: sys.exit(run(a)), argv=argv)
