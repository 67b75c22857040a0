"""Compiling the train step in a thread while a run starts.

XLA:GPU took about a minute to compile the ResNet-101 train step on an H200. A run need not
wait for that before it initialises or restores its state, loads pretrained weights and starts
its input pipeline: `CompileAhead` compiles the jitted step from shape-dtype structs meanwhile,
and jit's first call of the same signature reuses the executable (`launch/bench_gpu.sh` checks
that the GPU's jax does).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Callable
from typing import Any

from absl import logging


class CompileAhead:
    """Compiles the train step in a thread while the state is initialised or restored and the
    input pipeline starts; jit's first call of the same signature then reuses the executable.

    `args` are shape-dtype structs with the shardings of the arrays the loop will pass. A step
    traced under other thread-local JAX settings (e.g. a caller's `jax.default_matmul_precision`
    context, which the thread does not inherit) would compile again: then nothing is compiled
    ahead. Leaving the block waits for the compile, which XLA cannot stop; after an error it
    logs the error first, and Ctrl-C while it waits exits the process at once.
    """

    def __init__(self, step_fn: Callable, *args: Any) -> None:
        self._context = _trace_context()
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="compile_ahead")
        self._future = executor.submit(self._compile, step_fn, args)
        executor.shutdown(wait=False)

    def _compile(self, step_fn: Callable, args: tuple) -> bool:
        if _trace_context() != self._context:
            return False
        step_fn.lower(*args).compile()  # no compiler options: jit's own call must match it
        return True

    def __enter__(self) -> CompileAhead:
        return self

    def __exit__(self, error_type: type | None, error: BaseException | None, *_: Any) -> None:
        if error_type is not None:
            if not self._future.done():  # say what went wrong now, not after the compile
                logging.error("%s: %s", error_type.__name__, error)
                logging.warning(
                    "waiting for XLA's compilation of the train step to end before exiting (it "
                    "cannot be stopped; Ctrl-C exits at once)"
                )
                try:
                    concurrent.futures.wait([self._future])
                except KeyboardInterrupt:  # Python's own exit would wait for the thread again
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(130)
            return
        if not self._future.done():
            logging.info("waiting for the train step's compilation ...")
        try:
            if not self._future.result():
                logging.info("train step not compiled ahead: the caller's JAX settings differ")
        except Exception as failure:  # the first step compiles it again, and raises the error
            logging.warning(
                "compiling the train step ahead failed: %s: %s",
                type(failure).__name__,
                str(failure)[:500],
            )


def _trace_context() -> Any:
    """JAX's thread-local settings that key its trace cache (private; None where absent)."""
    from jax._src import config as jax_config

    trace_context = getattr(jax_config, "trace_context", None)
    return trace_context() if trace_context else None
