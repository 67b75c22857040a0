"""The config files: each loads through the command-line flag and builds its model; every row of
configs/voc_ablation.py builds the network its table row describes."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from flax import traverse_util
from ml_collections import config_flags

from configs import voc_ablation
from pan_jax import checkpointing, models, train
from pan_jax.config_errors import ConfigError
from pan_jax.convert import download

REPO = Path(__file__).resolve().parents[1]


def load(argument: str, *overrides: str):
    """The config `--config=argument` gives, parsed by the same flag as pan_jax.main's."""
    argv = ["prog", f"--config={REPO / argument}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def resnet18_model(config):
    """(model, images, abstract variables) of `config` on ResNet-18, to keep the checks quick."""
    config = config.copy_and_resolve_references()
    config.model.backbone = "resnet18"
    model = train.create_model(config)
    images = jnp.zeros((1, 128, 128, 3))
    return model, images, jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))


def decoder_kernels(config) -> dict[str, tuple[int, ...]]:
    """Shapes of the decoder's and head's conv kernels."""
    _, _, variables = resnet18_model(config)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {
        name.removesuffix("/kernel").removesuffix("/conv"): leaf.shape
        for name, leaf in flat.items()
        if name.endswith("kernel") and not name.startswith("backbone")
    }


def fpa_max_pools(config) -> int:
    """How many 2×2 max pools the forward runs (FPA's pyramid; the stem's 3×3 one is not 2×2)."""
    model, images, variables = resnet18_model(config)
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, images, train=False))(variables))
    pools = jaxpr.split("reduce_window_max[")[1:]  # text: counts inside nested jaxprs too
    return sum("window_dimensions=(1, 2, 2, 1)" in pool.split("]")[0] for pool in pools)


@pytest.mark.parametrize("name", ["configs/voc.py", "configs/cityscapes.py", "configs/demo.py"])
def test_each_config_file_loads_and_builds_its_model(name):
    config = load(name, "--config.model.backbone=resnet18")
    assert decoder_kernels(config)["head"][-1] == config.data.num_classes


def test_the_paper_configs_start_from_the_papers_imagenet_backbone_and_the_demo_from_scratch():
    """Paper §3.3: ResNet-101 pretrained on ImageNet, with PSPNet's deep stem: Gluon's v1s."""
    configs = [load(name) for name in ("configs/voc.py", "configs/cityscapes.py")]
    configs += [voc_ablation.get_config(row) for row in voc_ablation.ROWS]
    for config in configs:
        assert config.model.pretrained == download.IMAGENET
        backbone = train.create_model(config).backbone
        arch = {"depth": backbone.depth, "stem": backbone.stem, "avg_down": backbone.avg_down}
        assert download.imagenet_source(arch) == "hf-hub:timm/resnet101s.gluon_in1k"
    assert load("configs/demo.py").model.pretrained == ""  # no download in the demo


def test_the_paper_configs_train_and_evaluate_with_the_protocol_they_state():
    """Paper §4 (README, docs/reproduction.md): batch 16, poly 0.9 from 4e-3, SGD momentum 0.9,
    weight decay 1e-4, flip and scale 0.5–2.0; crop 512 on VOC, 768 on Cityscapes, whose
    validation images are scored in 768 windows at stride 512 (configs/cityscapes.py)."""
    # Only their pretrained backbone was checked: a batch of 8, another learning rate, or
    # Cityscapes scored on whole 1024×2048 images went unseen.
    voc, cityscapes = load("configs/voc.py"), load("configs/cityscapes.py")
    for config, crop in ((voc, 512), (cityscapes, 768)):
        optimizer = (config.learning_rate, config.poly_power, config.momentum, config.weight_decay)
        assert optimizer == (4e-3, 0.9, 0.9, 1e-4)
        assert (config.batch_size, config.grad_accum_steps, config.warmup_steps) == (16, 1, 0)
        augmentation = (config.data.min_scale, config.data.max_scale, config.data.flip)
        assert config.data.crop_size == crop and augmentation == (0.5, 2.0, True)
    assert (voc.num_train_steps, voc.eval.mode, voc.eval.scales, voc.eval.flip) == (
        30_000,
        "whole",
        (1.0,),
        False,
    )
    assert (voc.eval.crop_size, voc.eval.stride) == (512, 341)  # mmseg's VOC windows
    assert (cityscapes.num_train_steps, cityscapes.data.name, cityscapes.data.num_classes) == (
        40_000,
        "cityscapes",
        19,
    )
    assert (cityscapes.eval.mode, cityscapes.eval.crop_size, cityscapes.eval.stride) == (
        "slide",
        768,
        512,
    )


def test_every_model_switch_is_settable_on_the_command_line():
    """README: every switch is a keyword of models.create, and any field overrides."""
    every_override = set().union(*(models.valid_overrides(n) for n in models.MODEL_NAMES))
    assert set(models.OVERRIDE_TYPES) == every_override - {"dtype"}
    config = load(
        "configs/voc.py",
        "--config.model.overrides.output_stride=8",
        "--config.model.overrides.fpa_kernels=(3,3,3)",
        "--config.model.overrides.fpa_pooling=max",
        "--config.model.overrides.fpa_global_branch=False",
    )
    spec = train.model_spec(config)
    assert spec["overrides"] == {
        "output_stride": 8,
        "fpa_kernels": [3, 3, 3],
        "fpa_pooling": "max",
        "fpa_global_branch": False,
    }
    model = train.create_model(config)
    assert model.backbone.output_stride == 8 and model.decoder.fpa_kernels == (3, 3, 3)
    assert train.model_spec(load("configs/voc.py"))["overrides"] == {}  # None: the default


def test_switching_the_model_drops_the_config_files_options_it_does_not_take(caplog):
    config = load("configs/demo.py", "--config.model.name=fcn")  # demo sets PAN's widths
    spec = train.model_spec(config)
    assert spec["name"] == "fcn" and "pyramid_features" not in spec["overrides"]
    assert "decoder_channels" not in spec["overrides"]  # fcn has no decoder
    assert spec["overrides"]["stem"] == "torchvision"  # what fcn takes stays
    assert "model 'fcn' does not take" in caplog.text and "pyramid_features=64" in caplog.text
    assert "decoder_channels=64" in caplog.text
    train.create_model(config)
    with config.unlocked():  # a key no model takes (in a config file) is not dropped: refused
        config.model.overrides.unknown_switch = 1
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['unknown_switch'\]"):
        train.create_model(config)


def test_a_dtype_among_the_overrides_is_refused_for_config_model_dtype():
    """The overrides are stored in every checkpoint's spec, and inference builds the spec's
    model: a dtype there would be ignored by training and taken by prediction."""
    config = load("configs/demo.py")
    with config.unlocked():  # as a config file can write it
        config.model.overrides.dtype = "bfloat16"
    with pytest.raises(ConfigError, match=r"overrides\.dtype='bfloat16'.*config\.model\.dtype"):
        train.model_spec(config)


def test_an_ablation_row_is_chosen_after_the_colon_and_fields_still_override():
    config = load("configs/voc_ablation.py:fpa_c333_max", "--config.batch_size=8")
    assert config.model.name == "fpa" and config.batch_size == 8
    assert config.paper_miou_percent == 77.13
    with pytest.raises(ValueError, match=r"needs a row.*fpa_c357_ave_gp.*gau_gp_1x1"):
        voc_ablation.get_config("fpa_c999")
    with pytest.raises(ValueError, match=r"needs a row"):
        voc_ablation.get_config()


@pytest.mark.parametrize("row", list(voc_ablation.ROWS))
def test_each_row_builds_the_network_of_its_table_row(row):
    config = voc_ablation.get_config(row)
    kernels = decoder_kernels(config)
    fpa = {k.split("/")[2]: v for k, v in kernels.items() if k.startswith("decoder/fpa/")}
    gau = {k: v for k, v in kernels.items() if k.startswith("decoder/gau")}
    if row == "fcn":
        assert list(kernels) == ["head"] and kernels["head"][:2] == (1, 1)
    elif row.startswith("fpa_"):
        assert not gau and kernels["head"][:2] == (1, 1)  # FPA with direct upsampling
        if row == "fpa_se":
            assert {"se_reduce", "se_expand"} <= set(fpa) and "down1" not in fpa
        else:
            expected = (7, 5, 3) if "c357" in row else (3, 3, 3)
            assert tuple(fpa[k][0] for k in ("down1", "down2", "down3_1")) == expected
            assert fpa_max_pools(config) == (3 if "_max" in row else 0)
        assert ("branch1" in fpa) == row.endswith("_gp")
    elif row.startswith("gau_"):
        assert not fpa and "decoder/top" in kernels  # GAU on a 1×1 projection of layer4
        lows = [v for k, v in gau.items() if k.endswith("/low")]
        gates = [k for k in gau if k.endswith("/attention")]
        assert len(lows) == 3 and {v[0] for v in lows} == {1 if row == "gau_gp_1x1" else 3}
        assert len(gates) == (0 if row == "gau_no_gp" else 3)
    elif row.startswith("pan"):
        assert fpa["down1"][0] == 7 and "branch1" in fpa and len(gau) == 6
        assert fpa_max_pools(config) == 0
    else:
        assert row in ("psp", "aspp") and config.model.name == row


def test_table5_rows_differ_only_in_evaluation_so_they_score_one_trained_pan():
    specs = {row: train.model_spec(voc_ablation.get_config(row)) for row in ("pan", "pan_ms")}
    checkpointing.check_spec(specs["pan"], specs["pan_ms"], "test")  # raises if they differ
    ms_flip = voc_ablation.get_config("pan_ms_flip")
    assert ms_flip.eval.scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) and ms_flip.eval.flip
    assert voc_ablation.get_config("pan").eval.scales == (1.0,)


def test_the_reproduction_doc_lists_every_row_with_the_papers_figure():
    text = (REPO / "docs" / "reproduction.md").read_text()
    listed = dict(re.findall(r"^\| `(\w+)` \|.*\| ([\d.]+) \| [^|]* \|$", text, re.MULTILINE))
    assert listed == {row: f"{fields[-1]:.2f}" for row, fields in voc_ablation.ROWS.items()}
