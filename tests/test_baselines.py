"""The paper's Table 2 baselines equal the reference implementations they are named after:
`aspp` torchvision's DeepLabV3, `psp` mmsegmentation's PSPNet (the original's head)."""

import jax
import numpy as np
import pytest
import torch
import torchvision

from pan_jax import models
from pan_jax.convert.core import torch_to_flax
from pan_jax.convert.imagenet import resnet_rules
from tests.helpers import allow_mmseg_import, randomize_statistics

# torchvision's DeepLabV3: `backbone.` a ResNet, `classifier.` DeepLabHead(ASPP, 3×3 ConvBN, 1×1).
DEEPLABV3_RULES = (
    *resnet_rules("torchvision", avg_down=False, torch_prefix="backbone.", flax_prefix="backbone/"),
    ("classifier.0.convs.4.1", "decoder/image_pool/conv"),  # AdaptiveAvgPool2d, conv, bn, relu
    ("classifier.0.convs.4.2", "decoder/image_pool/bn"),
    ("classifier.0.convs.{N}.0", "decoder/aspp{N}/conv"),
    ("classifier.0.convs.{N}.1", "decoder/aspp{N}/bn"),
    ("classifier.0.project.0", "decoder/project/conv"),
    ("classifier.0.project.1", "decoder/project/bn"),
    ("classifier.1", "decoder/head_conv/conv"),
    ("classifier.2", "decoder/head_conv/bn"),
    ("classifier.4", "head"),
)


# mmseg's PSPNet: ResNetV1c (deep stem `stem.{0,1,3,4,6,7}`, torchvision block names) + PSPHead.
MMSEG_PSPNET_RULES = (
    ("backbone.stem.0", "backbone/stem_conv0"),
    ("backbone.stem.1", "backbone/stem_bn0"),
    ("backbone.stem.3", "backbone/stem_conv1"),
    ("backbone.stem.4", "backbone/stem_bn1"),
    ("backbone.stem.6", "backbone/stem_conv2"),
    ("backbone.stem.7", "backbone/stem_bn2"),
    # The blocks' rules, without those of torchvision's stem (conv1, bn1), which come first.
    *resnet_rules("torchvision", False, torch_prefix="backbone.", flax_prefix="backbone/")[2:],
    ("decode_head.psp_modules.0.1.{M}", "decoder/pool1/{M}"),  # Sequential(pool, ConvModule)
    ("decode_head.psp_modules.1.1.{M}", "decoder/pool2/{M}"),
    ("decode_head.psp_modules.2.1.{M}", "decoder/pool3/{M}"),
    ("decode_head.psp_modules.3.1.{M}", "decoder/pool6/{M}"),
    ("decode_head.bottleneck.{M}", "decoder/bottleneck/{M}"),
    ("decode_head.conv_seg", "head"),
)


def assert_same_logits(model, variables, reference, sizes):
    template = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(np.shape, template)
    rng = np.random.default_rng(0)
    for height, width in sizes:
        images = rng.normal(size=(2, height, width, 3)).astype(np.float32)
        with torch.no_grad():
            expected = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
        expected = expected.permute(0, 2, 3, 1).numpy()
        ours = np.asarray(model.apply(variables, images))
        assert ours.shape == expected.shape
        error = np.max(np.abs(ours - expected)) / np.max(np.abs(expected))
        assert error < 1e-4, (height, width, error)


def test_aspp_equals_torchvision_deeplabv3():
    """`aspp` on torchvision's ResNet-50 at output stride 8 is `deeplabv3_resnet50`: rates
    (6, 12, 18) double to torchvision's (12, 24, 36), and the logits match at sizes that are
    not multiples of the stride, down to a 1×1 top feature map."""
    torch.manual_seed(0)
    reference = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=False
    )
    model = models.create(
        "aspp",
        num_classes=5,
        backbone="resnet50",
        stem="torchvision",
        output_stride=8,
        align_corners=False,
    )
    randomize_statistics(reference)
    variables, unexpected = torch_to_flax(reference.state_dict(), DEEPLABV3_RULES)
    assert not unexpected
    assert model.min_input_size == 8
    assert_same_logits(model, variables, lambda x: reference(x)["out"], [(72, 88), (8, 13)])


def mmseg_pspnet(stem_channels: int, output_stride: int, align_corners: bool) -> torch.nn.Module:
    """mmseg's configs/_base_/models/pspnet_r50-d8.py without its auxiliary head (which only
    trains), plain BN for SyncBN, at output stride 8 or 16. Imported here: mmseg takes seconds."""
    allow_mmseg_import()
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    strides, dilations = {8: ((1, 2, 1, 1), (1, 1, 2, 4)), 16: ((1, 2, 2, 1), (1, 1, 1, 2))}[
        output_stride
    ]
    norm = dict(type="BN", requires_grad=True)
    backbone = dict(
        type="ResNetV1c",
        depth=50,
        stem_channels=stem_channels,
        dilations=dilations,
        strides=strides,
        norm_cfg=norm,
        contract_dilation=True,
    )
    head = dict(
        type="PSPHead",
        in_channels=2048,
        in_index=3,
        channels=512,
        pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.1,
        num_classes=5,
        norm_cfg=norm,
        align_corners=align_corners,
        loss_decode=dict(type="CrossEntropyLoss"),
    )
    return MODELS.build(
        dict(
            type="EncoderDecoder", backbone=backbone, decode_head=head, test_cfg=dict(mode="whole")
        )
    )


@pytest.mark.parametrize(
    "overrides, stem_channels, output_stride, sizes",
    [
        ({}, 128, 16, [(72, 88), (16, 29)]),  # the preset (deep64 stem), a 1×2 top map
        (dict(stem="deep32", output_stride=8, align_corners=False), 64, 8, [(72, 88), (8, 13)]),
    ],
    ids=["psp_preset", "mmseg_pspnet_r50_d8"],
)
def test_psp_equals_mmsegmentation_pspnet(overrides, stem_channels, output_stride, sizes):
    """`psp` on ResNet-50 is mmseg's PSPNet (its PSPHead is the original's: 512-wide branches
    with BN, also on the 1-bin branch; concat with layer4; 3×3 bottleneck; 1×1 classifier), in
    our preset and in mmseg's own pspnet_r50-d8 configuration."""
    align_corners = overrides.get("align_corners", True)
    torch.manual_seed(0)
    reference = randomize_statistics(mmseg_pspnet(stem_channels, output_stride, align_corners))
    model = models.create("psp", num_classes=5, backbone="resnet50", **overrides)
    variables, unexpected = torch_to_flax(reference.state_dict(), MMSEG_PSPNET_RULES)
    assert not unexpected

    def logits(x):  # mmseg's inference logits: decode, then resize to the image
        return reference.encode_decode(x, [dict(img_shape=x.shape[2:])] * len(x))

    assert_same_logits(model, variables, logits, sizes)


@pytest.mark.parametrize("name", ["psp", "aspp"])
def test_dropout_acts_in_training_and_not_at_rate_0(name):
    # Without their dropout layers (PSPNet's before the classifier, ASPP's after the projection)
    # both baselines trained without dropout, and the logit comparisons above (eval mode) passed.
    images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    for overrides, dropout in (({}, True), ({"dropout_rate": 0.0}, False)):
        model = models.create(name, num_classes=3, backbone="resnet18", **overrides)
        variables = models.random_variables(model)
        logits = [
            model.apply(
                variables, images, train=True, rngs={"dropout": jax.random.key(seed)}, mutable=True
            )[0]
            for seed in (0, 1)
        ]
        assert (float(np.max(np.abs(logits[0] - logits[1]))) > 1e-3) == dropout, overrides
