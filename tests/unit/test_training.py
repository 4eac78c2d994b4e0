"""breastscan.training: one-epoch fits on tiny data, early stopping, class weights, strategies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from breastscan.bundle import ModelBundle, ModelContract
from breastscan.config import AugmentConfig, DedupConfig, ModelConfig, SplitConfig
from breastscan.data.loading import SplitData, load_split
from breastscan.data.manifest import normalize_manifest, read_manifest
from breastscan.data.splits import prepare_splits
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.models.inputs import class_weights, make_dataset, steps_per_epoch
from breastscan.training.distribute import get_strategy
from breastscan.training.loop import train_model, write_history

REPO = Path(__file__).resolve().parents[2]
SPEC = PreprocessSpec(height=32, width=32)
SMALL = PreprocessSpec(height=16, width=16)
NO_AUGMENT = AugmentConfig(flip=False, rotation_deg=0.0, brightness=0.0, contrast=0.0)
DENSITY = ModelConfig(name="density", task="classification", dataset="mammography", label="density",
                      classes=(1, 2, 3, 4), preprocess=SPEC, epochs=1, batch_size=16, patience=2,
                      imbalance="class_weight")
LESION = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask", depth=2,
                     base_filters=4, preprocess=SPEC, epochs=1, batch_size=16, patience=2, imbalance="none")


def _split_csv(root: Path, out: Path, labels: tuple[str, ...]) -> Path:
    manifest = normalize_manifest(read_manifest(root))
    df, _ = prepare_splits(manifest, root, labels=labels, stratify=("pathology",),
                           dedup=DedupConfig(max_hamming=10, min_correlation=0.9),
                           cfg=SplitConfig(seed=1, test_fraction=0.2, val_fraction=0.2))
    df.to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def mammo(tiny_phantoms: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[SplitData, SplitData]:
    """(train, val) of the tiny mammography phantoms for the density model."""
    root = tiny_phantoms / "mammography"
    csv = _split_csv(root, tmp_path_factory.mktemp("mg") / "splits.csv", ("density", "pathology"))
    return load_split(csv, root, DENSITY, "train"), load_split(csv, root, DENSITY, "val")


def _synthetic(n: int, k: int = 2, size: int = 16, seed: int = 0) -> SplitData:
    """Learnable toy data: class c images are brighter by c / k."""
    rng = np.random.default_rng(seed)
    targets = np.arange(n) % k
    images = np.clip(rng.random((n, size, size, 1)) * 0.5 + (targets / k)[:, None, None, None], 0, 1)
    return SplitData(images=images.astype(np.float32), targets=targets.astype(np.int64),
                     frame=pd.DataFrame({"image": [f"i{i}.png" for i in range(n)]}),
                     groups=np.array([f"g{i}" for i in range(n)]))


TOY = ModelConfig(name="toy", task="classification", dataset="mammography", label="pathology",
                  classes=("benign", "malignant"), preprocess=SMALL, epochs=1, batch_size=8, patience=1,
                  imbalance="none", augment=NO_AUGMENT, dropout=0.0)


def test_one_epoch_bundle_round_trips(mammo: tuple[SplitData, SplitData], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    train, val = mammo
    result = train_model(DENSITY, train, val, modality="mammography")
    progress = capsys.readouterr().out  # Keras prints one line per epoch (verbose=2)
    assert "/step" in progress and "val_loss:" in progress
    assert result.epochs_run == 1 and result.best_epoch == 1 and result.seconds > 0
    assert set(result.history) >= {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert all(len(v) == 1 and np.isfinite(v[0]) for v in result.history.values())

    bundle = result.bundle
    assert bundle.contract == ModelContract.from_config(DENSITY, "mammography")
    assert bundle.contract.temperature == 1.0 and bundle.spec == SPEC
    probs = bundle.predict(val.images[:8])
    assert probs.shape == (8, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)

    reloaded = ModelBundle.load(bundle.save(tmp_path / "density"))
    assert reloaded.contract == bundle.contract
    np.testing.assert_allclose(reloaded.predict(val.images[:8]), probs, atol=1e-5)

    csv = write_history(result.history, tmp_path / "reports" / "history.csv")
    frame = pd.read_csv(csv)
    assert frame.columns[0] == "epoch" and frame["epoch"].tolist() == [1]
    assert frame["val_loss"].iloc[0] == pytest.approx(result.history["val_loss"][0])


def test_same_seed_trains_the_same_weights(mammo: tuple[SplitData, SplitData]) -> None:
    """Seeded retraining is repeatable: augmentation on, two epochs, identical weights twice."""
    train, val = mammo
    cfg = replace(DENSITY, epochs=2)
    first = train_model(cfg, train, val, modality="mammography").bundle.model.get_weights()
    second = train_model(cfg, train, val, modality="mammography").bundle.model.get_weights()
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def test_segmentation_one_epoch(tiny_phantoms: Path, tmp_path: Path) -> None:
    root = tiny_phantoms / "ultrasound"
    csv = _split_csv(root, tmp_path / "splits.csv", ("pathology",))
    train, val = load_split(csv, root, LESION, "train"), load_split(csv, root, LESION, "val")
    result = train_model(LESION, train, val, modality="ultrasound")
    assert {"loss", "val_loss", "dice", "val_dice", "iou", "val_iou"} <= set(result.history)
    probs = result.bundle.predict(val.images[:4])
    assert probs.shape == (4, 32, 32, 1) and 0.0 <= probs.min() and probs.max() <= 1.0
    assert result.bundle.contract.task == "segmentation" and result.bundle.contract.threshold == 0.5


def test_early_stopping_restores_best_weights() -> None:
    import keras

    class Sabotage(keras.callbacks.Callback):
        """After the first epoch, a huge learning rate wrecks the weights."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if epoch == 0:
                self.model.optimizer.learning_rate.assign(1000.0)

    cfg = replace(TOY, epochs=6, patience=1)
    train, val = _synthetic(32), _synthetic(16, seed=1)
    result = train_model(cfg, train, val, modality="mammography", callbacks=[Sabotage()])
    val_loss = result.history["val_loss"]
    assert result.epochs_run == 2 < cfg.epochs  # stopped one epoch after the best
    assert result.best_epoch == 1 and not val_loss[1] < val_loss[0]
    restored = result.bundle.model.evaluate(make_dataset(val, cfg, training=False), return_dict=True,
                                            verbose=0)
    assert restored["loss"] == pytest.approx(val_loss[0], rel=1e-4)


def test_class_weight_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    calls: list[dict[str, Any]] = []

    def fake_fit(self: keras.Model, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return keras.callbacks.History()

    monkeypatch.setattr(keras.Model, "fit", fake_fit)
    train = _synthetic(30, k=3)
    train.targets[:20] = 0  # imbalanced: 20 / 5 / 5
    val = _synthetic(9, k=3, seed=1)
    cfg = replace(TOY, classes=("benign", "malignant", "normal"), class_names=(), imbalance="class_weight")
    result = train_model(cfg, train, val, modality="mammography")
    assert calls[-1]["class_weight"] == pytest.approx(class_weights(train.targets, 3))
    assert calls[-1]["class_weight"][0] < 1.0 < calls[-1]["class_weight"][1]
    assert calls[-1]["verbose"] == 2 and calls[-1]["epochs"] == cfg.epochs
    assert result.epochs_run == 0
    for other in ("none", "balanced_sampling"):
        train_model(replace(cfg, imbalance=other), train, val, modality="mammography")
        assert calls[-1]["class_weight"] is None


def test_empty_split_is_refused() -> None:
    empty = SplitData(images=np.zeros((0, 16, 16, 1), np.float32), targets=np.zeros(0, np.int64),
                      frame=pd.DataFrame({"image": []}), groups=np.array([], str))
    with pytest.raises(ValueError, match="need training and validation images"):
        train_model(TOY, _synthetic(8), empty, modality="mammography")


# --------------------------------------------------------------------------- strategies


def test_default_strategy_and_unknown_name() -> None:
    assert get_strategy("none").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="distribution must be"):
        get_strategy("horovod")


def test_multi_worker_needs_tf_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="needs the TF_CONFIG environment variable"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {}, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="cluster.worker"):
        get_strategy("multi_worker")
    bad_index = {"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 3}}
    with pytest.raises(ValueError, match="task.index"):
        get_strategy("multi_worker", tf_config=json.dumps(bad_index))


MIRRORED_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import pandas as pd
    from dataclasses import replace
    from breastscan.config import AugmentConfig, ModelConfig
    from breastscan.data.loading import SplitData
    from breastscan.imaging.preprocessing import PreprocessSpec
    from breastscan.training.distribute import configure_logical_cpus, get_strategy
    from breastscan.training.loop import train_model

    configure_logical_cpus(2)  # before TensorFlow touches a device
    strategy = get_strategy("mirrored")
    rng = np.random.default_rng(0)
    def split(n):
        y = np.arange(n) % 2
        x = np.clip(rng.random((n, 16, 16, 1)) * 0.5 + y[:, None, None, None] / 2, 0, 1)
        return SplitData(x.astype(np.float32), y.astype(np.int64), pd.DataFrame({"image": range(n)}),
                         np.arange(n).astype(str))
    cfg = ModelConfig(name="toy", task="classification", dataset="mammography", label="pathology",
                      classes=("benign", "malignant"), preprocess=PreprocessSpec(height=16, width=16),
                      epochs=1, batch_size=8, patience=1, imbalance="class_weight",
                      augment=AugmentConfig(rotation_deg=5.0), distribution="mirrored")
    result = train_model(cfg, split(32), split(16), modality="mammography", strategy=strategy)
    probs = result.bundle.predict(np.zeros((3, 16, 16, 1), np.float32))
    try:
        configure_logical_cpus(3)
        late = "accepted"
    except RuntimeError as exc:
        late = str(exc)
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync, "epochs_run": result.epochs_run,
        "loss": result.history["loss"][0], "prob_sums": probs.sum(axis=1).tolist(), "late": late}))
""")


def test_mirrored_strategy_over_two_logical_cpus_in_subprocess() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["replicas"] == 2 and out["epochs_run"] == 1 and np.isfinite(out["loss"])
    np.testing.assert_allclose(out["prob_sums"], 1.0, atol=1e-5)
    assert "before TensorFlow initialises its devices" in out["late"]


def test_write_history_checks_lengths(tmp_path: Path) -> None:
    path = write_history({"loss": [1.0, 0.5], "val_loss": [1.1, 0.9]}, tmp_path / "h.csv")
    frame = pd.read_csv(path)
    assert frame.to_dict("list") == {"epoch": [1, 2], "loss": [1.0, 0.5], "val_loss": [1.1, 0.9]}
    with pytest.raises(ValueError, match="differ in length"):
        write_history({"loss": [1.0], "val_loss": [1.0, 2.0]}, tmp_path / "bad.csv")


def test_cosine_schedule_decays_to_zero_over_the_planned_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    from breastscan.training import loop

    data = _synthetic(40)
    cfg = replace(TOY, epochs=3, batch_size=16, patience=0, schedule="cosine", learning_rate=0.01)
    assert steps_per_epoch(len(data), cfg) == 2  # 40 // 16 full batches
    assert steps_per_epoch(len(data), replace(cfg, imbalance="balanced_sampling")) == 3  # ceil(40 / 16)
    assert steps_per_epoch(5, cfg) == 1
    seen: list[Any] = []
    build = loop._build_and_compile

    def spy(c: ModelConfig, steps: int, class_sets: Any = None) -> Any:
        seen.append(build(c, steps, class_sets))
        return seen[-1]

    monkeypatch.setattr(loop, "_build_and_compile", spy)
    result = train_model(cfg, data, data, modality="mammography")
    optimizer = seen[0].optimizer
    assert int(optimizer.iterations.numpy()) == 3 * 2  # every planned step ran ...
    assert float(optimizer.learning_rate.numpy()) == pytest.approx(0.0, abs=1e-9)  # ... and the rate is 0
    assert float(optimizer._learning_rate(0)) == pytest.approx(0.01)
    assert result.epochs_run == 3
    constant = loop._learning_rate(replace(cfg, schedule="constant"), 2)
    assert constant == 0.01
    with pytest.raises(ValueError, match="schedule must be one of"):
        replace(cfg, schedule="step")


def test_weight_averaging_ends_training_with_the_moving_average() -> None:
    """weight_average "ema": the trained model holds the average, not the last step's weights."""
    import keras

    class LastWeights(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            self.weights = [np.array(w) for w in self.model.trainable_weights]

    train, val = _synthetic(32), _synthetic(16, seed=1)
    for average, same in (("none", True), ("ema", False)):
        seen = LastWeights()
        cfg = replace(TOY, epochs=3, patience=0, weight_average=average)
        model = train_model(cfg, train, val, modality="mammography", callbacks=[seen]).bundle.model
        final = [np.array(w) for w in model.trainable_weights]
        equal = all(np.array_equal(a, b) for a, b in zip(final, seen.weights, strict=True))
        assert equal is same, average
    with pytest.raises(ValueError, match="weight_average"):
        replace(TOY, weight_average="swa")


def test_speckle_is_multiplicative_and_training_only() -> None:
    """Speckle scales with the echo: black stays black, bright pixels vary most; inference is identity."""
    from breastscan.models.augment import Speckle, build_augmentation

    image = np.zeros((1, 32, 32, 1), np.float32)
    image[:, :, 16:] = 0.8
    layer = Speckle(0.3, seed=1)
    noisy = np.asarray(layer(image, training=True))
    assert np.all(noisy[:, :, :16] == 0.0)
    assert noisy[:, :, 16:].std() > 0.1
    np.testing.assert_array_equal(np.asarray(layer(image, training=False)), image)
    augment = build_augmentation(AugmentConfig(flip=False, rotation_deg=0, brightness=0, contrast=0,
                                               speckle=0.5), seed=0)
    out = np.asarray(augment(image, training=True))
    assert out.min() >= 0.0 and out.max() <= 1.0 and not np.array_equal(out, image)
