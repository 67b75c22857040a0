"""pan_smp reproduces segmentation_models_pytorch's PAN logits from SMP's weights."""

import jax
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from pan_jax import convert, models


def randomized_smp_pan(encoder: str, classes: int = 21, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = smp.PAN(encoder_name=encoder, encoder_weights=None, classes=classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
            elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
    return model.eval()


def relative_max_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@pytest.mark.parametrize(
    "encoder, shapes",
    [("resnet101", [(256, 256), (192, 320)]), ("resnet34", [(128, 128), (160, 224)])],
)
def test_logits_equal_smp(encoder, shapes):
    torch_model = randomized_smp_pan(encoder)
    variables = convert.from_smp(torch_model.state_dict())
    model = models.create("pan_smp", num_classes=21, backbone=encoder)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    rng = np.random.default_rng(0)
    for height, width in shapes:
        images = rng.standard_normal((2, height, width, 3)).astype(np.float32)
        with torch.no_grad():
            reference = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(
                0, 2, 3, 1
            )
        ours = np.asarray(apply(variables, images))
        assert ours.shape == (2, height, width, 21)
        assert relative_max_error(ours, reference.numpy()) < 1e-4


def test_parameter_count_equals_smp():
    torch_model = smp.PAN(encoder_name="resnet101", encoder_weights=None, classes=21)
    expected = sum(p.numel() for p in torch_model.parameters())
    assert expected == 43_257_724
    model = models.create("pan_smp", num_classes=21, backbone="resnet101")
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3), np.float32))
    )
    assert models.parameter_count(shapes["params"]) == expected


@pytest.mark.parametrize("encoder", ["resnet18", "resnet101"])
def test_round_trip_through_smp_is_exact(encoder):
    torch_model = randomized_smp_pan(encoder, classes=5, seed=1)
    state_dict = {k: v.clone() for k, v in torch_model.state_dict().items()}
    back = convert.to_smp(convert.from_smp(state_dict))
    assert set(back) == set(state_dict)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    torch_model.load_state_dict(back, strict=True)  # what SMP accepts, names and shapes


def test_pan_jax_weights_give_smp_the_same_logits():
    """The other direction: weights made here (not by SMP) run in SMP give our logits."""
    model = models.create("pan_smp", num_classes=3, backbone="resnet18", decoder_channels=16)
    template = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3), np.float32))
    )
    rng = np.random.default_rng(2)

    def draw(path, leaf):  # BN statistics must be valid; everything else just random
        name = path[-1].key
        low, high = (0.5, 1.5) if name in ("var", "scale") else (-0.2, 0.2)
        return rng.uniform(low, high, leaf.shape).astype(np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, template)
    torch_model = smp.PAN(
        encoder_name="resnet18", encoder_weights=None, classes=3, decoder_channels=16
    )
    torch_model.load_state_dict(convert.to_smp(variables), strict=True)
    images = rng.standard_normal((1, 128, 160, 3)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model.eval()(torch.from_numpy(images).permute(0, 3, 1, 2))
    ours = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images))
    assert relative_max_error(ours, reference.permute(0, 2, 3, 1).numpy()) < 1e-4


def test_conversion_errors_name_the_keys():
    state_dict = randomized_smp_pan("resnet18").state_dict()
    broken = dict(state_dict)
    del broken["decoder.gau1.conv2.conv.weight"]
    broken["decoder.extra.weight"] = torch.zeros(3)
    broken["decoder.fpa.mid.0.bn.running_var"] = torch.ones(7)
    with pytest.raises(convert.ConversionError) as error:
        convert.from_smp(broken)
    message = str(error.value)
    assert "decoder/gau1/low/conv/kernel" in message  # missing
    assert "decoder.extra.weight" in message  # unexpected
    assert "decoder/fpa/mid/bn/var" in message and "(7,)" in message  # shape mismatch
    with pytest.raises(convert.ConversionError, match=r"segmentation_head\.0\.weight"):
        convert.from_smp({"encoder.conv1.weight": torch.zeros(1)})
