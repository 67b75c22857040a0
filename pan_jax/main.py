"""Entry point: `python -m pan_jax.main --config=configs/voc.py --workdir=DIR [--mode=eval]`.

Kept thin on purpose: the work is in `train.train_and_evaluate` and `evaluate.evaluate`, which
tests and notebooks call directly. Re-running the same command resumes from the workdir.
"""

import logging as std_logging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local or gs://); default runs/<config name>.")
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (with periodic eval) or evaluate.")
flags.DEFINE_integer("step", None, "With --mode=eval: the checkpoint step (default: latest).")
flags.mark_flags_as_required(["config"])


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's and grain's per-save INFO chatter out of the training log."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/grain/", "/jax/_src/"))
        return record.levelno >= std_logging.WARNING or not noisy


def _config_error(argv: list[str], error: Exception) -> str:
    """One line saying what is wrong with the --config file or a --config.* override.

    ml_collections raises plain Python errors from loading the file and applying overrides,
    which absl would print as a traceback through its own internals.
    """
    path = _config_argument(argv)
    if not os.path.isfile(path.split(":", 1)[0]):
        return f"--config={path}: no such file"
    if isinstance(error, SyntaxError):
        return f"--config={path}: {error.msg} at {error.filename}:{error.lineno}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return f"--config={path}: the file defines no get_config()"
    if "Error whilst parsing config file" in str(error):  # the text of a traceback
        lines = str(error).strip().splitlines()
        frames = re.findall(r'File "([^"]+)", line (\d+)', str(error))
        where = f" (at {frames[-1][0]}:{frames[-1][1]})" if frames else ""
        return f"--config={path}: {lines[-1]}{where}"
    if isinstance(error, AttributeError):  # an override naming no field (a KeyError's text)
        text = str(error).replace("\\", "")
        overrides = [arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
        for override in overrides:
            field = next((part for part in override.split(".")[1:] if f"'{part}'" in text), None)
            if field:
                suggestion = re.search(r'Did you mean "([^"]+)"', text)
                hint = f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""
                return f"{override}: the config has no field {field!r}{hint}"
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"--config={path}: {type(error).__name__}: {error} (at {frame.filename}:{frame.lineno})"


def _config_argument(argv: list[str]) -> str:
    for index, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and index + 1 < len(argv):
            return argv[index + 1]
    return "?"


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a failing config file or override reported in one line."""
    # Config files import their siblings (`from configs import default`): make that work from
    # any directory, not only the repository root.
    folder = os.path.dirname(os.path.abspath(_config_argument(argv).split(":", 1)[0]))
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        sys.path.insert(0, os.path.dirname(folder))
    try:
        remaining = FLAGS(argv)
        FLAGS.config.get("model")  # a file that failed to load gives a stand-in raising on use
        return remaining
    except flags.Error as error:
        wrapped = error.__context__  # ml_collections' TypeError/ValueError carrying a traceback
        if wrapped is not None and "Error whilst parsing config file" in str(wrapped):
            message = _config_error(argv, wrapped)
        else:
            message = str(error)
    except Exception as error:  # whatever the user's config file raises
        message = _config_error(argv, error)
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:  # keep TensorFlow (tfds builds datasets with it) off the accelerators
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    except ImportError:
        pass

    from pan_jax import sharding

    sharding.initialize_distributed()
    import jax

    from pan_jax import checkpointing, compile_cache

    config_argument = config_flags.get_config_filename(FLAGS["config"])
    workdir = FLAGS.workdir or checkpointing.default_workdir(config_argument)
    try:  # before anything is written into the workdir
        if os.path.isfile(workdir):
            raise ValueError(f"--workdir={workdir} is a file: expected a directory")
        if FLAGS.mode == "eval":
            checkpointing.directory_kind(workdir, FLAGS.step)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    cache_dir = compile_cache.enable(workdir, FLAGS.config.get("compilation_cache", True))
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    logging.info("workdir: %s, compilation cache: %s", workdir, cache_dir or "off")
    if FLAGS.mode == "train":
        from pan_jax import train

        train.train_and_evaluate(FLAGS.config, workdir)
    else:
        from pan_jax import evaluate

        evaluate.evaluate(FLAGS.config, workdir, step=FLAGS.step)
    if cache_dir:
        logging.info(compile_cache.summary())


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
