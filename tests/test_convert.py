"""ImageNet ResNets from torchvision/timm files give PyTorch's features; pretrained loading; CLI.

Every checkpoint is a randomly initialised PyTorch model with randomised BatchNorm statistics,
written to a file in its library's usual format, so that a wrong transpose, a BN tensor in the
wrong place or a wrong stride/dilation/padding shows as a feature mismatch.
"""

import logging as std_logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.torch
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from flax import traverse_util

from pan_jax import checkpointing, convert, inference, models
from pan_jax.convert import cli
from pan_jax.convert.imagenet import convert_resnet
from pan_jax.models.resnet import ResNet

# Odd sizes at strides 4 to 32 (25×35, 13×18, 7×9, 4×5): ceil-mode pooling and padding matter.
HEIGHT, WIDTH = 100, 140
TOLERANCE = 1e-4  # relative max error, float32

ARCHS = {
    "resnet18": {"depth": 18, "stem": "torchvision", "avg_down": False},
    "resnet50": {"depth": 50, "stem": "torchvision", "avg_down": False},
    "resnet50c": {"depth": 50, "stem": "deep32", "avg_down": False},
    "resnet50s": {"depth": 50, "stem": "deep64", "avg_down": False},
    "resnet18d": {"depth": 18, "stem": "deep32", "avg_down": True},
    "resnet101d": {"depth": 101, "stem": "deep32", "avg_down": True},
    "resnet18s": {"depth": 18, "stem": "deep64", "avg_down": False},
}
# (library, file format) per model; the formats each library publishes.
SOURCES = {
    "resnet18": ("torchvision", ".pth"),
    "resnet50": ("torchvision", ".pth"),
    "resnet50c": ("timm", ".safetensors"),
    "resnet50s": ("timm", ".safetensors"),
    "resnet18d": ("timm", ".bin"),
    "resnet101d": ("timm", ".safetensors"),
    "resnet18s": ("timm", ".safetensors"),
}
# timm has no resnet18s; its ResNet builds one (the 64-64-128 stem on a small, fast network).
TIMM_KWARGS = {"resnet18s": dict(model_name="resnet18", stem_width=64, stem_type="deep")}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random BN affine and running statistics: a converter that drops or swaps them fails."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                for tensor, low, high in (
                    (module.weight, 0.5, 1.5),
                    (module.bias, -0.2, 0.2),
                    (module.running_mean, -0.2, 0.2),
                    (module.running_var, 0.5, 1.5),
                ):
                    tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    return model.eval()


def save(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    else:
        torch.save(state_dict, path)
    return path


def torch_model(name: str, output_stride: int = 32) -> torch.nn.Module:
    library, _ = SOURCES[name]
    if library == "torchvision":
        dilate = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}
        return torchvision.models.get_model(
            name, weights=None, replace_stride_with_dilation=dilate[output_stride]
        )
    return timm.create_model(
        **TIMM_KWARGS.get(name, {"model_name": name}),
        pretrained=False,
        features_only=True,
        output_stride=output_stride,
        out_indices=(1, 2, 3, 4),
    )


def torch_features(name: str, state_dict: dict, output_stride: int, images: np.ndarray):
    """layer1..layer4 of the library's own model at `output_stride`, NHWC."""
    model = torch_model(name, output_stride)
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.missing_keys and set(result.unexpected_keys) <= {"fc.weight", "fc.bias"}
    model.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        if SOURCES[name][0] == "torchvision":
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
            outputs = []
            for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
                x = layer(x)
                outputs.append(x)
        else:
            outputs = model(x)
    return [o.permute(0, 2, 3, 1).numpy() for o in outputs]


def jax_features(variables, arch, output_stride, images):
    backbone = ResNet(**arch, output_stride=output_stride, dilation_rule="torchvision")
    return backbone.apply(variables, images, train=False)  # eager: op-by-op beats a compile


def relative_max_error(ours, reference) -> float:
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """name → (file, state dict) of a randomised ImageNet model, made once per module."""
    made = {}

    def make(name: str):
        if name not in made:
            library, suffix = SOURCES[name]
            seed = sorted(SOURCES).index(name)
            torch.manual_seed(seed)
            if library == "torchvision":
                model = torchvision.models.get_model(name, weights=None)
            else:
                model = timm.create_model(**TIMM_KWARGS.get(name, {"model_name": name}))
            state_dict = randomize(model, seed).state_dict()
            path = save(state_dict, tmp_path_factory.mktemp(name) / f"{name}{suffix}")
            made[name] = (path, state_dict)
        return made[name]

    return make


# torchvision's BasicBlock refuses dilation, so resnet18 runs at output stride 32 only.
@pytest.mark.parametrize(
    "name, strides",
    [
        ("resnet50", (32, 16)),
        ("resnet18", (32,)),
        ("resnet50c", (32, 16)),
        ("resnet50s", (32, 16)),
        ("resnet18d", (32, 16, 8)),
        ("resnet101d", (32, 16)),
        ("resnet18s", (16,)),
    ],
)
def test_features_equal_pytorch(checkpoint, images, name, strides):
    path, state_dict = checkpoint(name)
    variables, arch = convert.from_imagenet(path)
    assert arch == ARCHS[name]
    for output_stride in strides:
        reference = torch_features(name, state_dict, output_stride, images)
        ours = jax_features(variables, arch, output_stride, images)
        for level, (a, b) in enumerate(zip(ours, reference, strict=True)):
            assert a.shape == b.shape, (name, output_stride, level)
            error = relative_max_error(a, b)
            assert error < TOLERANCE, (name, output_stride, level, error)


@pytest.mark.parametrize(
    "library, name",
    [
        ("torchvision", "resnet34"),
        ("torchvision", "resnet101"),
        ("torchvision", "resnet152"),
        ("timm", "resnet101c"),
        ("timm", "resnet101d"),
        ("timm", "resnet101s"),
        ("timm", "resnet152s"),
    ],
)
def test_every_named_variant_fits(library, name):
    """The libraries' own key names and shapes (models built on torch's meta device, so no
    memory or compute) fit the ResNet of the variant the converter reads from them."""
    with torch.device("meta"):
        if library == "torchvision":
            model = torchvision.models.get_model(name, weights=None)
        else:
            model = timm.create_model(name, pretrained=False)
    state_dict = {  # zero-stride arrays of the right shapes: nothing is allocated
        k: np.broadcast_to(np.zeros((), np.float32 if v.is_floating_point() else np.int64), v.shape)
        for k, v in model.state_dict().items()
    }
    _, arch, unused = convert_resnet(state_dict, name)
    assert arch == convert.resnet_variant(name) and unused == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize(
    "name, depth, stem, avg_down",
    [
        ("tv_resnet101.tv_in1k", 101, "torchvision", False),  # timm's copy of torchvision's
        ("resnet50c.gluon_in1k", 50, "deep32", False),
        ("ResNet101D", 101, "deep32", True),
        ("resnet101s.gluon_in1k", 101, "deep64", False),
    ],
)
def test_timm_and_torchvision_model_names_give_their_variant(name, depth, stem, avg_down):
    # A file or hub name is how "imagenet" and --variant pick the backbone's stem and shortcuts.
    assert convert.resnet_variant(name) == {"depth": depth, "stem": stem, "avg_down": avg_down}


@pytest.mark.parametrize(
    "source",
    [
        "hf-hub:timm/resnetaa50d.sw_in12k_ft_in1k",
        "weights/resnetblur50.bt_in1k/model.safetensors",
        "ResNetAA101d.pth",
    ],
)
def test_anti_aliased_resnets_are_refused_by_name(source):
    # Their blur pools hold no weights: converted as resnet50d/resnet50/resnet101d, they gave
    # features 1.1-1.3 (relative) away from timm's, silently.
    with torch.device("meta"):
        model = timm.create_model("resnetaa50d", pretrained=False)
    state_dict = {
        k: np.broadcast_to(np.zeros((), np.float32 if v.is_floating_point() else np.int64), v.shape)
        for k, v in model.state_dict().items()
    }
    _, arch, _ = convert_resnet(state_dict, "resnet50d.safetensors")  # its keys alone: resnet50d
    assert arch == convert.resnet_variant("resnet50d")
    # The user's own folders above the weights' are not their name.
    convert_resnet(state_dict, "/data/resnetblur50_trials/runs/resnet50d.safetensors")
    with pytest.raises(convert.ConversionError, match=r"anti-aliased ResNet.*resnet101s"):
        convert_resnet(state_dict, source)


def test_avg_down_and_dilation_rule_are_seen(checkpoint, images):
    """The comparison above has teeth where the keys do not: a "d" checkpoint run without
    the average-pool shortcut, or with SMP's dilation rule, gives other features."""
    path, state_dict = checkpoint("resnet18d")
    variables, arch = convert.from_imagenet(path)
    reference = torch_features("resnet18d", state_dict, 16, images)[-1]
    without_avg = ResNet(**{**arch, "avg_down": False}, output_stride=16)
    smp_rule = ResNet(**arch, output_stride=16, dilation_rule="smp")
    for backbone in (without_avg, smp_rule):
        ours = backbone.apply(variables, images, train=False)[-1]
        assert relative_max_error(ours, reference) > 1e-2


def test_in_memory_state_dict_and_variant(checkpoint):
    path, state_dict = checkpoint("resnet50s")
    from_file, _ = convert.from_imagenet(path)
    from_memory, arch = convert.from_imagenet(state_dict, variant="resnet50s.gluon_in1k")
    assert arch == ARCHS["resnet50s"]
    for a, b in zip(jax.tree.leaves(from_file), jax.tree.leaves(from_memory), strict=True):
        np.testing.assert_array_equal(a, b)
    # DataParallel, torch.compile inside a Lightning module: every key wears a prefix.
    for prefix in ("module.", "model._orig_mod."):
        wrapped = {"state_dict": {f"{prefix}{k}": v for k, v in state_dict.items()}, "epoch": 3}
        from_wrapped, _ = convert.from_imagenet(wrapped)
        for a, b in zip(jax.tree.leaves(from_wrapped), jax.tree.leaves(from_file), strict=True):
            np.testing.assert_array_equal(a, b)


WEIGHTS = {"conv1.weight": torch.ones(2, 3), "bn1.running_var": torch.full((2,), 2.0)}


@pytest.mark.parametrize(
    "checkpoint",
    [
        # torchvision's reference training scripts (and DeiT), as torch.load gives it back.
        {"model": WEIGHTS, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}, "epoch": 90},
        # pytorch/examples' imagenet/main.py (model_best.pth.tar): DataParallel keys, and a 0-d
        # tensor beside the wrapper, which was taken for the state dict ("keys begin
        # ['best_acc1']").
        {
            "epoch": 90,
            "state_dict": {f"module.{k}": v for k, v in WEIGHTS.items()},
            "best_acc1": torch.tensor(69.7),
        },
    ],
    ids=["model", "state_dict_beside_a_tensor"],
)
def test_training_checkpoints_are_unwrapped(checkpoint):
    read = convert.read_state_dict(checkpoint)
    assert set(read) == set(WEIGHTS)
    np.testing.assert_array_equal(read["bn1.running_var"], np.full((2,), 2.0, np.float32))


def test_safetensors_need_no_torch(checkpoint, monkeypatch):
    path, _ = checkpoint("resnet50c")
    pth, _ = checkpoint("resnet18")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _, arch = convert.from_imagenet(path)
    assert arch == ARCHS["resnet50c"]
    with pytest.raises(ImportError):  # the check bites: a .pth does need torch
        convert.read_state_dict(pth)


def test_bfloat16_safetensors_read_without_torch(tmp_path):
    tensors = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.arange(4)}
    safetensors.torch.save_file(tensors, tmp_path / "x.safetensors")
    read = convert.read_state_dict(tmp_path / "x.safetensors")
    assert read["a"].dtype == np.float32
    np.testing.assert_array_equal(read["a"], tensors["a"].float().numpy())
    np.testing.assert_array_equal(read["b"], np.arange(4))


def test_half_precision_torch_tensors_read_as_float32(checkpoint, tmp_path):
    # numpy has no bfloat16: a bf16 state dict, in memory or saved with torch.save, would be a
    # TypeError from Tensor.numpy() without the cast to float32.
    tensors = {"a": torch.randn(2, 3).to(torch.bfloat16), "b": torch.randn(2).half()}
    torch.save(tensors, tmp_path / "half.pth")
    for source in (tensors, tmp_path / "half.pth"):
        read = convert.read_state_dict(source)
        for key, tensor in tensors.items():
            assert read[key].dtype == np.float32
            np.testing.assert_array_equal(read[key], tensor.float().numpy())
    _, state_dict = checkpoint("resnet18")
    bf16 = {k: v.bfloat16() if v.is_floating_point() else v for k, v in state_dict.items()}
    variables, arch = convert.from_imagenet(save(bf16, tmp_path / "resnet18_bf16.pth"))
    assert arch == ARCHS["resnet18"]
    expected, _ = convert.from_imagenet({k: v.float() for k, v in bf16.items()})
    jax.tree.map(np.testing.assert_array_equal, variables, expected)


def test_a_file_that_is_no_checkpoint_is_called_so(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(convert.ConversionError, match=r"notes\.pth is not a PyTorch checkpoint"):
        convert.read_state_dict(text)


@pytest.mark.parametrize("name", ["resnet50c", "resnet50"])
def test_truncated_file_is_named(checkpoint, tmp_path, name):
    path, _ = checkpoint(name)
    data = path.read_bytes()
    truncated = tmp_path / path.name
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(convert.ConversionError, match="truncated") as error:
        convert.from_imagenet(truncated)
    assert str(truncated) in str(error.value)


def test_pickled_objects_are_refused_with_advice(tmp_path):
    import argparse

    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "args": argparse.Namespace()}, path)
    with pytest.raises(convert.ConversionError, match=r"weights_only=True\) refuses") as error:
        convert.read_state_dict(path)
    assert str(path) in str(error.value)


def test_a_groupnorm_resnet_is_named_as_such():
    # Its norm layers have no running statistics: they were taken for convolutions, and the
    # error listed invented Flax names instead.
    with torch.device("meta"):
        model = timm.create_model("resnet50_gn")
    state_dict = {
        key: np.broadcast_to(np.float32(0), value.shape)
        for key, value in model.state_dict().items()
    }
    with pytest.raises(convert.ConversionError, match=r"^bn1: .*without running statistics.*Group"):
        convert.from_imagenet(state_dict)


def test_checkpoint_of_another_depth(checkpoint):
    path, _ = checkpoint("resnet50")
    with pytest.raises(convert.ConversionError) as error:
        convert.from_imagenet(path, variant="resnet101")
    message = str(error.value)
    assert str(path) in message and "resnet50" in message and "resnet101" in message

    model = models.create("fcn", num_classes=3, backbone="resnet101", stem="torchvision")
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 256, 256, 3))))
    with pytest.raises(convert.ConversionError) as error:
        convert.load_pretrained(template, path, "torchvision")
    message = str(error.value)
    assert str(path) in message
    assert "3-4-6-3 blocks" in message and "3-4-23-3 blocks" in message
    assert "missing: params/backbone/layer3_10/bn1/bias" in message


def test_errors_name_keys_and_shapes(checkpoint):
    _, state_dict = checkpoint("resnet18")
    broken = dict(state_dict)
    broken["layer2.1.conv1.weight"] = torch.zeros(128, 64, 3, 3)
    broken["layer1.0.se.fc1.weight"] = torch.zeros(4, 64, 1, 1)
    del broken["layer4.1.bn2.running_var"]
    with pytest.raises(convert.ConversionError) as error:
        convert.from_imagenet(broken)
    message = str(error.value)
    assert "layer2_1/conv1/kernel: checkpoint (3, 3, 64, 128), model (3, 3, 128, 128)" in message
    assert "layer1.0.se.fc1.weight" in message  # unexpected
    assert "batch_stats/layer4_1/bn2/var" in message  # missing
    with pytest.raises(convert.ConversionError, match="kind 'smp'"):
        convert.from_imagenet({f"encoder.{k}": v for k, v in state_dict.items()})
    with pytest.raises(convert.ConversionError, match=r"stem of widths \(24, 32, 64\)"):
        convert.from_imagenet(
            {
                "conv1.0.weight": torch.zeros(24, 3, 3, 3),
                "conv1.3.weight": torch.zeros(32, 24, 3, 3),
                "conv1.6.weight": torch.zeros(64, 32, 3, 3),
            }
        )


def _random_variables(model, seed=1):
    """Stand-ins for initialised variables (an `init` costs a compile per shape on CPU)."""
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), template)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def test_load_pretrained_backbone_leaves_decoder(checkpoint, tmp_path, monkeypatch):
    path, _ = checkpoint("resnet18d")
    model = models.create("pan", num_classes=3, backbone="resnet18", stem="deep32", avg_down=True)
    initial = jax.tree.map(jax.numpy.asarray, _random_variables(model))  # placed arrays
    monkeypatch.setenv("HOME", str(path.parent))  # --config.model.pretrained=~/x, as a shell
    convert.fetch_pretrained(f"~/{path.name}", "timm", model)
    variables, report = convert.load_pretrained(initial, f"~/{path.name}", "timm", model=model)
    kernel = variables["params"]["backbone"]["stem_conv0"]["kernel"]
    assert (
        isinstance(kernel, jax.Array)
        and kernel.sharding == initial["params"]["head"]["kernel"].sharding
    )
    backbone, _ = convert.from_imagenet(path)

    flat, before = _flat(variables), _flat(initial)
    expected = {f"{c}/backbone/{k}": v for c in backbone for k, v in _flat(backbone[c]).items()}
    assert set(report.loaded) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(flat[name], value)
    rest = [k for k in before if "/backbone/" not in k]
    assert set(report.not_loaded) == set(rest) and any(k.startswith("params/head/") for k in rest)
    for name in rest:
        np.testing.assert_array_equal(flat[name], before[name])  # the decoder as initialised
    assert report.unused == ("fc.bias", "fc.weight")
    text = str(report)
    assert f"loaded {len(expected)} arrays" in text and "decoder, head" in text

    # A directory of this model loads whole into it, and all but the head into a 5-class one.
    spec = {"name": "pan", "backbone": "resnet18", "num_classes": 3}
    spec["overrides"] = {"stem": "deep32", "avg_down": True}
    checkpointing.save_variables(tmp_path / "m", variables, spec)
    other = models.create("pan", num_classes=5, backbone="resnet18", stem="deep32", avg_down=True)
    template = jax.eval_shape(lambda: other.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    again, report = convert.load_pretrained(template, tmp_path / "m", "pan_jax", model=other)
    assert {n.split("/")[1] for n in report.loaded} == {"backbone", "decoder"}
    assert set(report.not_loaded) == {"params/head/bias", "params/head/kernel"}
    assert not any("other options" in n for n in report.notes)  # the class count: the head's
    assert any(
        "head" in n and "(3, 3, 128, 3)" in n and "(3, 3, 128, 5)" in n for n in report.notes
    )
    np.testing.assert_array_equal(
        again["params"]["decoder"]["fpa"]["mid"]["conv"]["kernel"],
        variables["params"]["decoder"]["fpa"]["mid"]["conv"]["kernel"],
    )
    # A decoder of another width: one short note (it was every mismatch, 2,500 characters).
    narrow = models.create(
        "pan", num_classes=3, backbone="resnet18", stem="deep32", avg_down=True, decoder_channels=64
    )
    template = jax.eval_shape(lambda: narrow.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    _, report = convert.load_pretrained(template, tmp_path / "m", "pan_jax", model=narrow)
    (note,) = [n for n in report.notes if n.startswith("decoder not loaded")]
    assert note.count(": checkpoint (") == 3 and " in all)" in note and len(note) < 600, note
    saved = _flat({c: {"decoder": variables[c]["decoder"]} for c in variables})
    assert set(saved) <= set(report.unused)  # what did not fit is said to be unused
    # Into fcn, which has no decoder: the saved decoder is unused (unchecked before).
    fcn = models.create("fcn", num_classes=3, backbone="resnet18", stem="deep32", avg_down=True)
    template = jax.eval_shape(lambda: fcn.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    _, report = convert.load_pretrained(template, tmp_path / "m", "pan_jax", model=fcn)
    assert set(saved) <= set(report.unused)
    assert {n.split("/")[1] for n in report.loaded} == {"backbone"}
    # Options that change what the weights compute but not their shapes load, and are said.
    gated = models.create(
        "pan", num_classes=3, backbone="resnet18", stem="deep32", avg_down=True, gau_gate="sigmoid"
    )
    template = jax.eval_shape(lambda: gated.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    _, report = convert.load_pretrained(template, tmp_path / "m", "pan_jax", model=gated)
    assert not report.not_loaded
    assert report.notes == (
        "loaded into a model of other options (decoder.gau_gate: checkpoint 'relu', model "
        "'sigmoid')",
    )


def test_load_pretrained_checks_the_variant(checkpoint):
    path, _ = checkpoint("resnet18d")
    plain = models.create("pan", num_classes=3, backbone="resnet18", stem="deep32")
    template = jax.eval_shape(lambda: plain.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    with pytest.raises(convert.ConversionError, match="avg_down=True"):
        convert.load_pretrained(template, path, "timm", model=plain)
    paper = models.create("pan", num_classes=3, backbone="resnet18")  # deep64 stem
    template = jax.eval_shape(lambda: paper.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    stem = r"stem_conv0/kernel: checkpoint \(3, 3, 3, 32\), model \(3, 3, 3, 64\)"
    with pytest.raises(convert.ConversionError, match=stem):
        convert.load_pretrained(template, path, "timm")  # without model=: shapes still differ
    with pytest.raises(ValueError, match="unknown pretrained kind"):
        convert.load_pretrained(template, path, "mmseg")


def randomized_smp_pan(encoder: str, classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = randomize(smp.PAN(encoder_name=encoder, encoder_weights=None, classes=classes), seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.bias is not None:
                module.bias.uniform_(-0.1, 0.1)
    return model


def test_load_pretrained_smp_file_gives_smp_logits(tmp_path):
    torch_pan = randomized_smp_pan("resnet18", classes=4, seed=3)
    path = save(torch_pan.state_dict(), tmp_path / "pan.pth")
    model = models.create("pan_smp", num_classes=4, backbone="resnet18")
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    variables, report = convert.load_pretrained(template, path, "smp", model=model)
    assert not report.not_loaded and not report.unused
    images = np.random.default_rng(1).standard_normal((1, 128, 160, 3)).astype(np.float32)
    with torch.no_grad():
        reference = torch_pan(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ours = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    assert relative_max_error(ours, reference.numpy()) < TOLERANCE


def test_cli_timm_backbone_into_paper_pan(checkpoint, tmp_path, capsys, caplog):
    path, _ = checkpoint("resnet18s")
    out = tmp_path / "pan_resnet18s"
    assert cli.main(["--from=timm", f"--input={path}", f"--output={out}"]) == 0
    assert "loaded" in capsys.readouterr().out
    variables, spec = checkpointing.load_variables(out)
    assert spec == {
        "name": "pan",
        "backbone": "resnet18",
        "num_classes": 21,
        "overrides": {"stem": "deep64", "avg_down": False},
        "untrained": ["decoder", "head"],  # inference from it says so
    }
    backbone, _ = convert.from_imagenet(path)
    for collection in backbone:
        for a, b in zip(
            jax.tree.leaves(variables[collection]["backbone"]),
            jax.tree.leaves(backbone[collection]),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
    model = checkpointing.model_from_spec(spec)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    logits = apply(variables, np.ones((1, 128, 160, 3), np.float32))
    assert logits.shape == (1, 128, 160, 21) and np.isfinite(np.asarray(logits)).all()
    with caplog.at_level(std_logging.WARNING):  # what predict and the notebook load it with
        inference.load_model(out)
    assert f"{out}: its decoder and head were never trained" in caplog.text


def test_cli_smp_round_trip_through_files(tmp_path, monkeypatch):
    torch_pan = randomized_smp_pan("resnet18", classes=5, seed=4)
    save(torch_pan.state_dict(), tmp_path / "smp_pan.pth")
    monkeypatch.setenv("HOME", str(tmp_path))  # a shell leaves `~` in --input=~/x
    monkeypatch.chdir(tmp_path.parent)
    assert cli.main(["--from=smp", "--input=~/smp_pan.pth", "--output=~/out"]) == 0
    assert not (tmp_path.parent / "~").exists()
    variables, spec = checkpointing.load_variables(tmp_path / "out")
    assert spec["name"] == "pan_smp" and spec["num_classes"] == 5
    fresh = smp.PAN(encoder_name="resnet18", encoder_weights=None, classes=5)
    fresh.load_state_dict(convert.to_smp(variables), strict=True)
    for key, value in torch_pan.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(fresh.state_dict()[key], value), key


def test_cli_errors(checkpoint, tmp_path, capsys):
    path, _ = checkpoint("resnet50c")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    assert cli.main(["--from=timm", f"--input={truncated}", f"--output={tmp_path / 'o'}"]) == 1
    assert str(truncated) in capsys.readouterr().err
    argv = ["--from=timm", f"--input={path}", f"--output={tmp_path / 'o'}"]
    assert cli.main([*argv, "--override", "stem=deep64"]) == 1
    assert "contradicts" in capsys.readouterr().err
    assert cli.main([*argv, "--backbone=resnet101"]) == 1
    assert "resnet50" in capsys.readouterr().err
    assert cli.main([*argv, "--model=fcn", "--override", "decoder_channels=64"]) == 1
    assert "--override decoder_channels: model 'fcn' does not take it" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    # A training workdir was overwritten (its model.json) with weights it never reads; a file
    # as output was a traceback once the conversion was done.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "model.json").write_text("{}")
    assert cli.main(["--from=timm", f"--input={path}", f"--output={tmp_path / 'run'}"]) == 1
    assert "is a training workdir (it holds checkpoints/)" in capsys.readouterr().err
    assert (tmp_path / "run" / "model.json").read_text() == "{}"
    assert cli.main(["--from=timm", f"--input={path}", f"--output={truncated}"]) == 1
    assert f"--output={truncated} is a file: expected a directory" in capsys.readouterr().err


def test_cli_refuses_a_checkpoint_of_another_variant_than_asked(checkpoint, tmp_path, capsys):
    # --variant is the user's guard against, e.g., a torchvision file where a timm resnet18d
    # was meant: ignored, the conversion succeeded with the 7×7 stem, silently.
    path, _ = checkpoint("resnet18")
    out = tmp_path / "o"
    argv = ["--from=timm", f"--input={path}", f"--output={out}", "--variant=resnet18d"]
    assert cli.main(argv) == 1
    assert "not the requested resnet18d" in capsys.readouterr().err
    assert not out.exists()


def test_load_pretrained_smp_checks_the_models_shortcut_type(tmp_path):
    # avg_down adds no parameters, so only the arch check sees that SMP's plain torchvision
    # encoder does not fit a model built with average-pool shortcuts.
    torch.manual_seed(0)
    smp_pan = smp.PAN(encoder_name="resnet18", encoder_weights=None)
    path = save(smp_pan.state_dict(), tmp_path / "pan.pth")
    model = models.create("pan_smp", num_classes=1, backbone="resnet18", avg_down=True)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))
    with pytest.raises(convert.ConversionError, match=r"avg_down=False"):
        convert.load_pretrained(template, path, "smp", model=model)


def test_cli_as_module(checkpoint, tmp_path):
    """`python -m pan_jax.convert` end to end: torchvision weights pick the 7×7 stem."""
    path, _ = checkpoint("resnet18")
    out = tmp_path / "fcn"
    command = [sys.executable, "-m", "pan_jax.convert", "--from=torchvision", f"--input={path}"]
    command += [
        f"--output={out}",
        "--model=fcn",
        "--num_classes=3",
        "--seed=3",
        "--override",
        "output_stride=8",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    variables, spec = checkpointing.load_variables(out)
    assert spec["overrides"] == {"stem": "torchvision", "avg_down": False, "output_stride": 8}
    model = checkpointing.model_from_spec(spec)
    logits = model.apply(variables, np.ones((1, 64, 80, 3), np.float32), train=False)
    assert logits.shape == (1, 64, 80, 3) and np.isfinite(np.asarray(logits)).all()
    # What was not loaded is what `model.init` with the --seed draws.
    initial = jax.jit(lambda: model.init(jax.random.key(3), np.zeros((1, 64, 64, 3))))()
    for a, b in zip(
        jax.tree.leaves(variables["params"]["head"]),
        jax.tree.leaves(initial["params"]["head"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
