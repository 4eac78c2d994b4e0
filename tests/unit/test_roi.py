"""Lesion-aware classification: LesionBox / CropResize, the composed model, its training, configs.

Every model is tiny (64x64 inputs, 32x32 U-Net of 4 filters, one epoch a phase). Segmenters
whose output is known come from a fixed 1x1 convolution: ``logits = 40 x - 20``, so a pixel
brighter than 0.5 is lesion and the box follows the planted bright square.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import AugmentConfig, ModelConfig, RoiConfig, parse_params, segmenter_config
from breastscan.data.loading import RowSpec, SplitData, load_rows
from breastscan.evaluation.crossval import load_benchmark, segmenter_mismatch
from breastscan.imaging.files import write_mask, write_png
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.models import CropResize, LesionBox, build_augmentation, build_classifier, build_unet
from breastscan.models.gradcam import grad_cam, paste_into_boxes
from breastscan.models.roi import (
    build_roi_classifier,
    copy_classifier_weights,
    crop_config,
    lesion_boxes,
    lesion_crops,
    segmenter_data,
)
from breastscan.training.loop import train_model

REPO = Path(__file__).resolve().parents[2]
BUSI = REPO / "benchmarks" / "busi.yaml"
SEG = (32, 32)
NO_AUGMENT = AugmentConfig(flip=False, rotation_deg=0.0, brightness=0.0, contrast=0.0)
ROI = RoiConfig(seg_size=SEG, seg_filters=4, seg_depth=2, seg_epochs=1, seg_learning_rate=0.003,
                seg_batch_size=8, crop_size=(32, 32), margin=1.5, min_side=0.15, threshold=0.5)
TUMOR = ModelConfig(name="tumor", task="classification", dataset="ultrasound", label="pathology",
                    classes=("benign", "malignant", "normal"), base_filters=4, dropout=0.0,
                    preprocess=PreprocessSpec(height=64, width=64), epochs=1, batch_size=8, patience=0,
                    imbalance="none", augment=NO_AUGMENT, roi=ROI)

# 64 px squares aligned to even pixels, so the area resize to 32 px keeps them sharp.
SQUARES = ((slice(16, 32), slice(16, 32)), (slice(32, 48), slice(8, 24)))
# Their boxes by hand (32 px U-Net): lesion 8 px, side 1.5 x 8 = 12, centred on the lesion.
SQUARE_BOXES = np.array([[6 / 32, 6 / 32, 18 / 32, 18 / 32],     # rows/cols 8..15: centre (12, 12)
                         [14 / 32, 2 / 32, 26 / 32, 14 / 32]],  # rows 16..23, cols 4..11: centre (20, 8)
                        np.float32)
# The same boxes in 64 px pixels (top, left, bottom, right), as paste_into_boxes rounds them.
SQUARE_PIXELS = ((12, 12, 36, 36), (28, 4, 52, 28))


# --------------------------------------------------------------------------- helpers


def _logits_map(height: int, width: int, lesion: tuple[slice, slice] | None) -> np.ndarray:
    """``(height, width, 1)`` mask logits: +10 on the lesion, -10 elsewhere."""
    logits = np.full((height, width, 1), -10.0, np.float32)
    if lesion is not None:
        logits[lesion[0], lesion[1], 0] = 10.0
    return logits


def _boxes(logits: np.ndarray, **kwargs: float) -> np.ndarray:
    """LesionBox of a ``(b, h, w, 1)`` batch (or one ``(h, w, 1)`` map) as numpy."""
    batch = logits if logits.ndim == 4 else logits[None]
    return keras.ops.convert_to_numpy(LesionBox(**kwargs)(batch))


def _bright_segmenter(size: tuple[int, int] = SEG) -> keras.Model:
    """A 'segmenter' whose output is known: ``logits = 40 x - 20`` (lesion where x > 0.5)."""
    inputs = keras.Input((*size, 1), name="image")
    conv = keras.layers.Conv2D(1, 1, name="mask_logits")
    model = keras.Model(inputs, conv(inputs), name="bright")
    conv.set_weights([np.full((1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    return model


def _tiny_unet(seed: int = 0) -> keras.Model:
    """An untrained 32x32 U-Net of 4 filters, depth 2."""
    keras.utils.set_random_seed(seed)
    return build_unet(input_shape=(*SEG, 1), base_filters=4, depth=2, dropout=0.0, name="tiny_unet")


def _square_images() -> np.ndarray:
    """``(2, 64, 64, 1)``: dark images (0.1) with one bright (1.0) square each (:data:`SQUARES`)."""
    images = np.full((2, 64, 64, 1), 0.1, np.float32)
    for i, (rows, cols) in enumerate(SQUARES):
        images[i, rows, cols, 0] = 1.0
    return images


def _lesion_split(n: int, seed: int = 0, *, masks: bool = True) -> SplitData:
    """``n`` 64x64 noisy dark images, each with a bright square (8-20 px) and its mask; 3 classes."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, 64, 64, 1)) * 0.3).astype(np.float32)
    lesion = np.zeros_like(images)
    targets = np.arange(n) % 3
    for i in range(n):
        side = 8 + 6 * int(targets[i])
        top, left = (int(v) for v in rng.integers(0, 64 - side, size=2))
        lesion[i, top:top + side, left:left + side] = 1.0
    images = np.where(lesion > 0, 0.9, images).astype(np.float32)
    return SplitData(images=images, targets=targets.astype(np.int64),
                     frame=pd.DataFrame({"image": [f"s{seed}_{i}.png" for i in range(n)]}),
                     groups=np.array([f"g{seed}_{i}" for i in range(n)]), masks=lesion if masks else None)


def _nested_models(model: keras.Model) -> list[keras.Model]:
    """The nested ``keras.Model`` layers of a model (a lesion-aware classifier's U-Net)."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def _crop_classifier(cfg: ModelConfig) -> keras.Model:
    """The plain classifier of crops a lesion-aware classifier's second phase trains."""
    crops = crop_config(cfg)
    return build_classifier(n_classes=len(crops.classes), input_shape=crops.input_shape,
                            backbone=crops.backbone, dropout=crops.dropout, base_filters=crops.base_filters,
                            normalize=crops.normalize, name="crops")


def _numpy(model: keras.Model, x: np.ndarray) -> np.ndarray:
    """Inference-mode outputs of a model as numpy."""
    return keras.ops.convert_to_numpy(model(x, training=False))


# --------------------------------------------------------------------------- LesionBox


def test_lesion_box_of_a_square_lesion() -> None:
    """Rows/cols 8..15 of 32: centre (12, 12), side 1.5 x 8 = 12 px."""
    box = _boxes(_logits_map(32, 32, (slice(8, 16), slice(8, 16))))
    assert box.shape == (1, 4) and box.dtype == np.float32
    np.testing.assert_allclose(box[0], [6 / 32, 6 / 32, 18 / 32, 18 / 32], atol=1e-6)


def test_lesion_box_is_square_around_a_long_lesion() -> None:
    """Rows 4..7, cols 10..21: the longer side (12) sets the side, 18 px, for both axes."""
    box = _boxes(_logits_map(32, 32, (slice(4, 8), slice(10, 22))))[0]
    np.testing.assert_allclose(box, [-3 / 32, 7 / 32, 15 / 32, 25 / 32], atol=1e-6)  # reaches above the image


def test_lesion_box_is_square_in_pixels_on_a_wide_image() -> None:
    """32x64 image, lesion rows 10..13 cols 20..27: side 2 x 8 = 16 px, i.e. 0.5 of H and 0.25 of W."""
    box = _boxes(_logits_map(32, 64, (slice(10, 14), slice(20, 28))), margin=2.0, min_side=0.1)[0]
    np.testing.assert_allclose(box, [4 / 32, 16 / 64, 20 / 32, 32 / 64], atol=1e-6)
    assert (box[2] - box[0]) * 32 == pytest.approx((box[3] - box[1]) * 64)


def test_tiny_lesion_gets_the_smallest_box() -> None:
    """One pixel at (20, 10): 1.5 px < min_side 0.25 x 32 = 8 px, centred on the pixel (20.5, 10.5)."""
    box = _boxes(_logits_map(32, 32, (slice(20, 21), slice(10, 11))), min_side=0.25)[0]
    np.testing.assert_allclose(box, [16.5 / 32, 6.5 / 32, 24.5 / 32, 14.5 / 32], atol=1e-6)


def test_no_lesion_gives_the_whole_image() -> None:
    box = _boxes(_logits_map(32, 48, None))[0]
    np.testing.assert_array_equal(box, [0.0, 0.0, 1.0, 1.0])


def test_lesion_box_threshold() -> None:
    """A logit of 1 (p = 0.73) is lesion at threshold 0.5, not at 0.9."""
    logits = _logits_map(32, 32, None)
    logits[8:16, 8:16] = 1.0
    np.testing.assert_allclose(_boxes(logits)[0], [6 / 32, 6 / 32, 18 / 32, 18 / 32], atol=1e-6)
    np.testing.assert_array_equal(_boxes(logits, threshold=0.9)[0], [0.0, 0.0, 1.0, 1.0])


def test_lesion_box_treats_each_image_of_a_batch_alone() -> None:
    maps = [_logits_map(32, 32, (slice(8, 16), slice(8, 16))), _logits_map(32, 32, None),
            _logits_map(32, 32, (slice(20, 21), slice(10, 11))),
            _logits_map(32, 32, (slice(4, 8), slice(10, 22)))]
    batch = _boxes(np.stack(maps))
    assert batch.shape == (4, 4)
    for i, one in enumerate(maps):
        np.testing.assert_allclose(batch[i], _boxes(one)[0], atol=1e-6)
    np.testing.assert_array_equal(batch[1], [0.0, 0.0, 1.0, 1.0])


def test_lesion_box_config_round_trips() -> None:
    layer = LesionBox(threshold=0.3, margin=2.0, min_side=0.2, name="box")
    again = LesionBox.from_config(layer.get_config())
    assert (again.threshold, again.margin, again.min_side) == (0.3, 2.0, 0.2)
    assert not again.trainable


# --------------------------------------------------------------------------- CropResize


def _quadrants() -> np.ndarray:
    """``(1, 32, 32, 1)``: constant quadrants 0.1 (top left), 0.4, 0.7, 1.0 (bottom right)."""
    image = np.empty((1, 32, 32, 1), np.float32)
    image[0, :16, :16], image[0, :16, 16:] = 0.1, 0.4
    image[0, 16:, :16], image[0, 16:, 16:] = 0.7, 1.0
    return image


def _gradient() -> np.ndarray:
    """``(1, 32, 32, 1)``: distinct values ``0.5 + (y + 32 x) / 2048`` in (0.5, 1)."""
    y, x = np.mgrid[0:32, 0:32]
    return (0.5 + (y + 32 * x) / 2048.0).astype(np.float32)[None, :, :, None]


def _crop(images: np.ndarray, boxes: list[list[float]], size: tuple[int, int]) -> np.ndarray:
    """CropResize of images by boxes, as numpy."""
    layer = CropResize(size)
    return keras.ops.convert_to_numpy(layer([images, np.asarray(boxes, np.float32)]))


@pytest.mark.parametrize(("box", "value"), [([0.1, 0.1, 0.4, 0.4], 0.1), ([0.1, 0.6, 0.4, 0.9], 0.4),
                                            ([0.6, 0.1, 0.9, 0.4], 0.7), ([0.6, 0.6, 0.9, 0.9], 1.0)])
def test_crop_inside_one_quadrant_is_that_quadrant(box: list[float], value: float) -> None:
    crop = _crop(_quadrants(), [box], (16, 16))
    assert crop.shape == (1, 16, 16, 1) and crop.dtype == np.float32
    np.testing.assert_allclose(crop, value, atol=1e-6)


def test_crop_reproduces_the_pixels_of_its_box() -> None:
    """Box corners sample pixel centres (``y1 (H - 1)``): a 16 px crop of rows/cols 0..15 is exact."""
    image = _gradient()
    crop = _crop(image, [[0.0, 0.0, 15 / 31, 15 / 31]], (16, 16))
    np.testing.assert_allclose(crop[0], image[0, :16, :16], atol=1e-6)
    bottom_right = _crop(image, [[16 / 31, 16 / 31, 1.0, 1.0]], (16, 16))
    np.testing.assert_allclose(bottom_right[0], image[0, 16:, 16:], atol=1e-6)


def test_crop_is_zero_outside_the_image() -> None:
    """Rows -31 to 31 px in 32 steps of 2: the 16 above the image are zero, the rest rows 1, 3, .., 31."""
    image = _gradient()
    crop = _crop(image, [[-1.0, 0.0, 1.0, 1.0]], (32, 32))[0]
    np.testing.assert_array_equal(crop[:16], 0.0)
    np.testing.assert_allclose(crop[16:], image[0, 1::2], atol=1e-6)


def test_crop_uses_each_image_own_box() -> None:
    images = np.concatenate([_quadrants(), 1.0 - _quadrants()])
    crop = _crop(images, [[0.1, 0.1, 0.4, 0.4], [0.6, 0.6, 0.9, 0.9]], (8, 8))
    np.testing.assert_allclose(crop[0], 0.1, atol=1e-6)
    np.testing.assert_allclose(crop[1], 0.0, atol=1e-6)


# --------------------------------------------------------------------------- the composed model


def test_roi_classifier_shapes_and_frozen_segmenter() -> None:
    unet = _tiny_unet()
    model = build_roi_classifier(unet, TUMOR)
    x = _lesion_split(5).images
    assert _numpy(model, x).shape == (5, 3)
    assert tuple(model.inputs[0].shape[1:]) == (64, 64, 1)
    assert model.get_layer("logits").output.shape[-1] == 3
    (nested,) = _nested_models(model)
    assert not nested.trainable
    assert unet.trainable, "the given segmenter itself is left alone"
    frozen = {id(v) for v in nested.weights}
    assert model.trainable_weights and not frozen & {id(v) for v in model.trainable_weights}
    for mine, given in zip(nested.get_weights(), unet.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, given)
    boxes = lesion_boxes(model, x)
    assert boxes is not None and boxes.shape == (5, 4) and boxes.dtype == np.float32


def test_nested_segmenter_is_named_segmenter() -> None:
    from breastscan.models.roi import SEGMENTER_LAYER

    model = build_roi_classifier(_tiny_unet(), TUMOR)
    assert model.get_layer(SEGMENTER_LAYER) is _nested_models(model)[0]


def test_roi_classifier_needs_roi() -> None:
    with pytest.raises(ValueError, match="declares no roi"):
        build_roi_classifier(_tiny_unet(), replace(TUMOR, roi=None))


def test_lesion_boxes_of_a_plain_classifier_is_none() -> None:
    model = build_classifier(n_classes=2, input_shape=(32, 32, 1), base_filters=4)
    assert lesion_boxes(model, np.zeros((2, 32, 32, 1), np.float32)) is None


def test_roi_classifier_boxes_follow_the_segmenter() -> None:
    """The bright-pixel segmenter finds each planted square: the boxes worked out by hand."""
    model = build_roi_classifier(_bright_segmenter(), TUMOR)
    boxes = lesion_boxes(model, _square_images())
    np.testing.assert_allclose(boxes, SQUARE_BOXES, atol=1e-6)
    empty = lesion_boxes(model, np.full((1, 64, 64, 1), 0.1, np.float32))
    np.testing.assert_array_equal(empty, [[0.0, 0.0, 1.0, 1.0]])


def test_roi_classifier_round_trips_through_a_bundle(tmp_path: Path) -> None:
    model = build_roi_classifier(_tiny_unet(), TUMOR)
    contract = ModelContract.from_config(TUMOR, "ultrasound")
    bundle = ModelBundle(model=model, spec=TUMOR.preprocess, contract=contract)
    bundle.save(tmp_path / "bundle")
    again = ModelBundle.load(tmp_path / "bundle")
    x = _lesion_split(4, seed=1).images
    np.testing.assert_allclose(again.logits(x), bundle.logits(x), atol=1e-5)
    np.testing.assert_allclose(lesion_boxes(again.model, x), lesion_boxes(model, x), atol=1e-6)
    (nested,) = _nested_models(again.model)
    assert not nested.trainable
    assert not {id(v) for v in nested.weights} & {id(v) for v in again.model.trainable_weights}
    assert again.contract.input_shape == (64, 64, 1) and again.contract.classes == TUMOR.classes


def test_composed_model_is_the_crop_classifier_on_lesion_crops() -> None:
    """copy_classifier_weights moves every weighted layer: same logits as classifier(lesion_crops)."""
    segmenter = _bright_segmenter()
    model = build_roi_classifier(segmenter, TUMOR)
    crops_model = _crop_classifier(TUMOR)
    copied = copy_classifier_weights(crops_model, model)
    assert copied == sum(1 for layer in crops_model.layers if layer.weights) and copied > 0
    data = _lesion_split(4, seed=2)
    crops = lesion_crops(segmenter, TUMOR, data)
    assert crops.images.shape == (4, 32, 32, 1) and crops.masks is None
    assert crops.images.min() >= 0.0 and crops.images.max() <= 1.0
    np.testing.assert_array_equal(crops.targets, data.targets)
    np.testing.assert_allclose(_numpy(model, data.images), _numpy(crops_model, crops.images), atol=1e-5)


def test_lesion_crop_of_a_planted_square() -> None:
    """The bright square is 8 of the box's 12 px: the crop's middle (2/3 of it) is bright, its rim dark."""
    images = _square_images()
    data = SplitData(images=images, targets=np.zeros(2, np.int64), frame=pd.DataFrame({"image": ["a", "b"]}),
                     groups=np.array(["a", "b"]))
    crops = lesion_crops(_bright_segmenter(), TUMOR, data).images
    centre, rim = crops[:, 8:24, 8:24], crops[:, :4]
    np.testing.assert_allclose(centre, 1.0, atol=1e-5)
    np.testing.assert_allclose(rim, 0.1, atol=1e-5)


def test_copy_classifier_weights_refuses_an_unknown_layer() -> None:
    model = build_roi_classifier(_bright_segmenter(), TUMOR)
    inputs = keras.Input((4,))
    other = keras.Model(inputs, keras.layers.Dense(2, name="not_there")(inputs), name="other")
    with pytest.raises(ValueError, match="not_there"):
        copy_classifier_weights(other, model)


def test_grad_cam_of_a_lesion_aware_classifier_is_zero_outside_the_box() -> None:
    keras.utils.set_random_seed(0)
    model = build_roi_classifier(_bright_segmenter(), TUMOR)
    images = _square_images()
    assert lesion_boxes(model, images) == pytest.approx(SQUARE_BOXES, abs=1e-6)
    for cls in range(3):
        heat = grad_cam(model, images, class_index=cls)
        assert heat.shape == (2, 64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        for i, (top, left, bottom, right) in enumerate(SQUARE_PIXELS):
            outside = np.ones((64, 64), bool)
            outside[top:bottom, left:right] = False
            np.testing.assert_array_equal(heat[i][outside], 0.0)


def test_paste_into_boxes_cuts_what_reaches_outside() -> None:
    maps = np.ones((2, 4, 4), np.float32)
    out = paste_into_boxes(maps, np.array([[0.25, 0.25, 0.75, 0.5], [-0.5, 0.5, 0.5, 1.5]]), (8, 8))
    expected = np.zeros((2, 8, 8), np.float32)
    expected[0, 2:6, 2:4] = 1.0
    expected[1, 0:4, 4:8] = 1.0
    np.testing.assert_allclose(out, expected, atol=1e-6)


# --------------------------------------------------------------------------- training


def test_train_model_with_roi_trains_both_phases() -> None:
    train, val = _lesion_split(24, seed=0), _lesion_split(8, seed=1)
    result = train_model(TUMOR, train, val, modality="ultrasound")
    model = result.bundle.model
    assert _numpy(model, val.images).shape == (8, 3)
    assert tuple(model.inputs[0].shape[1:]) == (64, 64, 1)
    assert result.epochs_run == 1 and np.isfinite(result.history["loss"][0])
    contract = result.bundle.contract
    assert contract.input_shape == (64, 64, 1) and contract.task == "classification"
    assert lesion_boxes(model, val.images).shape == (8, 4)
    (nested,) = _nested_models(model)
    assert not nested.trainable and tuple(nested.inputs[0].shape[1:]) == (*SEG, 1)
    untrained = _tiny_unet(seed=TUMOR.seed)
    pairs = zip(nested.get_weights(), untrained.get_weights(), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs), "phase 1 trained the U-Net"


def test_train_model_reuses_a_given_segmenter(monkeypatch: pytest.MonkeyPatch) -> None:
    from breastscan.training import loop

    def no_phase_one(*args: object, **kwargs: object) -> None:
        raise AssertionError("phase 1 ran although a segmenter was given")

    monkeypatch.setattr(loop, "_train_segmenter", no_phase_one)
    given = _tiny_unet(seed=7)
    before = given.get_weights()
    result = train_model(TUMOR, _lesion_split(16, seed=3), _lesion_split(6, seed=4), modality="ultrasound",
                         segmenter=given)
    (nested,) = _nested_models(result.bundle.model)
    for mine, theirs, original in zip(nested.get_weights(), given.get_weights(), before, strict=True):
        np.testing.assert_array_equal(mine, theirs)
        np.testing.assert_array_equal(theirs, original)
    assert _numpy(result.bundle.model, _lesion_split(2, seed=5).images).shape == (2, 3)


def test_train_model_with_roi_needs_masks() -> None:
    with pytest.raises(ValueError, match="lesion masks"):
        train_model(TUMOR, _lesion_split(6, masks=False), _lesion_split(3, seed=1, masks=False),
                    modality="ultrasound")


def test_segmenter_data_resizes_images_and_masks() -> None:
    data = _lesion_split(5)
    seg = segmenter_data(data, SEG)
    assert seg.images.shape == (5, *SEG, 1) and seg.targets.shape == (5, *SEG, 1)
    assert seg.masks is None and seg.images.min() >= 0.0 and seg.images.max() <= 1.0
    assert set(np.unique(seg.targets)) <= {0.0, 1.0}
    halved = data.masks.reshape(5, 32, 2, 32, 2, 1).mean(axis=(2, 4))  # area resize by 2
    np.testing.assert_array_equal(seg.targets, (halved >= 0.5).astype(np.float32))
    assert list(seg.frame["image"]) == list(data.frame["image"])
    with pytest.raises(ValueError, match="lesion masks"):
        segmenter_data(_lesion_split(2, masks=False), SEG)


# --------------------------------------------------------------------------- loading masks


def test_load_rows_loads_lesion_masks_for_roi(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 40), bool)
    mask[8:20, 10:30] = True
    for name in ("a", "b"):
        write_png(tmp_path / f"{name}.png", rng.random((40, 40)) * 0.5)
    write_mask(tmp_path / "a_mask.png", mask)
    frame = pd.DataFrame({"image": ["a.png", "b.png"], "modality": ["ultrasound"] * 2,
                          "pathology": ["malignant", "normal"], "mask": ["a_mask.png", None]})
    cfg = replace(TUMOR, preprocess=PreprocessSpec(height=16, width=16, keep_aspect=False))
    rs = RowSpec.from_config(cfg)
    assert rs.with_masks and not RowSpec.from_config(replace(cfg, roi=None)).with_masks
    data = load_rows(frame, tmp_path, rs, strict=True).data
    assert data.masks is not None and data.masks.shape == (2, 16, 16, 1)
    np.testing.assert_array_equal(data.targets, [1, 2])
    assert data.masks[0].sum() > 0 and set(np.unique(data.masks[0])) <= {0.0, 1.0}
    np.testing.assert_array_equal(data.masks[1], 0.0)
    plain = load_rows(frame, tmp_path, RowSpec.from_config(replace(cfg, roi=None)), strict=True).data
    assert plain.masks is None


# --------------------------------------------------------------------------- configs


def test_roi_on_a_segmentation_model_is_refused() -> None:
    with pytest.raises(ValueError, match="roi applies to classification"):
        ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask", depth=2,
                    preprocess=PreprocessSpec(height=32, width=32), roi=RoiConfig())


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seg_size": (48, 48), "seg_depth": 5}, "divisible by 2\\*\\*seg_depth = 32"),
    ({"seg_size": (96, 90)}, "divisible"),
    ({"crop_size": (8, 32)}, "crop_size"),
    ({"margin": 0.9}, "margin"),
    ({"min_side": 0.0}, "min_side"),
    ({"threshold": 1.0}, "threshold"),
    ({"seg_epochs": 0}, "seg_epochs"),
    ({"seg_learning_rate": 0.0}, "seg_learning_rate"),
])
def test_roi_config_is_checked(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoiConfig(**kwargs)  # type: ignore[arg-type]


def _params(roi: dict[str, object] | None = None, **model: object) -> dict[str, object]:
    """A params mapping with one ultrasound dataset and one classifier ``t`` (plus ``model`` keys)."""
    declared: dict[str, object] = {"task": "classification", "dataset": "us", "label": "pathology",
                                   "classes": ["benign", "malignant"], **model}
    if roi is not None:
        declared["roi"] = roi
    return {"datasets": {"us": {"path": "data/us", "modality": "ultrasound"}}, "models": {"t": declared}}


def test_parse_params_builds_the_roi_block() -> None:
    roi = {"seg_size": [64, 32], "seg_depth": 3, "crop_size": [48, 48], "margin": 2.0}
    params = parse_params(_params(roi, normalize="per_image"))
    cfg = params.model("t")
    assert isinstance(cfg.roi, RoiConfig)
    assert cfg.roi.seg_size == (64, 32) and isinstance(cfg.roi.seg_size, tuple)
    assert cfg.roi.crop_size == (48, 48) and isinstance(cfg.roi.crop_size, tuple)
    assert cfg.roi.margin == 2.0 and cfg.roi.seg_filters == RoiConfig().seg_filters
    assert cfg.normalize == "per_image"
    assert parse_params(_params()).model("t").roi is None
    assert hash(cfg.roi) == hash(RoiConfig(seg_size=(64, 32), seg_depth=3, crop_size=(48, 48), margin=2.0))


@pytest.mark.parametrize(("raw", "match"), [
    (_params({"seg_size": [30, 30]}), "models.t: roi.seg_size"),
    (_params({"bogus": 1}), "models.t"),
    (_params(normalize="bogus"), "normalize"),
])
def test_parse_params_refuses_a_bad_roi_or_normalize(raw: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_params(raw)


def test_normalize_and_noise_are_checked() -> None:
    with pytest.raises(ValueError, match="normalize"):
        replace(TUMOR, normalize="bogus")
    assert replace(TUMOR, normalize="per_image").normalize == "per_image"
    with pytest.raises(ValueError, match="noise"):
        AugmentConfig(noise=1.5)
    with pytest.raises(ValueError, match="noise"):
        AugmentConfig(noise=-0.1)


def test_segmenter_config_maps_the_roi_recipe() -> None:
    cfg = replace(TUMOR, normalize="per_image", dropout=0.3, seed=3)
    seg = segmenter_config(cfg)
    assert seg.task == "segmentation" and seg.label == "mask" and seg.roi is None and seg.classes == ()
    assert (seg.preprocess.height, seg.preprocess.width) == SEG and seg.input_shape == (*SEG, 1)
    assert seg.preprocess.keep_aspect == cfg.preprocess.keep_aspect
    assert (seg.base_filters, seg.depth, seg.epochs) == (ROI.seg_filters, ROI.seg_depth, ROI.seg_epochs)
    assert (seg.learning_rate, seg.batch_size) == (ROI.seg_learning_rate, ROI.seg_batch_size)
    assert seg.schedule == "cosine" and seg.patience == 0 and seg.threshold == ROI.threshold
    assert seg.dropout == 0.1 and seg.normalize == "per_image" and seg.seed == 3
    assert seg.augment == cfg.augment and seg.dataset == cfg.dataset and seg.headline == "mean_dice"
    crops = crop_config(cfg)
    assert crops.roi is None and crops.input_shape == (32, 32, 1) and crops.classes == cfg.classes


def test_segmenter_mismatch_of_the_busi_pair() -> None:
    spec = load_benchmark(BUSI)
    tumor, lesion = spec.params.model("busi_tumor"), spec.params.model("busi_lesion")
    assert tumor.roi is not None
    assert [t.segmenter for t in spec.tasks] == [None, "busi_lesion"]
    assert segmenter_mismatch(tumor, lesion) == []
    assert segmenter_mismatch(tumor, replace(lesion, epochs=5)) == ["epochs"]
    assert segmenter_mismatch(tumor, replace(lesion, base_filters=8, seed=1)) == ["base_filters", "seed"]
    smaller = replace(lesion, preprocess=replace(lesion.preprocess, height=64, width=64))
    assert segmenter_mismatch(tumor, smaller) == ["input size"]
    assert segmenter_mismatch(tumor, replace(lesion, augment=NO_AUGMENT)) == ["augment"]


@pytest.mark.parametrize("steps", [{"clahe": True}, {"unsharp": True}, {"keep_aspect": False}])
def test_segmenter_mismatch_sees_other_preprocessing(steps: dict[str, bool]) -> None:
    """A U-Net trained on differently preprocessed images is not the one the classifier would train."""
    spec = load_benchmark(BUSI)
    tumor, lesion = spec.params.model("busi_tumor"), spec.params.model("busi_lesion")
    other = replace(lesion, preprocess=replace(lesion.preprocess, **steps))
    assert segmenter_mismatch(tumor, other) != []


@pytest.mark.parametrize(("overrides", "match"), [
    ({"models.busi_lesion.epochs": 5}, "differ in epochs"),
    ({"models.busi_tumor.roi.seg_filters": 8}, "differ in base_filters"),
    ({"models.busi_lesion.normalize": "none"}, "differ in normalize"),
])
def test_load_benchmark_refuses_a_different_segmenter(overrides: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_benchmark(BUSI, overrides)


# --------------------------------------------------------------------------- augmentation


def test_noise_augmentation_changes_images_and_stays_in_range() -> None:
    aug = build_augmentation(AugmentConfig(noise=0.2, flip=False, rotation_deg=0, brightness=0, contrast=0),
                             seed=0)
    images = np.concatenate([np.full((2, 32, 32, 1), v, np.float32) for v in (0.5, 0.98, 0.02)])
    out = keras.ops.convert_to_numpy(aug(images, training=True))
    assert out.shape == images.shape
    assert not np.allclose(out, images)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out[:2] - 0.5).mean() > 0.05  # about 0.2 x sqrt(2 / pi) = 0.16
    assert (out[2:4] == 1.0).any() and (out[4:] == 0.0).any()  # clipped, not wrapped
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(aug(images, training=False)), images)
