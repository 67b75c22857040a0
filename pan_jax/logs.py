"""The command-line tools' log: their own lines, not their libraries' INFO chatter."""

import logging as std_logging

from absl import logging


class _QuietLibraries(std_logging.Filter):
    """Drops orbax's, grain's and jax's INFO records (one per checkpoint read or save, e.g.
    "Closing _NonBlockingMetadataStore(...)"); their warnings and errors pass."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
        return record.levelno >= std_logging.WARNING or not noisy


def quiet_libraries() -> None:
    """Filters absl's log handler (call once in a tool's main)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())
