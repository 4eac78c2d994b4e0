"""breastscan.models: shape tables, .keras round-trips, weights/freeze options, losses, augmentation."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from breastscan.evaluation.metrics import MaskOutcomes
from breastscan.models import (
    BACKBONES,
    AugmentConfig,
    BackbonePreprocess,
    BceDiceLoss,
    DiceCoefficient,
    DiceLoss,
    GrayToRGB,
    IoUScore,
    PairAugmenter,
    Standardize,
    augment_pair,
    backbone_layers,
    build_augmentation,
    build_classifier,
    build_model,
    build_unet,
    last_conv_layer_name,
)

APP_BACKBONES = [b for b in BACKBONES if b != "compact"]


def _images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, h, w, 1)).astype("float32")


def _square_pairs(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images with one bright square each, and the square's mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size, 1), "float32")
    for i in range(n):
        side = int(rng.integers(size // 5, size // 3))
        y0, x0 = rng.integers(2, size - side - 2, 2)
        masks[i, y0 : y0 + side, x0 : x0 + side] = 1.0
    images = np.clip(0.2 * rng.random(masks.shape) + 0.7 * masks, 0, 1).astype("float32")
    return images, masks


# --------------------------------------------------------------------------- classifier shapes


@pytest.mark.parametrize("n_classes", [2, 3, 4])
@pytest.mark.parametrize("size", [(128, 128), (96, 64), (64, 96), (32, 48)])
def test_compact_classifier_shapes(n_classes: int, size: tuple[int, int]) -> None:
    model = build_classifier(n_classes=n_classes, input_shape=(*size, 1))
    out = model(_images(2, *size))
    assert tuple(out.shape) == (2, n_classes)
    assert model.output.dtype == "float32"
    assert model.layers[-1].name == "logits"
    assert model.get_layer("logits").activation is keras.activations.linear  # logits, no softmax


@pytest.mark.parametrize(("base_filters", "widths", "params"), [(16, (16, 32, 64, 96, 128), 191_444),
                                                              (8, (8, 16, 32, 48, 64), 48_492)])
def test_compact_classifier_width(base_filters: int, widths: tuple[int, ...], params: int) -> None:
    model = build_classifier(n_classes=4, input_shape=(64, 48, 1), base_filters=base_filters)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert tuple(layer.filters for layer in convs) == widths
    assert model.count_params() == params
    assert tuple(model.get_layer("pooled").output.shape) == (None, 2 * widths[-1])
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="base_filters"):
            build_classifier(n_classes=4, input_shape=(64, 48, 1), base_filters=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("backbone", "n_classes", "size", "mode"),
    [
        ("mobilenetv3small", 2, (64, 96), "raw255"),
        ("efficientnetb0", 3, (96, 64), "raw255"),
        ("resnet50", 4, (64, 64), "caffe"),
        ("densenet121", 3, (64, 96), "torch"),
        ("densenet201", 2, (64, 64), "torch"),
    ],
)
def test_application_classifier_shapes(
    backbone: str, n_classes: int, size: tuple[int, int], mode: str
) -> None:
    model = build_classifier(n_classes=n_classes, input_shape=(*size, 1), backbone=backbone)
    out = model(_images(2, *size))
    assert tuple(out.shape) == (2, n_classes)
    assert model.input.shape[1:] == (*size, 1)
    assert isinstance(model.get_layer("gray_to_rgb"), GrayToRGB)
    assert model.get_layer("backbone_preprocess").mode == mode
    assert model.layers[-1].name == "logits"
    conv = model.get_layer(last_conv_layer_name(model))
    assert len(conv.output.shape) == 4 and conv.output.shape[-1] > 3


def test_all_backbones_are_covered() -> None:
    assert set(APP_BACKBONES) == {"mobilenetv3small", "efficientnetb0", "resnet50", "densenet121",
                                  "densenet201"}


def test_last_conv_layer_name() -> None:
    compact = build_classifier(n_classes=2, input_shape=(64, 64, 1))
    name = last_conv_layer_name(compact)
    assert name == "block5_relu"
    assert tuple(compact.get_layer(name).output.shape) == (None, 4, 4, 128)
    resnet = build_classifier(n_classes=2, input_shape=(64, 64, 1), backbone="resnet50")
    assert last_conv_layer_name(resnet) == "conv5_block3_out"
    # a nested backbone cannot be used for Grad-CAM as is
    inner = keras.Sequential([keras.Input((16, 16, 1)), keras.layers.Conv2D(2, 3),
                              keras.layers.GlobalAveragePooling2D()])
    outer = keras.Sequential([keras.Input((16, 16, 1)), inner, keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="nested"):
        last_conv_layer_name(outer)


# --------------------------------------------------------------------------- preprocessing layers


def test_backbone_preprocess_matches_keras_applications() -> None:
    gray = _images(2, 8, 8)
    rgb = np.repeat(gray, 3, axis=-1)
    gray_rgb = GrayToRGB()(gray)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(gray_rgb), rgb)
    cases = {
        "caffe": keras.applications.resnet50.preprocess_input,
        "torch": keras.applications.densenet.preprocess_input,
        "tf": keras.applications.mobilenet_v2.preprocess_input,
    }
    for mode, reference in cases.items():
        ours = keras.ops.convert_to_numpy(BackbonePreprocess(mode)(rgb))
        np.testing.assert_allclose(ours, reference(rgb * 255.0), rtol=1e-5, atol=1e-4, err_msg=mode)
    raw = keras.ops.convert_to_numpy(BackbonePreprocess("raw255")(rgb))
    np.testing.assert_allclose(raw, rgb * 255.0, rtol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        BackbonePreprocess("bogus")


def test_standardize_layer_round_trips(tmp_path: Path) -> None:
    inputs = keras.Input((16, 16, 1))
    model = keras.Model(inputs, Standardize(name="std")(inputs))
    x = _images(3, 16, 16)
    out = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1.0, atol=1e-3)
    model.save(tmp_path / "std.keras")
    again = keras.models.load_model(tmp_path / "std.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), out, atol=1e-6)


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(64, 64), (32, 48), (128, 96)])
def test_unet_shapes(depth: int, size: tuple[int, int]) -> None:
    model = build_unet(input_shape=(*size, 1), base_filters=4, depth=depth)
    out = model(_images(2, *size))
    assert tuple(out.shape) == (2, *size, 1)
    assert model.layers[-1].name == "mask_logits" and model.output.dtype == "float32"
    assert model.get_layer(f"enc{depth}_pool") is not None
    with pytest.raises(ValueError):
        model.get_layer(f"enc{depth + 1}_pool")


def test_unet_divisibility_error() -> None:
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 16"):
        build_unet(input_shape=(100, 96, 1), depth=4)
    with pytest.raises(ValueError, match="divisible"):
        build_unet(input_shape=(64, 60, 1), depth=3)
    build_unet(input_shape=(100, 96, 1), depth=2, base_filters=2)  # 100 and 96 divisible by 4
    with pytest.raises(ValueError, match="depth"):
        build_unet(depth=0)


def test_build_model_dispatch() -> None:
    clf = build_model("classification", n_classes=3, input_shape=(32, 32, 1))
    seg = build_model("segmentation", input_shape=(32, 32, 1), depth=2, base_filters=4)
    assert tuple(clf.output.shape) == (None, 3) and tuple(seg.output.shape) == (None, 32, 32, 1)
    with pytest.raises(ValueError, match="classification, segmentation"):
        build_model("detection")


# --------------------------------------------------------------------------- .keras round trips


@pytest.mark.parametrize("backbone", ["compact", "mobilenetv3small"])
def test_classifier_keras_round_trip(tmp_path: Path, backbone: str) -> None:
    model = build_classifier(n_classes=3, input_shape=(64, 64, 1), backbone=backbone, freeze=0.5)
    path = tmp_path / "model.keras"
    model.save(path)
    again = keras.models.load_model(path)  # no custom_objects
    x = _images(3, 64, 64)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-6, atol=1e-6)
    assert [la.trainable for la in again.layers] == [la.trainable for la in model.layers]
    assert last_conv_layer_name(again) == last_conv_layer_name(model)


def test_unet_keras_round_trip_with_custom_loss_and_metrics(tmp_path: Path) -> None:
    model = build_unet(input_shape=(32, 32, 1), base_filters=4, depth=2)
    model.compile(optimizer="adam", loss=BceDiceLoss(bce_weight=0.3),
                  metrics=[DiceCoefficient(threshold=0.4), IoUScore()])
    x, y = _square_pairs(4, 32)
    model.train_on_batch(x, y)
    path = tmp_path / "unet.keras"
    model.save(path)
    again = keras.models.load_model(path)  # no custom_objects
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-6, atol=1e-6)
    assert isinstance(again.loss, BceDiceLoss) and again.loss.bce_weight == pytest.approx(0.3)
    again.evaluate(x, y, verbose=0)  # the compiled metrics deserialise and run


# --------------------------------------------------------------------------- weights option


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square:UserWarning")
@pytest.mark.parametrize("error", [
    urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- no network"),
])
def test_imagenet_offline_gives_clear_runtime_error(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    from keras.src.utils import file_utils

    def get_file(*args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr(file_utils, "get_file", get_file)  # what keras.applications call
    with pytest.raises(RuntimeError) as info:
        build_classifier(n_classes=2, input_shape=(64, 64, 1), backbone="mobilenetv3small",
                         weights="imagenet")
    message = str(info.value)
    assert "could not be downloaded" in message
    assert "~/.keras/models" in message and "weights: none" in message and "local path" in message


def test_invalid_backbone_and_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compact, mobilenetv3small, efficientnetb0"):
        build_classifier(n_classes=2, backbone="vgg16")
    with pytest.raises(ValueError, match="compact backbone has no ImageNet"):
        build_classifier(n_classes=2, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_classifier(n_classes=2, weights=str(tmp_path / "missing.weights.h5"))
    other = tmp_path / "weights.txt"
    other.write_text("not weights")
    with pytest.raises(ValueError, match="unsupported weights file"):
        build_classifier(n_classes=2, weights=str(other))
    with pytest.raises(ValueError, match="n_classes"):
        build_classifier(n_classes=1)
    with pytest.raises(ValueError, match="at least 32"):
        build_classifier(n_classes=2, input_shape=(16, 16, 1), backbone="resnet50")
    with pytest.raises(ValueError, match="input_shape"):
        build_classifier(n_classes=2, input_shape=(64, 64, 2))


@pytest.mark.parametrize("suffix", [".weights.h5", ".keras"])
def test_weights_path_loads(tmp_path: Path, suffix: str) -> None:
    source = build_classifier(n_classes=3, input_shape=(64, 64, 1))
    source.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    source.fit(_images(8, 64, 64), np.arange(8) % 3, epochs=1, verbose=0)  # move BN statistics too
    path = tmp_path / f"source{suffix}"
    source.save_weights(path) if suffix == ".weights.h5" else source.save(path)
    x = _images(4, 64, 64, seed=1)

    same = build_classifier(n_classes=3, input_shape=(64, 64, 1), weights=str(path))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same(x)), keras.ops.convert_to_numpy(source(x)),
                               rtol=1e-6, atol=1e-6)

    # another head: the backbone is loaded, the head keeps its random initialisation
    other = build_classifier(n_classes=5, input_shape=(64, 64, 1), weights=str(path))
    for layer in backbone_layers(source):
        for a, b in zip(layer.get_weights(), other.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    head = other.get_layer("logits").get_weights()
    assert head[0].shape == (256, 5) and np.isfinite(head[0]).all()  # 128 averaged + 128 max-pooled

    # weights of another backbone are refused with a clear message
    with pytest.raises(ValueError, match="does not hold weights for backbone 'mobilenetv3small'"):
        build_classifier(n_classes=3, input_shape=(64, 64, 1), backbone="mobilenetv3small",
                         weights=str(path))


def test_legacy_h5_backbone_file_loads(tmp_path: Path) -> None:
    """A bare keras.applications .h5 file (e.g. Keras' *_notop.h5 ImageNet file copied by hand)."""
    bare = keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(64, 64, 3),
                                               pooling="avg")
    path = tmp_path / "mobilenet_v3_small_notop.h5"
    bare.save(path)  # legacy HDF5 format, like Keras' published weight files
    model = build_classifier(n_classes=2, input_shape=(64, 64, 1), backbone="mobilenetv3small",
                             weights=str(path))
    compared = 0
    for layer in (la for la in bare.layers if la.weights):
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
            compared += 1
    assert compared > 100
    with pytest.raises(ValueError, match="unsupported weights file"):
        build_classifier(n_classes=2, input_shape=(64, 64, 1), weights=str(path))  # compact: no .h5


# --------------------------------------------------------------------------- freeze option


def test_freeze_int_and_float() -> None:
    full = backbone_layers(build_classifier(n_classes=2, input_shape=(32, 32, 1)))
    assert len(full) == 19  # 5 x (conv, bn, relu) + 4 pools

    model = build_classifier(n_classes=2, input_shape=(32, 32, 1), freeze=5)
    flags = [layer.trainable for layer in backbone_layers(model)]
    assert flags == [False] * 5 + [True] * 14
    assert model.get_layer("logits").trainable

    model = build_classifier(n_classes=2, input_shape=(32, 32, 1), freeze=0.5)
    assert sum(not la.trainable for la in backbone_layers(model)) == math.floor(0.5 * 19)

    app = build_classifier(n_classes=2, input_shape=(64, 64, 1), backbone="mobilenetv3small", freeze=0.25)
    layers = backbone_layers(app)
    n = math.floor(0.25 * len(layers))
    assert [la.trainable for la in layers] == [False] * n + [True] * (len(layers) - n)

    everything = build_classifier(n_classes=2, input_shape=(32, 32, 1), freeze=1.0, dropout=0.0)
    assert all(not la.trainable for la in backbone_layers(everything))
    assert len(everything.trainable_weights) == 2  # only the logits kernel and bias
    # frozen BatchNorm layers run in inference mode even when training=True
    x = _images(4, 32, 32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(everything(x, training=True)),
                               keras.ops.convert_to_numpy(everything(x, training=False)), atol=1e-6)

    for bad in (20, -1, 1.5, True, "half"):  # 20 > the 19 backbone layers
        with pytest.raises(ValueError, match="freeze"):
            build_classifier(n_classes=2, input_shape=(32, 32, 1), freeze=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- learning sanity


def test_compact_classifier_learns_bright_vs_dark() -> None:
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(0.6, 1.0, (32, 32, 32, 1)),
                        rng.uniform(0.0, 0.4, (32, 32, 32, 1))]).astype("float32")
    y = np.array([1] * 32 + [0] * 32)
    model = build_classifier(n_classes=2, input_shape=(32, 32, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0)
    assert history.history["accuracy"][-1] > 0.9


def test_unet_learns_a_bright_square() -> None:
    keras.utils.set_random_seed(0)
    x, y = _square_pairs(32, 32)
    model = build_unet(input_shape=(32, 32, 1), base_filters=8, depth=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=BceDiceLoss(), metrics=[DiceCoefficient()])
    history = model.fit(x, y, epochs=15, batch_size=8, verbose=0)
    assert history.history["dice"][-1] > 0.7
    assert history.history["loss"][-1] < history.history["loss"][0]


# --------------------------------------------------------------------------- losses and metrics


def test_dice_loss_perfect_and_inverted() -> None:
    _, masks = _square_pairs(4, 32)
    logits = np.where(masks > 0, 20.0, -20.0).astype("float32")
    loss = DiceLoss()
    assert float(loss(masks, logits)) == pytest.approx(0.0, abs=1e-4)
    assert float(loss(masks, -logits)) == pytest.approx(1.0, abs=0.02)
    probs = (masks > 0).astype("float32")
    assert float(DiceLoss(from_logits=False)(masks, probs)) == pytest.approx(0.0, abs=1e-6)
    empty = np.zeros((2, 8, 8, 1), "float32")
    assert float(loss(empty, np.full_like(empty, -20.0))) == pytest.approx(0.0, abs=1e-4)


def test_bce_dice_loss_combines_both_terms() -> None:
    _, masks = _square_pairs(3, 16, seed=2)
    logits = np.random.default_rng(3).normal(size=masks.shape).astype("float32")
    p = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    bce = -(masks * np.log(p) + (1 - masks) * np.log(1 - p)).mean(axis=(1, 2, 3))
    dice = (2 * (masks * p).sum(axis=(1, 2, 3)) + 1) / (masks.sum(axis=(1, 2, 3)) + p.sum(axis=(1, 2, 3)) + 1)
    expected = (0.3 * bce + 0.7 * (1 - dice)).mean()
    assert float(BceDiceLoss(bce_weight=0.3)(masks, logits)) == pytest.approx(expected, rel=1e-4)
    dice_only = float(DiceLoss()(masks, logits))
    assert float(BceDiceLoss(bce_weight=0.0)(masks, logits)) == pytest.approx(dice_only, rel=1e-5)
    assert float(BceDiceLoss(bce_weight=1.0)(masks, logits)) == pytest.approx(bce.mean(), rel=1e-4)
    # a (B, H, W) target is accepted against (B, H, W, 1) logits
    assert float(BceDiceLoss()(masks[..., 0], logits)) == pytest.approx(float(BceDiceLoss()(masks, logits)))


def test_dice_and_iou_keras_metrics_are_per_image_and_stateful() -> None:
    rng = np.random.default_rng(4)
    truth = (rng.random((4, 16, 16, 1)) > 0.7).astype("float32")
    truth[3] = 0.0  # an empty mask ...
    probs = rng.random((4, 16, 16, 1)).astype("float32")
    probs[3] = 0.1  # ... predicted empty: counts as 1.0
    # the evaluation's per-image Dice and IoU (empty truth, empty prediction: 1), averaged
    outcomes = MaskOutcomes.from_masks(truth, probs, threshold=0.5)
    assert outcomes.dice[3] == 1.0 and outcomes.iou[3] == 1.0
    expected_dice = float(outcomes.dice.mean())
    expected_iou = float(outcomes.iou.mean())

    dice = DiceCoefficient(from_logits=False)
    iou = IoUScore(from_logits=False)
    dice.update_state(truth[:2], probs[:2])  # two batches accumulate
    dice.update_state(truth[2:], probs[2:])
    iou.update_state(truth, probs)
    assert float(dice.result()) == pytest.approx(expected_dice, rel=1e-5)
    assert float(iou.result()) == pytest.approx(expected_iou, rel=1e-5)

    logits = np.log(probs / (1 - probs))
    from_logits = DiceCoefficient()
    from_logits.update_state(truth, logits)
    assert float(from_logits.result()) == pytest.approx(expected_dice, rel=1e-4)

    dice.reset_state()
    dice.update_state(truth[3:], probs[3:])
    assert float(dice.result()) == pytest.approx(1.0)
    assert DiceCoefficient.from_config(DiceCoefficient(threshold=0.3).get_config()).threshold == 0.3


# --------------------------------------------------------------------------- augmentation


def _overlap_after(image: np.ndarray, mask: np.ndarray) -> float:
    """Dice of the pixels above 0.5 in ``image`` and in ``mask`` (both ``(H, W, 1)``)."""
    return float(MaskOutcomes.from_masks(mask[None], (image[None] > 0.5).astype(np.float32)).dice[0])


def test_augment_pair_keeps_image_and_mask_aligned() -> None:
    images, masks = _square_pairs(8, 64, seed=5)
    images = masks.copy()  # noise-free: the bright square is the mask
    cfg = AugmentConfig(flip=True, rotation_deg=30.0, brightness=0.0, contrast=0.0, zoom=0.1)
    aug_images, aug_masks = augment_pair(tf.constant(images), tf.constant(masks), cfg, seed=1)
    aug_images, aug_masks = aug_images.numpy(), aug_masks.numpy()
    assert aug_images.shape == images.shape and aug_masks.shape == masks.shape
    assert set(np.unique(aug_masks)) <= {0.0, 1.0}
    moved = 0
    for i in range(len(images)):
        assert _overlap_after(aug_images[i], aug_masks[i]) > 0.9
        moved += _overlap_after(aug_masks[i], masks[i]) < 0.95
    assert moved >= 4  # the transform really changed the geometry


def test_augment_pair_in_tf_data_keeps_values_in_range() -> None:
    images, masks = _square_pairs(8, 32, seed=6)
    cfg = AugmentConfig(flip=True, rotation_deg=20.0, brightness=0.3, contrast=0.5, zoom=0.1)
    augmenter = PairAugmenter(cfg, seed=2)
    ds = tf.data.Dataset.from_tensor_slices((images, masks)).batch(4).map(augmenter)
    for _ in range(2):  # two epochs: fresh transforms each time
        for img, msk in ds:
            assert img.shape == (4, 32, 32, 1) and msk.shape == (4, 32, 32, 1)
            assert float(tf.reduce_min(img)) >= 0.0 and float(tf.reduce_max(img)) <= 1.0
            assert set(np.unique(msk.numpy())) <= {0.0, 1.0}
    # unbatched elements work too
    ds1 = tf.data.Dataset.from_tensor_slices((images, masks))
    ds1 = ds1.map(lambda a, b: augment_pair(a, b, cfg, seed=3))
    img, msk = next(iter(ds1))
    assert img.shape == (32, 32, 1) and msk.shape == (32, 32, 1)


def test_build_augmentation() -> None:
    images = _images(4, 32, 32)
    aug = build_augmentation(AugmentConfig(brightness=0.5, contrast=0.5, zoom=0.1), seed=0)
    assert isinstance(aug, keras.Sequential)
    names = [type(layer).__name__ for layer in aug.layers]
    assert names == ["RandomFlip", "RandomRotation", "RandomZoom", "RandomBrightness", "RandomContrast"]
    rotation = aug.layers[1]
    assert rotation.fill_mode == "constant" and rotation.fill_value == 0.0
    ds = tf.data.Dataset.from_tensor_slices(images).batch(2).map(lambda x: aug(x, training=True))
    for batch in ds:
        assert batch.shape == (2, 32, 32, 1)
        assert float(tf.reduce_min(batch)) >= 0.0 and float(tf.reduce_max(batch)) <= 1.0
    identity = build_augmentation(AugmentConfig(flip=False, rotation_deg=0, brightness=0, contrast=0))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(identity(images, training=True)), images)
    with pytest.raises(ValueError, match="brightness"):
        AugmentConfig(brightness=1.5)
