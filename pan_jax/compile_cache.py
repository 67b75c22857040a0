"""XLA's persistent compilation cache, kept in the run's workdir.

A resumed, requeued or re-evaluated run loads its compiled programs instead of compiling them
again: the ResNet-101 train step takes about a minute to compile on an H200 and every image size
of an evaluation a few seconds (docs/benchmarks.md), paid again after every preemption. JAX
writes entries from process 0 only (on GPUs they serve every process and every local device) and
treats an unreadable entry as a miss. JAX writes an entry without a temporary file or fsync, so a
host that stops while writing (a preempted VM) can leave it empty or cut short, and JAX never
writes an existing entry again: it would compile and warn on every later start. `enable` removes
such entries from the workdir's cache before anything is compiled, so the run that compiles the
program writes it anew (a cache of the user's own, shared by other jobs, or in a bucket, is
left as it is). That check reads the whole cache once per start: 27 ms for the 2.3 MB of six
PAN programs on a 2-core CPU, about 1 s per 100 MB, against minutes of compiling it can save.
The cache key holds the program, the XLA flags, jax's version, the device kind and the cache's
absolute path, so a workdir moved to another place or accelerator compiles afresh.
`JAX_COMPILATION_CACHE_DIR`, when set, wins (empty: off).
"""

from __future__ import annotations

import os
import pathlib
import threading

import jax
from absl import logging

from pan_jax import checkpointing

DIRECTORY_NAME = "compilation_cache"
ENV_VAR = "JAX_COMPILATION_CACHE_DIR"

_lock = threading.Lock()
_stats = {"hits": 0, "seconds_saved": 0.0}
_listening = False


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _stats["hits"] += 1


def _on_duration(event: str, seconds: float, **kwargs) -> None:
    if event == "/jax/compilation_cache/compile_time_saved_sec":
        with _lock:
            _stats["seconds_saved"] += seconds


def enable(workdir: str | os.PathLike, enabled: bool = True) -> str | None:
    """Turns the cache on in `workdir/compilation_cache` (before anything is compiled).

    Returns the directory in use, or None when the cache is off (`enabled=False`, or
    `JAX_COMPILATION_CACHE_DIR` set empty). Starts counting the programs loaded from it.
    """
    global _listening
    if ENV_VAR in os.environ:  # jax read it at import: the user's choice
        directory = os.environ[ENV_VAR] or None
    elif enabled:
        # Absolute: jax puts the directory into the compile options its keys hash (XLA's
        # autotune cache lives there), so `runs/x` and `/home/me/runs/x` would miss each other.
        directory = os.fspath(checkpointing.absolute_path(workdir) / DIRECTORY_NAME)
        jax.config.update("jax_compilation_cache_dir", directory)
        # Process 0 is the only one that writes entries. An object store (gs://) never holds
        # a partly written object.
        if jax.process_index() == 0 and "://" not in directory:
            _remove_unreadable_entries(directory)
    else:
        directory = None
    if directory and not _listening:
        jax.monitoring.register_event_listener(_on_event)
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True
    return directory


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # RFC 8878; a zlib stream starts with 0x78 instead


def _remove_unreadable_entries(directory: str) -> list[str]:
    """Deletes the entries of this jax's format (or empty) that do not decompress; returns
    their names."""
    try:  # jax's own reader of an entry's bytes (zstd or zlib, whichever wrote it)
        from jax._src.compilation_cache import compress_executable, decompress_executable

        probe = compress_executable(b"probe")
        usable = decompress_executable(probe) == b"probe"
    except Exception:  # ImportError, or a changed signature
        usable = False
    if not usable:  # a jax that moved or changed them: leave the cache as it is
        return []
    # jax compresses with zstd where Python has it, else zlib: another environment sharing
    # the workdir (an evaluation, a notebook) may have written whole entries this one cannot
    # read. Only an entry in this jax's own format can be judged cut short.
    magic = probe[:4] if probe.startswith(_ZSTD_MAGIC) else probe[:1]
    removed = []
    for path in sorted(pathlib.Path(directory).glob("*-cache")):
        try:
            data = path.read_bytes()
            if data and not (data.startswith(magic) or magic.startswith(data)):  # or cut in it
                continue
            decompress_executable(data)
        except FileNotFoundError:  # evicted meanwhile
            continue
        except OSError as error:  # unreadable to this process: not ours to judge
            logging.warning("Compilation cache entry %s not checked: %s", path, error)
        except Exception:  # zlib.error, zstd's errors: a cut-short entry
            try:
                path.unlink(missing_ok=True)
                removed.append(path.name)
            except OSError as error:  # a read-only workdir: jax will warn and compile
                logging.warning("Cannot remove the unreadable cache entry %s: %s", path, error)
    if removed:
        logging.warning(
            "Removed %d unreadable entries from the compilation cache %s (written by a run that "
            "stopped while writing them); they are compiled and written again: %s",
            len(removed),
            directory,
            ", ".join(removed),
        )
    return removed


def summary() -> str:
    """'N programs loaded from the compilation cache (S s of compiling saved)'."""
    with _lock:
        hits, saved = _stats["hits"], max(_stats["seconds_saved"], 0.0)
    return f"{hits} programs loaded from the compilation cache ({saved:.1f} s of compiling saved)"
