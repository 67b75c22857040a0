"""Defaults shared by every config: the paper's training protocol (PAN, Li et al. 2018, §4).

Any field can be overridden on the command line, e.g. `--config.batch_size=8`.
"""

import ml_collections
from ml_collections import config_dict

from pan_jax import models
from pan_jax.data.pipeline import default_data_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    config.model.name = "pan"  # see pan_jax.models: pan, pan_smp, fcn, fpa, gau, psp, aspp
    config.model.backbone = "resnet101"
    config.model.dtype = "bfloat16"  # compute dtype; parameters and BN statistics stay float32
    # Any models.create keyword: all declared (None = the model's default), so the command line
    # can set any, e.g. --config.model.overrides.output_stride=8.
    config.model.overrides = ml_collections.ConfigDict(
        {k: config_dict.placeholder(t) for k, t in models.OVERRIDE_TYPES.items()}
    )
    # "imagenet" (the backbone variant's ImageNet weights from the Hugging Face Hub, downloaded
    # once into ~/.cache/pan_jax/weights), a weights file, "hf-hub:OWNER/REPO", a URL, or a
    # pan_jax model directory or workdir; "" = from scratch.
    config.model.pretrained = "imagenet"
    config.model.pretrained_kind = "timm"  # torchvision | timm | smp | pan_jax

    config.data = default_data_config("voc_aug")

    # The paper: batch 16, SGD momentum 0.9, weight decay 1e-4, poly power 0.9 from 4e-3.
    config.batch_size = 16  # global, over all devices and processes
    config.grad_accum_steps = 1
    config.num_train_steps = 30_000
    config.learning_rate = 4e-3
    config.warmup_steps = 0
    config.poly_power = 0.9
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.decay_bn_and_bias = True  # PyTorch's SGD decays every parameter
    config.decoder_lr_multiplier = 1.0

    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    config.eval_every_steps = 5000  # 0 = only with --mode=eval
    config.log_batch_digests = False  # log a hash of every batch (tests of exact resume)
    # XLA's persistent cache in WORKDIR/compilation_cache: a resumed run loads its compiled
    # programs (JAX_COMPILATION_CACHE_DIR, when set, wins; see pan_jax/compile_cache.py).
    config.compilation_cache = True
    # > 0: a jax.profiler trace of that many steps after the first (TensorBoard's profile tab),
    # summarized in the log: time by kind of XLA op and Flax module, device busy vs wall time.
    config.profile_steps = 0

    # Evaluation protocol (--mode=eval): the paper's final numbers use multi-scale + flip. The
    # periodic evaluation during training uses mode, crop and stride, single-scale without flip.
    config.eval = ml_collections.ConfigDict()
    config.eval.mode = "whole"  # whole | slide
    config.eval.scales = (1.0,)
    config.eval.flip = False
    config.eval.crop_size = 512  # slide mode only
    config.eval.stride = 341  # slide mode only
    config.eval.pad_multiple = 128  # whole mode: pad H, W up to a multiple (bounds compilations)
    # The paper's mIoU (%) for this setting, shown next to ours in the eval report
    # (configs/voc_ablation.py sets it for each table row).
    config.paper_miou_percent = config_dict.placeholder(float)
    # Locked: a misspelt field in a config file built on this one (`config.batch_sze = 4`) is
    # an error naming the field, not a new field nothing reads. `with config.unlocked():` adds.
    config.lock()
    return config
