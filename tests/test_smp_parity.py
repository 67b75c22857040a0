"""pan_smp reproduces segmentation_models_pytorch's PAN logits from SMP's weights."""

import json

import jax
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch

from pan_jax import checkpointing, convert, models
from pan_jax.convert import cli
from pan_jax.convert.smp import saved_config_options
from tests.helpers import Hub, randomize_statistics


def randomized_smp_pan(
    encoder: str, classes: int = 21, seed: int = 0, **options
) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = smp.PAN(encoder_name=encoder, encoder_weights=None, classes=classes, **options)
    return randomize_statistics(model)


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


def test_the_papers_pooling_and_gate_equal_smp_with_those_layers_swapped():
    # fpa_pooling="avg" and gau_gate="relu" (the `pan` preset's) were compared with nothing:
    # pooling by max, or a sigmoid gate, in their place went unnoticed.
    torch_model = randomized_smp_pan("resnet18", classes=3)
    decoder = torch_model.decoder
    for block in (decoder.fpa.down1, decoder.fpa.down2, decoder.fpa.down3):
        assert isinstance(block[0], torch.nn.MaxPool2d)
        block[0] = torch.nn.AvgPool2d(2)
    for gau in (decoder.gau1, decoder.gau2, decoder.gau3):
        assert isinstance(gau.conv1[2], torch.nn.Sigmoid)
        gau.conv1[2] = torch.nn.ReLU()
    variables = convert.from_smp(torch_model.state_dict())
    model = models.create(
        "pan_smp", num_classes=3, backbone="resnet18", fpa_pooling="avg", gau_gate="relu"
    )
    images = np.random.default_rng(0).standard_normal((1, 128, 160, 3)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ours = np.asarray(model.apply(variables, images, train=False))
    assert relative_max_error(ours, reference.numpy()) < 1e-4


@pytest.mark.parametrize("encoder", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_the_encoder_depth_is_read_from_an_smp_state_dict(encoder):
    # Built on torch's meta device: key names and shapes only. resnet50 read as resnet101 went
    # unseen (the parity tests use resnet18, resnet34 and resnet101).
    with torch.device("meta"):
        state_dict = smp.PAN(encoder_name=encoder, encoder_weights=None, classes=3).state_dict()
    assert convert.smp_spec(state_dict)["backbone"] == encoder


def test_options_the_weights_cannot_show_come_from_smps_config_json(tmp_path, capsys):
    # Output stride 32 has the same parameter shapes as 16: converted as 16 it gave other
    # logits, silently. save_pretrained's config.json says which.
    torch_model = randomized_smp_pan("resnet18", classes=3, encoder_output_stride=32)
    torch_model.save_pretrained(tmp_path / "os32")
    weights = tmp_path / "os32" / "model.safetensors"
    assert cli.main(["--from=smp", f"--input={weights}", f"--output={tmp_path / 'out'}"]) == 0
    variables, spec = checkpointing.load_variables(tmp_path / "out")
    assert spec["overrides"]["output_stride"] == 32
    model = checkpointing.model_from_spec(spec)
    images = np.random.default_rng(0).standard_normal((1, 256, 320, 3)).astype(np.float32)
    with torch.no_grad():
        reference = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    ours = np.asarray(model.apply(variables, images, train=False))
    assert relative_max_error(ours, reference.numpy()) < 1e-4
    # The folder save_pretrained wrote is an input too (it was "unknown checkpoint format ''").
    folder = ["--from=smp", f"--input={tmp_path / 'os32'}", f"--output={tmp_path / 'f'}"]
    assert cli.main(folder) == 0
    again, again_spec = checkpointing.load_variables(tmp_path / "f")
    assert again_spec == spec
    jax.tree.map(np.testing.assert_array_equal, again, variables)
    (tmp_path / "empty").mkdir()
    empty = ["--from=smp", f"--input={tmp_path / 'empty'}", f"--output={tmp_path / 'e'}"]
    assert cli.main(empty) == 1
    assert "empty is a folder without model.safetensors or pytorch_model.bin" in (
        capsys.readouterr().err
    )
    # What pan_smp cannot be is refused, by name.
    for folder, option, named in [
        ("nearest", {"decoder_interpolation": "nearest"}, "decoder_interpolation='nearest'"),
        ("up8", {"upsampling": 8}, "upsampling=8"),  # logits at twice the input size
    ]:
        randomized_smp_pan("resnet18", classes=3, **option).save_pretrained(tmp_path / folder)
        weights = tmp_path / folder / "model.safetensors"
        assert cli.main(["--from=smp", f"--input={weights}", f"--output={tmp_path / 'n'}"]) == 1
        assert named in capsys.readouterr().err
        assert not (tmp_path / "n").exists()


def test_hub_weights_take_the_config_json_of_their_repository(tmp_path, monkeypatch):
    # Only model.safetensors was fetched: an output-stride-32 PAN converted as 16, silently.
    hub = Hub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("PAN_JAX_CACHE_DIR", str(tmp_path / "cache"))
    randomized_smp_pan("resnet18", classes=3, encoder_output_stride=32).save_pretrained(
        tmp_path / "os32"
    )
    for name in ("model.safetensors", "config.json"):
        data = (tmp_path / "os32" / name).read_bytes()
        hub.serve_like_the_hub(f"/me/pan-os32/resolve/main/{name}", data)
        hub.serve_like_the_hub(f"/me/plain/resolve/main/{name}", data)
        hub.serve_like_the_hub(f"/me/zoo/resolve/main/os32/{name}", data)
    del hub.routes["/me/plain/resolve/main/config.json"]  # a bare state dict uploaded
    assert cli.main(["--from=smp", "--input=hf-hub:me/pan-os32", f"--output={tmp_path / 'a'}"]) == 0
    assert checkpointing.load_variables(tmp_path / "a")[1]["overrides"]["output_stride"] == 32
    assert cli.main(["--from=smp", "--input=hf-hub:me/plain", f"--output={tmp_path / 'b'}"]) == 0
    assert "output_stride" not in checkpointing.load_variables(tmp_path / "b")[1]["overrides"]
    # A repository of several models, one a folder: the config.json beside the weights is
    # theirs, not the root's (here none).
    zoo = "--input=hf-hub:me/zoo/os32/model.safetensors"
    assert cli.main(["--from=smp", zoo, f"--output={tmp_path / 'z'}"]) == 0
    assert checkpointing.load_variables(tmp_path / "z")[1]["overrides"]["output_stride"] == 32
    # Offline, cached weights still convert (with a warning that config.json was not read).
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert cli.main(["--from=smp", "--input=hf-hub:me/plain", f"--output={tmp_path / 'c'}"]) == 0


def test_smp_configs_of_the_old_upscale_mode_name_are_read(tmp_path):
    # SMP before PR #1108 saved the decoder's interpolation as upscale_mode: a nearest-mode PAN
    # of that era would convert as bilinear, silently.
    (tmp_path / "config.json").write_text(
        json.dumps({"_model_class": "PAN", "encoder_name": "resnet18", "upscale_mode": "nearest"})
    )
    with pytest.raises(convert.ConversionError, match="decoder_interpolation='nearest'"):
        saved_config_options(tmp_path / "model.safetensors", "resnet18")


def test_cli_overrides_apply_to_a_bare_smp_state_dict(tmp_path):
    # The documented remedy for an output-stride-32 PAN saved without config.json; dropped, the
    # model converted as stride 16 and gave other logits.
    path = tmp_path / "pan.pth"
    torch.save(randomized_smp_pan("resnet18", classes=3).state_dict(), path)
    out = tmp_path / "out"
    argv = ["--from=smp", f"--input={path}", f"--output={out}", "--override", "output_stride=32"]
    assert cli.main(argv) == 0
    assert checkpointing.load_variables(out)[1]["overrides"]["output_stride"] == 32


@pytest.mark.parametrize(
    "options, message",
    [
        ({"encoder_depth": 4}, "encoder_depth < 5"),
        ({"in_channels": 1}, "in_channels=1"),
        ({"encoder_name": "resnext50_32x4d"}, "ResNeXt"),
        ({"encoder_name": "tu-resnet18"}, "timm-universal"),
        ({"encoder_name": "efficientnet-b0"}, r"encoder is not a ResNet .*encoder\._blocks"),
    ],
)
def test_smp_options_pan_smp_lacks_are_named(options, message):
    # From a bare state dict; these used to fail as a screen of mismatched keys and shapes.
    options = {"encoder_name": "resnet18", **options}
    torch.manual_seed(0)
    state_dict = smp.PAN(encoder_weights=None, classes=3, **options).state_dict()
    with pytest.raises(convert.ConversionError, match=message):
        convert.from_smp(state_dict)


def test_smps_auxiliary_classifier_is_left_out():
    torch_model = randomized_smp_pan("resnet18", classes=3, aux_params={"classes": 4})
    variables = convert.from_smp(torch_model.state_dict())
    model = models.create("pan_smp", num_classes=3, backbone="resnet18")
    images = np.random.default_rng(0).standard_normal((1, 128, 160, 3)).astype(np.float32)
    with torch.no_grad():
        reference, _ = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2))
    ours = np.asarray(model.apply(variables, images, train=False))
    assert relative_max_error(ours, reference.permute(0, 2, 3, 1).numpy()) < 1e-4


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


def test_training_steps_equal_smp_trained_in_pytorch():
    """Three steps of our train step (loss, gradients, SyncBN statistics, SGD with weight decay
    and poly schedule) against SMP's PAN trained with torch.optim.SGD on the same batches.

    Tolerances are those of float32 itself: SMP's pyramid ends in 1×1 maps whose BatchNorm
    sees 4 values, and its gradients differ by percents between PyTorch in float32 and in
    float64. They still catch a wrong loss normalisation, learning-rate schedule, gradient
    scale or BatchNorm momentum.
    """
    from configs import demo
    from pan_jax import train

    steps, lr = 3, 1e-3
    torch.manual_seed(0)
    torch_model = smp.PAN(encoder_name="resnet18", encoder_weights=None, classes=5).train()
    config = demo.get_config()
    config.model.name, config.model.backbone = "pan_smp", "resnet18"
    config.model.overrides = {}
    config.data.num_classes = 5
    config.num_train_steps, config.learning_rate, config.warmup_steps = steps, lr, 0
    model, optimizer = train.create_model(config), train.create_optimizer(config)
    initial = convert.from_smp(torch_model.state_dict())
    state = train.state_from_variables(initial, optimizer)
    step = jax.jit(
        lambda s, b: train.train_step(s, b, jax.random.key(0), model=model, optimizer=optimizer)
    )
    sgd = torch.optim.SGD(torch_model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    poly = torch.optim.lr_scheduler.LambdaLR(sgd, lambda i: (1 - i / steps) ** 0.9)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        images = rng.standard_normal((4, 192, 192, 3)).astype(np.float32)
        labels = rng.integers(0, 5, (4, 192, 192)).astype(np.int32)
        labels[:, :16] = 255  # ignored rows
        state, metrics = step(state, {"image": images[None], "label": labels[None]})
        sgd.zero_grad()
        loss = torch.nn.functional.cross_entropy(
            torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)),
            torch.from_numpy(labels).long(),
            ignore_index=255,
        )
        loss.backward()
        sgd.step()
        poly.step()
        np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=5e-3)
    expected = convert.from_smp(torch_model.state_dict())

    def flat(tree):
        return np.concatenate(
            [np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)]
        )

    update, expected_update = (
        flat(params) - flat(initial["params"]) for params in (state.params, expected["params"])
    )
    assert np.linalg.norm(update - expected_update) < 0.15 * np.linalg.norm(expected_update)
    for (path, ours), reference in zip(
        jax.tree_util.tree_flatten_with_path(state.batch_stats)[0],
        jax.tree.leaves(expected["batch_stats"]),
        strict=True,
    ):
        error = np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference))
        assert error < 0.03, (jax.tree_util.keystr(path), error)
