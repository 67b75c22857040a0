"""Trains or evaluates a pan_jax model.

    python -m pan_jax.main --config=configs/voc.py --workdir=DIR [--mode=eval]

Any field of the config can be set on the command line, e.g. --config.batch_size=8,
--config.model.overrides.output_stride=8, --config.data.data_dir=gs://BUCKET/tfds (the fields
and their meaning: configs/default.py). A config file may take an argument after a colon:
--config=configs/voc_ablation.py:fpa_c333_ave. Re-running the same command resumes from the
workdir; --mode=eval scores its latest checkpoint (or --step) with config.eval's protocol.
"""

# Kept thin on purpose: the work is in `train.train_and_evaluate` and `evaluate.evaluate`, which
# tests and notebooks call directly.

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from pan_jax import config_errors, logs

FLAGS = flags.FLAGS
try:  # ml_collections reads the command line (flag files too) already here, for the overrides
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
except (flags.Error, OSError) as error:
    sys.exit(f"FATAL Flags parsing error: {error}")
config_errors.watch_config_flag(FLAGS)
flags.DEFINE_string(
    "workdir", None, "Run directory (local or gs://); default runs/<config name>[_<ROW>]."
)
flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train (with periodic eval) or evaluate.")
flags.DEFINE_integer("step", None, "With --mode=eval: the checkpoint step (default: latest).")
flags.mark_flags_as_required(["config"])


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a failing config file or override reported in one line."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.get("model")  # a file that failed to load gives a stand-in raising on use
        return remaining
    except Exception as error:  # whatever the user's config file raises
        try:
            arguments = FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
        except flags.Error:
            arguments = argv[1:]
        message = config_errors.describe(error, arguments) or str(error)
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
    sys.stderr.write("Pass --helpshort or --helpfull to see help on flags.\n")
    sys.exit(1)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
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
    # `~` expanded here: the shell leaves it in --workdir=~/runs/voc (a word, not an assignment)
    workdir = os.path.expanduser(FLAGS.workdir or checkpointing.default_workdir(config_argument))
    try:  # before anything is written into the workdir
        if FLAGS.step is not None and FLAGS.mode != "eval":  # not a step to resume from
            raise ValueError(
                f"--step={FLAGS.step} is for --mode=eval: training resumes from the workdir's "
                "latest checkpoint"
            )
        if os.path.isfile(workdir):
            raise ValueError(f"--workdir={workdir} is a file: expected a directory")
        if FLAGS.mode == "eval":
            checkpointing.directory_kind(workdir, FLAGS.step)
        else:  # eval may read a run it cannot write into (it logs its figures before the report)
            checkpointing.check_writable_directory(workdir, "--workdir")
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    cache_dir = compile_cache.enable(workdir, FLAGS.config.get("compilation_cache", True))
    logging.info(
        "process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    logging.info("workdir: %s, compilation cache: %s", workdir, cache_dir or "off")
    from pan_jax import evaluate, train
    from pan_jax.convert.core import ConversionError
    from pan_jax.convert.download import DownloadError
    from pan_jax.data.pipeline import CorruptRecordError
    from pan_jax.data.voc_aug import VocAugError

    try:  # a bad config value, weights out of reach or that do not fit, a refused workdir, an
        # unreadable checkpoint, archive or record, a diverged run: one line, which names what
        # and where
        if FLAGS.mode == "train":
            train.train_and_evaluate(FLAGS.config, workdir)
        else:
            evaluate.evaluate(FLAGS.config, workdir, step=FLAGS.step)
    except (
        config_errors.ConfigError,
        DownloadError,
        ConversionError,
        checkpointing.CheckpointMismatchError,
        checkpointing.CheckpointDamagedError,
        checkpointing.WorkdirInUseError,
        CorruptRecordError,
        VocAugError,
        train.NonFiniteLossError,
        sharding.OtherProcessError,
        evaluate.ReportWriteError,
    ) as error:  # orbax's abandoned reads of a failed restore are quieted by checkpointing
        sys.exit(f"error: {error}")
    if cache_dir:
        logging.info(compile_cache.summary())


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
