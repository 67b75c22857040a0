"""Entry point: `python -m pan_jax.main --config=configs/voc.py --workdir=DIR [--mode=eval]`.

Kept thin on purpose: the work is in `train.train_and_evaluate` and `evaluate.evaluate`, which
tests and notebooks call directly. Re-running the same command resumes from the workdir.
"""

import logging as std_logging

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
    app.run(main)
