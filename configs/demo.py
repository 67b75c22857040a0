"""A few minutes on a laptop CPU, no download: a small PAN on the embedded synthetic dataset."""

from configs import default
from pan_jax.data.pipeline import default_data_config


def get_config():
    config = default.get_config()
    config.model.name = "pan"
    config.model.backbone = "resnet18"
    config.model.dtype = "float32"  # bf16 is slow on CPUs
    config.model.overrides.decoder_channels = 64
    config.model.overrides.pyramid_features = 64
    config.data = default_data_config("pan_synthetic")
    config.batch_size = 8
    config.num_train_steps = 600
    config.learning_rate = 0.02
    config.warmup_steps = 50
    config.log_every_steps = 50
    config.checkpoint_every_steps = 200
    config.eval_every_steps = 300
    return config
