"""Every model name builds, keeps the input resolution, trains, and refuses what it cannot take."""

import functools
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pan_jax import models
from pan_jax.models.layers import resize_bilinear
from pan_jax.models.pan import FPA, GAU
from pan_jax.models.resnet import ResNet


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_logits_at_input_resolution(name):
    model = models.create(name, num_classes=7, backbone="resnet18")
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 375, 500, 3)), jnp.float32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(
        images[:, :128, :160]
    )
    for height, width in [(375, 500), (128, 160)]:
        logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
            variables, images[:, :height, :width]
        )
        assert logits.shape == (1, height, width, 7)
        assert logits.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", ["pan", "pan_smp", "psp"])
def test_bfloat16_logits_close_to_float32(name):
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 160, 192, 3)), jnp.float32)
    fp32 = models.create(name, num_classes=5, backbone="resnet18")
    bf16 = models.create(name, num_classes=5, backbone="resnet18", dtype=jnp.bfloat16)
    variables = fp32.init(jax.random.key(0), images, train=False)
    assert all(
        v.dtype == jnp.float32 for v in jax.tree.leaves(bf16.init(jax.random.key(0), images))
    )
    reference = fp32.apply(variables, images, train=False)
    logits = bf16.apply(variables, images, train=False)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    relative = float(jnp.max(jnp.abs(logits - reference)) / jnp.max(jnp.abs(reference)))
    assert relative < 0.05, relative


def test_pan_backward_gives_finite_nonzero_gradients_everywhere():
    model = models.create("pan", num_classes=4, backbone="resnet18")
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.standard_normal((2, 128, 128, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, (2, 128, 128)))
    variables = model.init(jax.random.key(0), images, train=False)

    def loss_fn(params):
        logits, _ = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[..., None], axis=-1))

    grads = jax.grad(loss_fn)(variables["params"])
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        name = jax.tree_util.keystr(path)
        assert bool(jnp.all(jnp.isfinite(grad))), name
        assert float(jnp.max(jnp.abs(grad))) > 0, name


@pytest.mark.parametrize(
    "output_stride, strides", [(32, (4, 8, 16, 32)), (16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))]
)
@pytest.mark.parametrize("stem", ["torchvision", "deep32", "deep64"])
def test_backbone_feature_strides(output_stride, strides, stem):
    backbone = ResNet(depth=18, stem=stem, output_stride=output_stride)
    images = jnp.zeros((1, 64, 96, 3))
    features = jax.eval_shape(
        lambda: backbone.apply(backbone.init(jax.random.key(0), images, False), images, False)
    )
    assert [(f.shape[1], f.shape[2]) for f in features] == [(64 // s, 96 // s) for s in strides]
    assert [f.shape[3] for f in features] == [64, 128, 256, 512]


def test_deep64_stem_widths():
    backbone = ResNet(depth=50, stem="deep64")
    params = jax.eval_shape(
        lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), False)
    )["params"]
    assert [params[f"stem_conv{i}"]["kernel"].shape for i in range(3)] == [
        (3, 3, 3, 64),
        (3, 3, 64, 64),
        (3, 3, 64, 128),
    ]
    assert params["layer1_0"]["conv1"]["kernel"].shape == (1, 1, 128, 64)


@pytest.mark.parametrize(
    "name, overrides, top",
    [
        ("pan", {}, 8),
        ("pan_smp", {}, 8),
        ("fpa", {}, 8),
        ("fpa", {"fpa_attention": "se", "fpa_global_branch": False}, 1),
        ("gau", {}, 1),
        ("fcn", {}, 1),
        ("psp", {}, 1),
        ("aspp", {}, 1),
    ],
)
def test_only_the_pyramid_needs_an_8_pixel_top_feature_map(name, overrides, top):
    """FPA pools layer4 three times by 2; every other decoder takes a 1×1 map (run at it here;
    the pyramid at its minimum in `test_logits_at_input_resolution`)."""
    model = models.create(name, num_classes=3, backbone="resnet18", **overrides)
    assert model.min_input_size == top * model.backbone.output_stride
    if top > 1:
        return
    size = model.min_input_size
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size + 5, 3)))
    logits = model.apply(variables, jnp.ones((1, size, size + 5, 3)))
    assert logits.shape == (1, size, size + 5, 3) and bool(jnp.all(jnp.isfinite(logits)))


def test_too_small_input_is_a_clear_error():
    model = models.create("pan", num_classes=3, backbone="resnet18")
    with pytest.raises(ValueError, match=r"100×200 px is too small.*≥ 128"):
        model.init(jax.random.key(0), jnp.zeros((1, 100, 200, 3)), train=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"fpa_kernels": (7,)}, r"fpa_kernels=\(7,\): expected 3 odd kernel sizes"),
        ({"fpa_kernels": (7, 4, 3)}, "fpa_kernels"),
        ({"decoder_channels": 0}, r"decoder_channels=0: expected a positive integer"),
        ({"head_kernel": 2}, r"head_kernel=2: expected an odd kernel size"),
        ({"gau_low_kernel": 0}, "gau_low_kernel=0"),
        ({"dropout_rate": 1.5}, r"dropout_rate=1\.5: expected a rate in \[0, 1\)"),
        ({"dropout_rate": 1.0}, r"dropout_rate=1\.0: expected a rate in \[0, 1\)"),
        ({"bins": ()}, r"bins=\(\): expected a non-empty tuple of positive integers"),
        ({"rates": (0,)}, r"rates=\(0,\): expected a non-empty tuple of positive integers"),
    ],
)
def test_option_values_are_checked_naming_the_option(options, message):
    # They failed at init with "not enough values to unpack", "float division by zero", "All
    # dilations must be positive", or not at all (an even head kernel, a dropout rate of 1 or
    # past it, a pyramid pooling without bins).
    name = {"dropout_rate": "psp", "bins": "psp", "rates": "aspp"}.get(next(iter(options)), "pan")
    with pytest.raises(ValueError, match=message):
        models.create(name, num_classes=3, backbone="resnet18", **options)


@pytest.mark.parametrize(
    "name, option",
    [
        ("pan", "dropout_rate"),
        ("gau", "dropout_rate"),
        ("fcn", "decoder_channels"),
        ("fcn", "dropout_rate"),
        ("fpa", "gau_low_kernel"),
        ("gau", "fpa_kernels"),
        ("gau", "pyramid_features"),
        ("gau", "fpa_pooling"),
        ("gau", "fpa_global_branch"),
        ("gau", "fpa_attention"),
        ("fpa", "gau_global_attention"),
        ("fpa", "gau_gate"),
    ],
)
def test_an_option_the_model_does_not_use_is_refused_not_ignored(name, option):
    # All were accepted and changed nothing: PAN's decoder has no dropout, fcn no decoder, the
    # FPA-only ablation no GAU, the GAU-only one no pyramid.
    value = {
        "dropout_rate": 0.3,
        "decoder_channels": 8,
        "gau_low_kernel": 1,
        "fpa_kernels": (3, 3, 3),
        "pyramid_features": 1,
        "fpa_pooling": "max",
        "fpa_global_branch": False,
        "fpa_attention": "se",
        "gau_global_attention": False,
        "gau_gate": "sigmoid",
    }[option]
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{option}'\] for model '{name}'"):
        models.create(name, num_classes=3, backbone="resnet18", **{option: value})
    assert option not in models.valid_overrides(name)


def test_the_attention_options_follow_the_modules_a_model_has():
    # With GAU switched back on, the FPA-only preset takes GAU's options, and is PAN.
    fpa_with_gau = models.create(
        "fpa", num_classes=3, backbone="resnet18", use_gau=True, gau_gate="sigmoid"
    )
    assert fpa_with_gau.decoder.use_gau and fpa_with_gau.decoder.gau_gate == "sigmoid"
    assert "gau_gate" in models.valid_overrides("fpa", {"use_gau": True})
    assert "fpa_pooling" not in models.valid_overrides("pan", {"use_fpa": False})
    with pytest.raises(ValueError, match=r"\['fpa_pooling'\] for model 'pan' \(use_fpa=False\)"):
        models.create("pan", num_classes=3, use_fpa=False, fpa_pooling="max")
    # A stored spec with an option its model never took loads as the model it described.
    assert models.explicit_overrides("gau", {"fpa_pooling": "max", "gau_low_kernel": 1}) == {
        "gau_low_kernel": 1
    }


def test_a_new_decoder_width_widens_the_papers_pyramid_with_it():
    # The paper preset's pyramid is as wide as its decoder (128): decoder_channels=64 alone
    # failed at init with "pyramid_features must be 1 or features=64, got 128".
    model = models.create("pan", num_classes=3, backbone="resnet18", decoder_channels=64)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    assert shapes["params"]["decoder"]["fpa"]["down1"]["conv"]["kernel"].shape[-1] == 64
    assert models.explicit_overrides("pan", {"decoder_channels": 64, "pyramid_features": 64}) == {
        "decoder_channels": 64
    }
    smp = models.explicit_overrides("pan_smp", {"decoder_channels": 64, "pyramid_features": 1})
    assert smp == {"decoder_channels": 64}  # SMP's single-channel pyramid stays 1
    with pytest.raises(ValueError, match=r"pyramid_features=32: expected 1 or decoder_channels"):
        models.create("pan", num_classes=3, decoder_channels=64, pyramid_features=32)


def test_unknown_names_and_options_are_clear_errors():
    with pytest.raises(ValueError, match="known models: pan, pan_smp"):
        models.create("deeplab", num_classes=3)
    with pytest.raises(ValueError, match="known backbones"):
        models.create("pan", num_classes=3, backbone="resnet200")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['fpa_poolin'\]"):
        models.create("pan", num_classes=3, fpa_poolin="avg")
    # Refused by create, naming the option (before: by init, deep in the model).
    with pytest.raises(
        ValueError, match="option fpa_pooling='median': expected one of 'avg', 'max'"
    ):
        models.create("fpa", num_classes=3, backbone="resnet18", fpa_pooling="median")
    with pytest.raises(ValueError, match="option output_stride=4: expected one of 8, 16, 32"):
        models.create("fcn", num_classes=3, output_stride=4)
    with pytest.raises(ValueError, match="option stem='deep': expected one of 'torchvision'"):
        models.create("psp", num_classes=3, stem="deep")


@pytest.mark.parametrize(
    "overrides",
    [
        dict(fpa_pooling="max"),
        dict(fpa_kernels=(3, 3, 3)),
        dict(fpa_global_branch=False),
        dict(fpa_attention="se"),
        dict(gau_low_kernel=1),
        dict(gau_global_attention=False),
        dict(gau_gate="sigmoid"),
        dict(align_corners=False),
        dict(pyramid_features=1, decoder_channels=48),
        dict(output_stride=8, stem="deep32", dilation_rule="smp"),
    ],
)
def test_every_ablation_switch_changes_the_model(overrides):
    # One switch per case: paired with another, an ignored one (fpa_pooling, fpa_kernels,
    # gau_gate) went unnoticed, the other still changing the outputs.
    images = jnp.asarray(np.random.default_rng(3).standard_normal((1, 128, 128, 3)), jnp.float32)
    base = models.create("pan", num_classes=3, backbone="resnet18")
    variant = models.create("pan", num_classes=3, backbone="resnet18", **overrides)
    v_base = base.init(jax.random.key(0), images)
    v_variant = variant.init(jax.random.key(0), images)
    same_tree = jax.tree.structure(v_base) == jax.tree.structure(v_variant) and all(
        a.shape == b.shape
        for a, b in zip(jax.tree.leaves(v_base), jax.tree.leaves(v_variant), strict=True)
    )
    if same_tree:  # the switch changes computation, not parameters: outputs must differ
        out_base = base.apply(v_base, images)
        out_variant = variant.apply(v_base, images)
        assert float(jnp.max(jnp.abs(out_base - out_variant))) > 1e-6


@pytest.mark.parametrize("kernels", [(7, 5, 3), (3, 3, 3), (1, 3, 5)])
def test_fpa_kernels_set_each_pyramid_level(kernels):
    # The paper's C357 and C333 (Table 1), and one that tells the levels apart.
    model = models.create("pan", num_classes=3, backbone="resnet18", fpa_kernels=kernels)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    fpa = shapes["params"]["decoder"]["fpa"]
    levels = [("down1", "conv1"), ("down2", "conv2"), ("down3_1", "down3_2")]
    for kernel, names in zip(kernels, levels, strict=True):
        for name in names:
            assert fpa[name]["conv"]["kernel"].shape[:2] == (kernel, kernel), name


def test_pan_preset_is_the_papers_decoder_at_the_documented_widths():
    # What `models.create("pan")` must build (the models docstring, DESIGN.md §3): FPA C357
    # (Table 1's best) at 1/2, 1/4, 1/8 of layer4, a pyramid as wide as the 128-channel decoder,
    # GAU with a 3×3 low-level conv and a 1×1 gate, no conv biases before BN. The other tests
    # override these one at a time, so a preset default that drifted (C357 written as C753,
    # biases back on, another width) would go unseen.
    model = models.create("pan", num_classes=3, backbone="resnet18")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    decoder = flax.traverse_util.flatten_dict(shapes["params"]["decoder"], sep="/")
    kernels = {k.removesuffix("/conv/kernel"): v.shape for k, v in decoder.items() if "kernel" in k}
    c = 128
    assert kernels == {
        "fpa/mid": (1, 1, 512, c),
        "fpa/branch1": (1, 1, 512, c),
        "fpa/down1": (7, 7, 512, c),
        "fpa/conv1": (7, 7, c, c),
        "fpa/down2": (5, 5, c, c),
        "fpa/conv2": (5, 5, c, c),
        "fpa/down3_1": (3, 3, c, c),
        "fpa/down3_2": (3, 3, c, c),
        "gau3/low": (3, 3, 256, c),
        "gau3/attention": (1, 1, c, c),
        "gau2/low": (3, 3, 128, c),
        "gau2/attention": (1, 1, c, c),
        "gau1/low": (3, 3, 64, c),
        "gau1/attention": (1, 1, c, c),
    }
    assert [k for k in decoder if k.endswith("conv/bias")] == []
    assert shapes["params"]["head"]["kernel"].shape == (3, 3, c, 3)


@pytest.mark.parametrize("name", ["pan", "fcn", "fpa", "gau", "psp", "aspp"])
def test_the_paper_models_share_the_papers_backbone(name):
    # §4.1: every ablation and baseline runs on the same dilated ResNet (dilation 2 from res5b,
    # output stride 16, the three-conv 64-64-128 stem), so that Tables 1–3 compare decoders.
    # A preset given its own backbone would still build and pass every other test.
    backbone = models.create(name, num_classes=3, backbone="resnet18").backbone
    assert (backbone.stem, backbone.dilation_rule, backbone.output_stride) == (
        "deep64",
        "torchvision",
        16,
    )
    assert not backbone.avg_down


@pytest.mark.parametrize("name", ["fcn", "fpa"])
def test_the_fpa_ablation_classifies_as_the_baseline_does(name):
    # Table 1 puts FPA "after ResNet with direct upsampling as the same as the baseline": both
    # classify with a 1×1 conv, so the gain over 72.60 is FPA's, not a 3×3 head's.
    model = models.create(name, num_classes=3, backbone="resnet18")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
    assert shapes["params"]["head"]["kernel"].shape[:2] == (1, 1)


@pytest.mark.parametrize("align_corners", [True, False])
def test_fpa_merges_its_pyramid_step_by_step_and_adds_the_global_branch(align_corners):
    # FPA (Figure 3): the 1/8 level upsampled onto the 1/4 one, their sum onto the 1/2 one,
    # that sum to the input size as the attention; attention · mid + the global branch. Each
    # upsampling with the model's align_corners: at model level the final upsampling switches
    # too, so one of FPA's ignoring it would go unseen by the model-level ablation test.
    # The paper's configuration (average pooling, a per-channel pyramid, no conv biases); SMP's
    # is compared with SMP itself. Non-square, so that heights and widths cannot swap.
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 16, 24, 6)), jnp.float32)
    fpa = FPA(4, pyramid_features=4, pooling="avg", conv_bias=False, align_corners=align_corners)
    variables = fpa.init(jax.random.key(0), x, train=False)
    out, state = fpa.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    level = {k: v["__call__"][0] for k, v in state["intermediates"].items() if k != "__call__"}
    up = resize_bilinear(level["down3_2"], (4, 6), align_corners) + level["conv2"]
    up = resize_bilinear(up, (8, 12), align_corners) + level["conv1"]
    attention = resize_bilinear(up, (16, 24), align_corners)
    expected = attention * level["mid"] + level["branch1"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("align_corners", [True, False])
def test_gau_adds_the_upsampled_high_features_to_the_low_ones_gated_by_the_high_ones(
    align_corners,
):
    # GAU (Figure 4), the paper's gate: global average of the *high* features → 1×1 conv + BN
    # → ReLU, weighting the 3×3-conv low features; plus the high features upsampled with the
    # model's align_corners (hidden at model level by the final upsampling's switch).
    rng = np.random.default_rng(6)
    low = jnp.asarray(rng.standard_normal((2, 16, 24, 6)), jnp.float32)
    high = jnp.asarray(rng.standard_normal((2, 8, 12, 4)), jnp.float32)
    gau = GAU(4, gate="relu", conv_bias=False, align_corners=align_corners)
    variables = gau.init(jax.random.key(0), low, high, train=False)
    out, state = gau.apply(
        variables, low, high, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    reduced = state["intermediates"]["low"]["__call__"][0]
    assert variables["params"]["low"]["conv"]["kernel"].shape == (3, 3, 6, 4)
    kernel = variables["params"]["attention"]["conv"]["kernel"][0, 0]  # BN is the identity
    gate = jax.nn.relu(jnp.mean(high, axis=(1, 2)) @ kernel)[:, None, None, :]
    expected = resize_bilinear(high, (16, 24), align_corners) + reduced * gate
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_align_corners_reaches_the_decoder():
    # The factory hands it on; the decoder's own default is True (SMP's).
    model = models.create("pan", num_classes=3, backbone="resnet18", align_corners=False)
    assert model.decoder.align_corners is False and model.align_corners is False


def test_fpa_se_attention_is_a_sigmoid_channel_gate_on_the_1x1_features():
    # Table 1's SE row: the pyramid replaced by squeeze (global average of the input, 1×1 conv
    # to 1/16 of its channels, ReLU) and excitation (1×1 conv, sigmoid) gating mid's features.
    # test_every_ablation_switch_changes_the_model only sees that "se" changes the parameters.
    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 4, 4, 64)), jnp.float32)
    fpa = FPA(8, attention="se", global_branch=False, conv_bias=False)
    variables = fpa.init(jax.random.key(0), x, train=False)
    out, state = fpa.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    mid = state["intermediates"]["mid"]["__call__"][0]
    reduce, expand = variables["params"]["se_reduce"], variables["params"]["se_expand"]
    assert reduce["kernel"].shape == (1, 1, 64, 4)
    squeeze = jax.nn.relu(jnp.mean(x, axis=(1, 2)) @ reduce["kernel"][0, 0] + reduce["bias"])
    gate = jax.nn.sigmoid(squeeze @ expand["kernel"][0, 0] + expand["bias"])
    np.testing.assert_allclose(out, gate[:, None, None, :] * mid, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, overrides",
    [("pan", {}), ("fpa", {"fpa_attention": "se"}), ("gau", {}), ("psp", {}), ("aspp", {})],
)
def test_a_bfloat16_model_computes_every_layer_in_bfloat16(name, overrides):
    # dtype is handed down module by module; one left out (a GAU, the backbone, ASPP's last
    # ConvBN) computes in float32 and still gives logits within the tolerance of
    # test_bfloat16_logits_close_to_float32. Only the logits are float32, by design.
    model = models.create(name, num_classes=3, backbone="resnet18", dtype=jnp.bfloat16, **overrides)
    images = jnp.zeros((1, model.min_input_size, model.min_input_size, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    _, state = jax.eval_shape(
        functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"]),
        variables,
        images,
    )
    outputs = jax.tree_util.tree_leaves_with_path(state["intermediates"])
    float32 = [jax.tree_util.keystr(k) for k, v in outputs if v.dtype != jnp.bfloat16]
    assert float32 == ["['__call__'][0]"]
    assert len(outputs) > 50  # every module's output, not the logits alone


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_random_variables_have_the_shapes_of_init(name):
    """The host-filled stand-in the bench and tests use for `model.init`."""
    model = models.create(name, num_classes=5, backbone="resnet18", dtype=jnp.bfloat16)
    size = model.min_input_size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    filled = models.random_variables(model)
    assert jax.tree.structure(filled) == jax.tree.structure(shapes)
    for leaf, shape in zip(jax.tree.leaves(filled), jax.tree.leaves(shapes), strict=True):
        assert (leaf.shape, leaf.dtype) == (shape.shape, shape.dtype)
    stats = jax.tree_util.tree_leaves_with_path(filled["batch_stats"])
    assert all(np.all(v == (path[-1].key == "var")) for path, v in stats)  # identity BN


def test_random_variables_refuse_a_parameter_they_cannot_fill():
    import flax.linen as nn

    class Gamma(nn.Module):
        min_input_size = 8

        @nn.compact
        def __call__(self, x, train=False):
            return x * self.param("gamma", nn.initializers.ones, (3,))

    with pytest.raises(ValueError, match=r"no fill for .*gamma"):
        models.random_variables(Gamma())


def test_the_readme_models_snippet_runs():
    # It used names it never defined (rng, images, smp_model). Run on a small backbone and image.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    snippet = readme.split("## Models", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    small = snippet.replace("resnet101", "resnet18").replace("512, 512", "128, 128")
    namespace: dict = {}
    exec(small, namespace)
    assert namespace["logits"].shape == (2, 128, 128, 21)
    assert set(namespace["variables"]) == {"params", "batch_stats"}
