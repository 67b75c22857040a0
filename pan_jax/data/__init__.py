"""Datasets and the grain input pipeline.

Importing this package registers the tfds builders `voc_aug` and `pan_synthetic`; Cityscapes
uses tfds' own `cityscapes/semantic_segmentation` with ids mapped to trainIds in the pipeline.
"""

from pan_jax.data import cityscapes, synthetic, voc_aug
from pan_jax.data.cityscapes import cityscapes_label_id_lut, cityscapes_train_id_lut
from pan_jax.data.pipeline import (
    IGNORE_LABEL,
    CorruptRecordError,
    class_names,
    default_data_config,
    eval_dataset,
    load_source,
    num_examples,
    prepare,
    train_batch_spec,
    train_dataset,
)
from pan_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize

__all__ = [
    "IGNORE_LABEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CorruptRecordError",
    "cityscapes",
    "cityscapes_label_id_lut",
    "cityscapes_train_id_lut",
    "class_names",
    "default_data_config",
    "eval_dataset",
    "load_source",
    "normalize",
    "num_examples",
    "prepare",
    "synthetic",
    "train_batch_spec",
    "train_dataset",
    "voc_aug",
]
