"""PAN-ResNet101 on PASCAL VOC 2012 + SBD (train_aug, 10,582 images), the paper's protocol.

Crop 512, batch 16, poly 0.9 from 4e-3, SGD momentum 0.9, weight decay 1e-4, random flip and
scale 0.5–2.0 (paper §4). The paper gives no iteration count: 30k steps (≈45 epochs of
train_aug) is what TF Model Garden's DeepLab VOC configs use; mmsegmentation uses 20k/40k at the
same batch. Starts from ImageNet weights with the paper's 64-64-128 deep stem (timm's
`resnet101s.gluon_in1k`, downloaded once; see configs/default.py).
Final numbers (multi-scale + flip): `--mode=eval --config.eval.flip=True
--config.eval.scales='(0.5,0.75,1.0,1.25,1.5,1.75)'`.
"""

from configs import default


def get_config():
    config = default.get_config()
    return config
