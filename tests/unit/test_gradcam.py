"""breastscan.models.gradcam: Grad-CAM on hand-built models with known gradients, and overlays."""

from __future__ import annotations

import numpy as np
import pytest

from breastscan.imaging.overlay import overlay
from breastscan.models.gradcam import grad_cam

SQUARE = (slice(8, 24), slice(12, 28))  # rows, cols of the planted bright square (4-aligned)
CORE = (slice(10, 22), slice(14, 26))  # the square less the 2 px bilinear upsampling blurs
HALO = (slice(6, 26), slice(10, 30))  # the square and the 2 px around it


@pytest.fixture(scope="module")
def known_model():
    """A model whose gradients are known in closed form.

    A fixed 1x1 conv makes two channels, ``x`` and ``1 - x``; 4x4 average pooling gives the
    ``(8, 8, 2)`` feature map Grad-CAM uses (the last 4-D layer); ``logit_c`` is the mean
    of channel ``c``. So for class 0 every gradient of channel 0 is ``1/64`` and of
    channel 1 zero: the map is the pooled image itself, and class 1's map its negative.
    """
    import keras

    inputs = keras.Input((32, 32, 1))
    x = keras.layers.Conv2D(2, 1, name="pixels")(inputs)
    x = keras.layers.AveragePooling2D(4, name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    logits = keras.layers.Dense(2, name="logits")(x)
    model = keras.Model(inputs, logits, name="known")
    model.get_layer("pixels").set_weights([np.array([[[[1.0, -1.0]]]], np.float32),
                                           np.array([0.0, 1.0], np.float32)])
    model.get_layer("logits").set_weights([np.eye(2, dtype=np.float32), np.zeros(2, np.float32)])
    return model


def _square_image() -> np.ndarray:
    img = np.zeros((1, 32, 32, 1), np.float32)
    img[0, SQUARE[0], SQUARE[1], 0] = 1.0
    return img


def test_heatmap_highlights_the_planted_square(known_model) -> None:
    heat = grad_cam(known_model, _square_image(), class_index=np.array([0]))
    assert heat.shape == (1, 32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    assert np.all(heat[0][CORE] == pytest.approx(1.0))
    outside = heat[0].copy()
    outside[HALO] = np.nan
    assert np.nanmax(outside) < 1e-6
    peak = np.unravel_index(np.argmax(heat[0]), heat[0].shape)
    assert 8 <= peak[0] < 24 and 12 <= peak[1] < 28


def test_other_class_highlights_the_background(known_model) -> None:
    heat = grad_cam(known_model, _square_image(), class_index=1)  # evidence for 1 - x
    assert heat[0][CORE].max() < 1e-6
    assert np.all(heat[0][:4, :4] == pytest.approx(1.0))


def test_default_class_is_the_argmax_and_result_is_deterministic(known_model) -> None:
    batch = np.concatenate([_square_image(), np.full((1, 32, 32, 1), 0.9, np.float32)])
    logits = np.asarray(known_model.predict_on_batch(batch))
    default = grad_cam(known_model, batch)
    explicit = grad_cam(known_model, batch, class_index=np.argmax(logits, axis=1))
    np.testing.assert_array_equal(default, explicit)
    np.testing.assert_allclose(grad_cam(known_model, batch), default, atol=1e-7)


def test_no_positive_evidence_gives_an_all_zero_map(known_model) -> None:
    black = np.zeros((2, 32, 32, 1), np.float32)  # channel 0 is zero everywhere
    heat = grad_cam(known_model, black, class_index=np.array([0, 0]))
    assert heat.shape == (2, 32, 32)
    assert np.isfinite(heat).all() and not heat.any()


def test_bad_arguments_are_refused(known_model) -> None:
    with pytest.raises(ValueError, match="takes"):
        grad_cam(known_model, np.zeros((1, 16, 16, 1), np.float32))
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        grad_cam(known_model, _square_image(), class_index=np.array([2]))
    with pytest.raises(ValueError, match="shape"):
        grad_cam(known_model, _square_image(), class_index=np.array([0, 1]))
    assert grad_cam(known_model, np.zeros((0, 32, 32, 1), np.float32)).shape == (0, 32, 32)


def test_explicit_layer_and_compact_classifier() -> None:
    from breastscan.models import build_classifier

    model = build_classifier(n_classes=3, input_shape=(48, 40, 1), backbone="compact", dropout=0.0)
    batch = np.random.default_rng(0).random((3, 48, 40, 1), dtype=np.float32)
    heat = grad_cam(model, batch)
    assert heat.shape == (3, 48, 40) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    early = grad_cam(model, batch, layer="block2_relu")
    assert early.shape == (3, 48, 40)


def test_works_on_a_keras_applications_backbone() -> None:
    from breastscan.models import build_classifier

    model = build_classifier(n_classes=2, input_shape=(64, 64, 1), backbone="mobilenetv3small",
                             weights="none", dropout=0.0)
    batch = np.random.default_rng(1).random((2, 64, 64, 1), dtype=np.float32)
    heat = grad_cam(model, batch)
    assert heat.shape == (2, 64, 64) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    for h in heat:  # each map is either normalised to a peak of 1 or empty
        assert h.max() == pytest.approx(1.0) or not h.any()


def test_heatmap_overlay_is_rgb_uint8() -> None:
    gray = np.tile(np.linspace(0, 1, 30, dtype=np.float32), (20, 1))
    heat = np.zeros((20, 30), np.float32)
    heat[5:10, 5:10] = 1.0
    out = overlay(gray, heat, kind="heatmap", alpha=0.4)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    # JET at 1.0 is dark red: the hot spot is redder than blue; JET at 0 is dark blue.
    assert out[7, 7, 0] > out[7, 7, 2]
    assert out[15, 2, 2] > out[15, 2, 0]
    np.testing.assert_array_equal(overlay(gray, heat, alpha=0.0)[..., 0], np.rint(gray * 255))


def test_mask_overlay_fills_and_outlines_in_red() -> None:
    gray = np.full((40, 40), 0.5, np.float32)
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    out = overlay(gray, mask, kind="mask", alpha=0.4)
    assert out.shape == (40, 40, 3) and out.dtype == np.uint8
    assert tuple(out[10, 10]) == (255, 0, 0)  # contour
    r, g, b = (int(v) for v in out[20, 20])  # fill: red blended over gray 128
    assert r > 150 and g == b and g < 100
    assert tuple(out[0, 0]) == (128, 128, 128)  # untouched outside
    empty = overlay(gray, np.zeros((40, 40)), kind="mask")
    assert (empty == 128).all()


def test_overlay_refuses_bad_arguments() -> None:
    gray = np.zeros((8, 8), np.float32)
    with pytest.raises(ValueError, match="shape"):
        overlay(gray, np.zeros((8, 9)))
    with pytest.raises(ValueError, match="kind"):
        overlay(gray, gray, kind="contour")
    with pytest.raises(ValueError, match="alpha"):
        overlay(gray, gray, alpha=1.5)
