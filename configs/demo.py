"""Minutes on a laptop CPU, no download: a small PAN on the embedded synthetic dataset.

PAN as in the paper (FPA C357 + AVE + GP, GAU 3×3 with a ReLU gate) on a ResNet-18 with the 7×7
stem (the deep stem doubles the cost at 128 px), 64 decoder channels, from scratch (no download;
`--config.model.pretrained=imagenet` starts from torchvision's ImageNet ResNet-18 instead).
"""

from configs import default
from pan_jax.data.pipeline import default_data_config


def get_config():
    config = default.get_config()
    config.model.name = "pan"
    config.model.backbone = "resnet18"
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.model.overrides.stem = "torchvision"
    config.model.overrides.decoder_channels = 64
    config.model.overrides.pyramid_features = 64
    config.model.pretrained = ""
    config.data = default_data_config("pan_synthetic")
    config.batch_size = 8
    config.num_train_steps = 400
    config.learning_rate = 0.05
    config.warmup_steps = 50
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 200
    return config
