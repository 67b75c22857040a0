"""Pretrained weights by name ("imagenet", "hf-hub:...", URLs): fetched once from a local stand-in
for the Hugging Face Hub that answers as the Hub does (a redirect announcing sha256 and size),
checked, cached, and loaded into the model; damaged downloads leave nothing behind."""

import hashlib

import jax
import numpy as np
import pytest
import timm
import torch

from pan_jax import models
from pan_jax.convert import (
    ConversionError,
    download,
    from_imagenet,
    load_pretrained,
    read_state_dict,
)
from pan_jax.convert.imagenet import detect_resnet
from tests.helpers import HUB_RESNET18, resnet18_safetensors

REPO_FILE = HUB_RESNET18


@pytest.fixture(scope="module")
def resnet18_bytes():
    return resnet18_safetensors()


def cached_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_imagenet_weights_are_downloaded_once_checked_and_loaded(hub, resnet18_bytes, tmp_path):
    hub.serve_like_the_hub(REPO_FILE, resnet18_bytes)
    model = models.create("pan", num_classes=3, backbone="resnet18", stem="torchvision")
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 128, 128, 3))))

    variables, report = load_pretrained(template, "imagenet", "timm", model=model)
    assert report.source == "hf-hub:timm/resnet18.tv_in1k"
    cached = tmp_path / "cache" / "weights" / "huggingface" / "timm" / "resnet18.tv_in1k"
    assert cached_files(tmp_path) == ["model.safetensors"]
    assert (cached / "model.safetensors").read_bytes() == resnet18_bytes
    expected, _ = from_imagenet(cached / "model.safetensors")
    for collection in ("params", "batch_stats"):
        got = jax.tree.leaves(variables[collection]["backbone"])
        want = jax.tree.leaves(expected[collection])
        assert len(got) == len(want) > 0
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert report.not_loaded and all("/backbone/" not in n for n in report.not_loaded)

    downloads = hub.downloads()  # the Hub's redirect, then its storage
    assert (
        len(downloads) == 2 and downloads[0] == REPO_FILE and downloads[1].startswith("/storage/")
    )
    load_pretrained(template, "imagenet", "timm", model=model)  # from the cache, not the server
    assert hub.downloads() == downloads


def test_other_sources_by_hub_repo_file_and_url(hub, resnet18_bytes):
    hub.routes["/timm/x/resolve/main/weights/other.safetensors"] = (200, {}, resnet18_bytes)
    digest = hashlib.sha256(resnet18_bytes).hexdigest()
    hub.routes[f"/models/resnet18-{digest[:8]}.safetensors"] = (200, {}, resnet18_bytes)
    sources = (
        "hf-hub:timm/x/weights/other.safetensors",
        f"{hub.url}/models/resnet18-{digest[:8]}.safetensors",
    )
    for source in sources:
        state_dict = read_state_dict(source)
        assert detect_resnet(state_dict)["depth"] == 18


@pytest.mark.parametrize(
    "damage, message",
    [
        ("sha256", r"damaged: sha256 [0-9a-f]{64}, the server announced 0{64}"),
        ("size", r"damaged: \d+ bytes, the server announced \d+"),
        ("name_hash", r"does not start with 00000000, as its name says"),
        ("truncated", r"damaged: \d+ bytes, the server announced \d+|connection closed"),
        ("missing", r"HTTP 404"),
    ],
)
def test_a_failed_or_damaged_download_is_refused_and_leaves_nothing(
    hub, resnet18_bytes, tmp_path, monkeypatch, damage, message
):
    source = "hf-hub:timm/resnet18.tv_in1k"
    if damage == "sha256":
        hub.serve_like_the_hub(REPO_FILE, resnet18_bytes, sha256="0" * 64)
        # The Hub's redirect also sends an ETag, the git hash of the LFS pointer (no sha256):
        # read first, it would hide the announced hash, and the damaged file be kept.
        hub.routes[REPO_FILE][1]["ETag"] = '"' + hashlib.sha1(b"lfs pointer").hexdigest() + '"'
    elif damage == "size":
        hub.serve_like_the_hub(REPO_FILE, resnet18_bytes, size=len(resnet18_bytes) + 1)
    elif damage == "name_hash":  # as download.pytorch.org names its files
        monkeypatch.setattr(download, "HASHED_NAME_HOSTS", {"127.0.0.1"})
        source = f"{hub.url}/models/resnet18-00000000.safetensors"
        hub.routes["/models/resnet18-00000000.safetensors"] = (200, {}, resnet18_bytes)
    elif damage == "truncated":  # announces the whole length, sends half, closes
        half = resnet18_bytes[: len(resnet18_bytes) // 2]
        hub.routes[REPO_FILE] = (200, {"Content-Length": str(len(resnet18_bytes))}, half)
    with pytest.raises(download.DownloadError, match=message) as raised:
        read_state_dict(source)
    assert source in str(raised.value) and "/resnet18" in str(raised.value)  # names the URL
    assert cached_files(tmp_path) == []  # no partial file, nothing passing for the weights


def test_urls_never_share_a_cache_file_and_names_stay_inside_the_cache(hub, resnet18_bytes):
    first, second = (f"{hub.url}/v{i}/model.safetensors" for i in (1, 2))
    hub.routes["/v1/model.safetensors"] = (200, {}, resnet18_bytes)
    hub.routes["/v2/model.safetensors"] = (200, {}, b"another file")
    assert download.fetch(first).read_bytes() == resnet18_bytes
    assert download.fetch(second).read_bytes() == b"another file"
    # A date in a name is no hash: outside torch.hub's hosts the name is not checked.
    hub.routes["/pan-20240101.safetensors"] = (200, {}, resnet18_bytes)
    download.fetch(f"{hub.url}/pan-20240101.safetensors")
    with pytest.raises(ValueError, match="expected hf-hub:OWNER/REPO"):
        download.fetch("hf-hub:../../tmp/x")
    user = download.source_url("https://user:token@example.com/w/x.pth")[1]
    assert "token" not in str(user) and user.parts[:2] == ("urls", "example.com")
    # A name of no checkpoint format is refused before anything is downloaded.
    with pytest.raises(ConversionError, match="unknown checkpoint format"):
        read_state_dict(f"{hub.url}/get?file=a.pth")
    assert not any(path.startswith("/get") for path in hub.downloads())


def test_an_unreachable_https_url_names_the_cache_file_to_copy_it_to(hub, tmp_path):
    # Real weights URLs are https (download.pytorch.org); taken for local paths they would be
    # "not found". Offline, as on clusters without internet, the message is the only way in.
    source = "https://127.0.0.1:9/models/resnet18-f37072fd.pth"
    with pytest.raises(download.DownloadError) as raised:
        read_state_dict(source)
    target = tmp_path / "cache" / "weights" / download.source_url(source)[1]
    assert f"copy the file to {target} " in str(raised.value)


def test_imagenet_weights_name_real_timm_checkpoints_of_each_variant():
    """Each entry is a timm checkpoint on the Hub whose keys and shapes are of that variant."""
    for (depth, stem, avg_down), repo in download.IMAGENET_WEIGHTS.items():
        name = repo.removeprefix("timm/")
        assert timm.models.get_pretrained_cfg(name).hf_hub_id == repo
        with torch.device("meta"):
            model = timm.create_model(name.split(".")[0], pretrained=False)
        shapes = {  # zero-stride arrays: nothing is allocated
            k: np.broadcast_to(np.zeros((), np.float32), v.shape)
            for k, v in model.state_dict().items()
        }
        assert detect_resnet(shapes, name) == {"depth": depth, "stem": stem, "avg_down": avg_down}


def test_unknown_variants_and_sources_are_refused_with_what_is_known():
    with pytest.raises(ValueError, match=r"no ImageNet weights .* resnet18 with stem 'deep64'"):
        download.imagenet_source({"depth": 18, "stem": "deep64", "avg_down": False})
    with pytest.raises(ValueError, match="expected hf-hub:OWNER/REPO"):
        download.fetch("hf-hub:timm")
    model = models.create("fcn", num_classes=3, backbone="resnet18")
    with pytest.raises(ValueError, match="needs model= and kind timm or torchvision"):
        load_pretrained({}, "imagenet", "smp", model=model)
