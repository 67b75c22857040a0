"""Inference on whole images (pan_jax.inference): every mode and view against a plain forward
pass on the unpadded image, mmseg's sliding windows and the model's bilinear resize (which
tests/test_layers.py holds to torch's)."""

import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pan_jax import inference, models
from pan_jax.models import random_variables
from pan_jax.models.layers import resize_bilinear
from pan_jax.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize

NUM_CLASSES = 5


def fcn_with_random_weights():
    # Inference does not care which model it runs: the FCN baseline compiles fastest.
    model = models.create("fcn", num_classes=NUM_CLASSES, backbone="resnet18")
    return model, random_variables(model)


@pytest.fixture(scope="module")
def model_and_variables():
    return fcn_with_random_weights()


def random_image(height, width, seed=0):
    return np.random.default_rng(seed).normal(size=(height, width, 3)).astype(np.float32)


def random_uint8_image(height, width, seed=0):
    """Smooth, so that rescaling it differs from rescaling its rounded values."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)
    return cv2.GaussianBlur(noise, (5, 5), 0)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, images):
    return model.apply(variables, images, train=False)


def direct_logits(model, variables, image):
    """A plain forward pass on the unpadded image: the reference for every mode."""
    return np.asarray(_apply(model, variables, jnp.asarray(image)[None])[0])


def binary_model(image):
    """SMP's binary PAN (classes=1) stand-in whose logits on `image` are above 0 for half of
    the pixels."""
    model = models.create("fcn", num_classes=1, backbone="resnet18")
    variables = random_variables(model)
    logits = direct_logits(model, variables, image)[..., 0]
    params = jax.tree.map(lambda x: x, variables["params"])
    params["head"]["bias"] = params["head"]["bias"] - np.median(logits)
    return model, {**variables, "params": params}


def test_a_one_class_model_masks_where_its_sigmoid_passes_one_half():
    # A mask by argmax would be all 0.
    image = random_image(128, 128)
    model, variables = binary_model(image)
    logits = direct_logits(model, variables, image)[..., 0]
    mask = inference.predict_image(model, variables, image, pad_multiple=1)
    np.testing.assert_array_equal(mask, logits > 0)
    assert 0.3 < mask.mean() < 0.7
    # Views merged as mean probabilities: the sigmoid, not a softmax over one class (always 1).
    mirrored = direct_logits(model, variables, image[:, ::-1])[:, ::-1, 0]
    mean = (jax.nn.sigmoid(logits) + jax.nn.sigmoid(mirrored)) / 2
    both = inference.predict_image(model, variables, image, flip=True, pad_multiple=1)
    np.testing.assert_array_equal(both, np.asarray(mean) > 0.5)
    assert (both != mask).any()  # the flipped view counts


@pytest.mark.parametrize("size, pad_multiple", [((128, 128), 128), ((131, 150), 1)])
def test_multiscale_with_scale_one_and_no_flip_equals_single_scale(
    model_and_variables, size, pad_multiple
):
    model, variables = model_and_variables
    image = random_image(*size, seed=2)
    reference = np.argmax(direct_logits(model, variables, image), axis=-1)
    options = dict(pad_multiple=pad_multiple, flip=False)
    single = inference.predict_image(model, variables, image, **options)
    one_scale = inference.predict_image(model, variables, image, scales=(1.0,), **options)
    # Two identical views go through the softmax-averaging path of multi-scale inference.
    merged = inference.predict_image(model, variables, image, scales=(1.0, 1.0), **options)
    np.testing.assert_array_equal(single, reference)
    np.testing.assert_array_equal(one_scale, reference)
    np.testing.assert_array_equal(merged, reference)


def test_predict_image_at_another_size_is_the_whole_map(model_and_variables):
    # It cut the map at out_size to the image's size: the top-left corner, silently.
    model, variables = model_and_variables
    image = random_image(64, 80, seed=4)
    classes = inference.predict_image(model, variables, image, out_size=(128, 100), flip=True)
    scores = inference.predict_scores(model, variables, image, out_size=(128, 100), flip=True)
    assert classes.shape == (128, 100)
    np.testing.assert_array_equal(classes, np.argmax(np.asarray(scores)[:128, :100], axis=-1))


def test_views_are_merged_by_averaging_softmax_probabilities(model_and_variables):
    model, variables = model_and_variables
    image = random_image(100, 120, seed=9)

    def single_view(picture, scale):  # one view: its logits at the original size
        return np.asarray(inference.predict_scores(model, variables, picture, scales=(scale,)))

    views = []
    for scale in (0.75, 1.5):
        views.append(single_view(image, scale)[:100, :120])
        views.append(single_view(image[:, ::-1], scale)[:100, :120][:, ::-1])  # mirrored back
    expected = np.mean([jax.nn.softmax(v, axis=-1) for v in views], axis=0)
    merged = inference.predict_scores(model, variables, image, scales=(0.75, 1.5), flip=True)
    # 1e-5: the evaluator flips after rescaling, this reference before (cv2 rounding differs).
    np.testing.assert_allclose(np.asarray(merged)[:100, :120], expected, rtol=0, atol=1e-5)


def test_flip_averaging_of_a_mirror_symmetric_input_is_mirror_symmetric(model_and_variables):
    model, variables = model_and_variables
    half = random_image(120, 60, seed=3)
    image = np.concatenate([half, half[:, ::-1]], axis=1)  # 120×120: also padded at the right
    plain = inference.predict_image(model, variables, image)
    # The network itself is not mirror-equivariant, so without flip the prediction is not
    # symmetric; that is what makes the flipped check below meaningful.
    assert (plain != plain[:, ::-1]).mean() > 0.05
    flipped = inference.predict_image(model, variables, image, flip=True)
    np.testing.assert_array_equal(flipped, flipped[:, ::-1])
    scores = np.asarray(inference.predict_scores(model, variables, image, flip=True))[:120, :120]
    np.testing.assert_allclose(scores, scores[:, ::-1], rtol=0, atol=1e-6)
    # With rescaled views too (resampling is symmetric up to float rounding).
    multi = np.asarray(
        inference.predict_scores(model, variables, image, scales=(0.75, 1.25), flip=True)
    )[:120, :120]
    np.testing.assert_allclose(multi, multi[:, ::-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "size, crop, pad_multiple",
    [((128, 256), (128, 256), 128), ((128, 256), 300, 128), ((131, 150), (131, 150), 1)],
)
def test_sliding_window_as_large_as_the_image_equals_whole(
    model_and_variables, size, crop, pad_multiple
):
    model, variables = model_and_variables
    image = random_image(*size, seed=4)
    h, w = size
    whole = np.asarray(inference.predict_scores(model, variables, image, pad_multiple=pad_multiple))
    slide = np.asarray(
        inference.predict_scores(
            model,
            variables,
            image,
            mode="slide",
            crop_size=crop,
            stride=17,
            pad_multiple=pad_multiple,
        )
    )
    np.testing.assert_allclose(slide[:h, :w], whole[:h, :w], rtol=0, atol=1e-6)
    np.testing.assert_allclose(slide[:h, :w], direct_logits(model, variables, image), atol=1e-4)


def test_sliding_windows_follow_mmseg(model_and_variables):
    model, variables = model_and_variables
    image = random_image(128, 200, seed=5)
    # mmseg: grid = ceil((200 − 128) / 64) + 1 = 3 columns at x = 0, 64 and 200 − 128 = 72.
    total, count = np.zeros((128, 200, NUM_CLASSES)), np.zeros((128, 200, 1))
    for x in (0, 64, 72):
        total[:, x : x + 128] += direct_logits(model, variables, image[:, x : x + 128])
        count[:, x : x + 128] += 1
    expected = total / count
    scores = inference.predict_scores(
        model, variables, image, mode="slide", crop_size=128, stride=64
    )
    np.testing.assert_allclose(np.asarray(scores)[:128, :200], expected, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(
        inference.predict_image(model, variables, image, mode="slide", crop_size=128, stride=64),
        np.argmax(expected, axis=-1),
    )


def test_compilations_are_bounded_by_buckets(model_and_variables):
    model, variables = model_and_variables
    inference.predict_image(model, variables, random_image(128, 128))  # compile the 128² bucket
    before = inference._forward._cache_size()
    for i, (h, w) in enumerate([(100, 101), (37, 128), (128, 64), (77, 77), (3, 120), (128, 1)]):
        inference.predict_image(model, variables, random_image(h, w, seed=i))
    # Sliding windows of images of any size larger than the crop: the crop's one program.
    for i, (h, w) in enumerate([(200, 150), (131, 260), (256, 256)]):
        options = {"mode": "slide", "crop_size": 128, "stride": 100}
        inference.predict_image(model, variables, random_image(h, w, seed=i), **options)
    assert inference._forward._cache_size() == before


@pytest.mark.parametrize("align_corners", [True, False])
def test_resize_logits_equals_torch_bilinear(align_corners):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(40, 50, 3)).astype(np.float32)
    valid = logits[:29, :41]
    for out in [(29, 41), (57, 23), (12, 90)]:
        expected = resize_bilinear(jnp.asarray(valid)[None], out, align_corners)[0]
        got = inference.resize_logits(logits, (29, 41), out, align_corners=align_corners)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        mirrored = inference.resize_logits(
            logits[:29, :41][:, ::-1],
            (29, 41),
            out,
            align_corners=align_corners,
            flip=True,
            padded_out=(out[0] + 3, out[1] + 5),
        )
        np.testing.assert_allclose(mirrored[: out[0], : out[1]], expected, rtol=0, atol=1e-5)


def test_view_sizes_are_mmsegmentations():
    """mmcv's Resize(scale_factor, keep_ratio=True) over VOC-like and Cityscapes sizes: one
    rounding per side, as pan_jax had, gave another size for about 1 view in 20."""
    from tests.helpers import allow_mmseg_import

    allow_mmseg_import()
    from mmcv.transforms import Resize

    sizes = [(h, 500) for h in range(100, 501, 7)] + [(1024, 2048), (101, 107), (150, 191)]
    for height, width in sizes + [(w, h) for h, w in sizes]:
        image = np.zeros((height, width, 1), np.uint8)
        for scale in (*inference.MS_SCALES, 2.0):
            view = Resize(scale_factor=scale, keep_ratio=True)({"img": image})["img"]
            assert inference.scaled_size(height, width, scale) == view.shape[:2], (
                height,
                width,
                scale,
            )


def test_tiny_inputs_are_padded_up_to_the_model_minimum_and_views_keep_a_pixel():
    # Unpadded (pad_multiple=1), an image below the model's minimum must still be padded up to
    # it, and a one-pixel image at scale 0.25 keep a pixel (cv2.resize refuses a 0×0 view).
    assert inference.padded_size(5, 1, 16) == 16
    assert inference.padded_size(40, 16, 128) == 128
    assert inference.padded_size(129, 128, 16) == 256
    assert inference.view_shapes((5, 7), (1.0,), 1, 16) == ((16, 16),)
    assert inference.scaled_size(1, 1, 0.25) == (1, 1)
    assert inference.scaled_size(2, 9, 0.25) == (1, 2)


@pytest.mark.parametrize(
    "options",
    [{}, {"mode": "slide", "crop_size": 96, "stride": 64}],
    ids=["whole", "slide"],
)
def test_multiscale_flip_equals_mmsegmentations_test_time_augmentation(
    model_and_variables, options
):
    """mmseg's own code on the same network: its Resize and RandomFlip views of the uint8
    image, its data preprocessor's normalization, its whole or sliding-window inference, its
    un-flip and resize to the original shape (`postprocess_result`) and SegTTAModel's merge of
    softmax probabilities."""
    import torch
    from mmengine.config import ConfigDict

    from tests.helpers import allow_mmseg_import

    allow_mmseg_import()
    from mmcv.transforms import RandomFlip, Resize
    from mmseg.models.data_preprocessor import SegDataPreProcessor
    from mmseg.models.segmentors import EncoderDecoder, SegTTAModel
    from mmseg.structures import SegDataSample

    model, variables = model_and_variables

    class Segmentor:  # mmseg's EncoderDecoder whose network is ours
        inference = EncoderDecoder.inference
        slide_inference = EncoderDecoder.slide_inference
        whole_inference = EncoderDecoder.whole_inference
        postprocess_result = EncoderDecoder.postprocess_result
        out_channels = NUM_CLASSES
        align_corners = model.align_corners
        test_cfg = ConfigDict(
            mode=options.get("mode", "whole"),
            crop_size=(options.get("crop_size"),) * 2,
            stride=(options.get("stride"),) * 2,
        )

        def encode_decode(self, inputs, batch_img_metas):
            images = inputs.permute(0, 2, 3, 1).numpy()
            logits = [direct_logits(model, variables, image) for image in images]
            return torch.from_numpy(np.stack(logits)).permute(0, 3, 1, 2)

    class TestTimeAugmentation:
        merge_preds = SegTTAModel.merge_preds
        module = Segmentor()

    # The ImageNet statistics of mmseg's configs; images already RGB (its loader reads BGR).
    preprocess = SegDataPreProcessor(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    # 150×191: mmcv rounds its 0.75 view twice (112×143, not 113×143)
    image = random_uint8_image(150, 191, seed=11)
    scales = (0.75, 1.25)
    segmentor, samples = Segmentor(), []
    for scale in scales:
        for flip in (False, True):
            view = Resize(scale_factor=scale, keep_ratio=True)({"img": image.copy()})
            view = RandomFlip(prob=float(flip), direction="horizontal")(view)
            meta = {
                "img_path": "image.png",
                "ori_shape": image.shape[:2],
                "img_shape": view["img"].shape[:2],
                "flip": flip,
                "flip_direction": "horizontal",
            }
            sample = SegDataSample(metainfo=meta)
            pixels = torch.from_numpy(np.ascontiguousarray(view["img"])).permute(2, 0, 1)
            inputs = preprocess({"inputs": [pixels], "data_samples": [sample]})["inputs"]
            logits = segmentor.inference(inputs, [meta])
            samples += segmentor.postprocess_result(logits, [sample])
    merged = TestTimeAugmentation().merge_preds([samples])[0]
    expected = np.mean([torch.softmax(s.seg_logits.data, 0).numpy() for s in samples], axis=0)

    # pad_multiple=1: mmseg runs every view unpadded.
    options = {"scales": scales, "flip": True, "pad_multiple": 1, **options}
    scores = np.asarray(inference.predict_scores(model, variables, image, **options))
    np.testing.assert_allclose(scores[:150, :191], expected.transpose(1, 2, 0), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(
        inference.predict_image(model, variables, image, **options),
        merged.pred_sem_seg.data[0].numpy(),
    )


@pytest.mark.parametrize(
    "size, options",
    [
        ((128, 128), {"pad_multiple": 1}),
        ((100, 120), {}),  # padded to 128²
        ((150, 190), {"mode": "slide", "crop_size": 128, "stride": 64}),
        ((100, 120), {"mode": "slide", "crop_size": 128}),  # a padded window
    ],
    ids=["whole", "whole-padded", "slide", "slide-padded"],
)
def test_a_uint8_image_equals_its_normalized_copy(model_and_variables, size, options):
    # Normalized on the device, with the padding set to 0 (the mean pixel) after normalizing.
    model, variables = model_and_variables
    image = random_uint8_image(*size, seed=12)
    as_uint8 = np.asarray(inference.predict_scores(model, variables, image, **options))
    normalized = np.asarray(inference.predict_scores(model, variables, normalize(image), **options))
    # Logits of about ±15: float32 rounding (XLA divides by the std via its reciprocal).
    np.testing.assert_allclose(as_uint8, normalized, rtol=0, atol=1e-4)


def test_an_image_of_another_kind_is_refused(model_and_variables):
    model, variables = model_and_variables
    with pytest.raises(ValueError, match=r"picture: expected a uint8 RGB .* got uint16"):
        inference.checked_image(np.zeros((8, 8, 3), np.uint16), "picture")
    with pytest.raises(ValueError, match=r"expected a uint8 RGB .* \(8, 8\)"):
        inference.predict_image(model, variables, np.zeros((8, 8), np.uint8))


def test_the_multiscale_set_is_the_papers():
    # --multiscale and the README promise the paper's (and mmseg's) six ratios.
    assert inference.MS_SCALES == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def test_options_accept_tiling_windows_and_refuse_empty_sizes():
    # A stride equal to the crop tiles the image without overlap: every pixel is predicted.
    good = {"mode": "slide", "scales": (1.0,), "crop_size": 128, "stride": 128, "pad_multiple": 1}
    assert inference.check_options(**good)["stride"] == (128, 128)
    # Zero scales, padding, windows or strides would fail later, far from the option's name.
    for bad, message in [
        ({"scales": (0.0, 1.0)}, r"scales=\(0\.0, 1\.0\): expected one or more positive"),
        ({"pad_multiple": 0}, r"pad_multiple=0: expected an integer >= 1"),
        ({"crop_size": (0, 128)}, r"crop_size must be a positive int"),
        ({"stride": 0}, r"stride must be a positive int"),
    ]:
        with pytest.raises(ValueError, match=message):
            inference.check_options(**{**good, **bad})


def test_a_window_shorter_than_the_crop_is_padded_to_the_crop_at_most(model_and_variables):
    # Rows of an image shorter than the crop (90 < 128) are padded up to the crop, never to
    # their padding bucket when it is larger (192): such images share the crop's program with
    # every larger one, and their windows see no more padding than the crop's.
    model, variables = model_and_variables
    options = {"mode": "slide", "crop_size": 128, "stride": 100, "pad_multiple": 192}
    inference.predict_image(model, variables, random_image(150, 150), **options)
    before = inference._forward._cache_size()
    inference.predict_image(model, variables, random_image(90, 150, seed=1), **options)
    assert inference._forward._cache_size() == before
