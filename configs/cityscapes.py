"""PAN-ResNet101 on Cityscapes fine (2,975 train images, 19 trainIds), crop 768.

40k steps at batch 16 (≈215 epochs, the same number of images as mmsegmentation's 80k at batch 8).
Evaluation on the fine validation split at 1024×2048 with sliding 768 windows, stride 512.
"""

from configs import default
from pan_jax.data.pipeline import default_data_config


def get_config():
    config = default.get_config()
    config.data = default_data_config("cityscapes")
    config.num_train_steps = 40_000
    config.eval_every_steps = 10_000
    config.eval.mode = "slide"
    config.eval.crop_size = 768
    config.eval.stride = 512
    return config
