"""Typed view of ``params.yaml``: frozen dataclasses and :func:`load_params`.

Stage entry points call :func:`load_params` once and pass typed values into the library;
library code never reads ``params.yaml`` itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from breastscan.decision import DECLARED_KEYS, DecisionRule
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.labels import LABEL_COLUMNS, MODALITIES, class_display_names

DEFAULT_PARAMS = Path("params.yaml")

SITE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")
"""A site of a pool: lower case, as it appears in the ``site`` column and in metric names."""


class MetricKind(NamedTuple):
    """What a metric applies to."""

    task: str
    binary_only: bool = False


METRIC_KINDS: dict[str, MetricKind] = {
    "accuracy": MetricKind("classification"), "balanced_accuracy": MetricKind("classification"),
    "macro_auc": MetricKind("classification"), "auc": MetricKind("classification", True),
    "quadratic_kappa": MetricKind("classification"), "log_loss": MetricKind("classification"),
    "sensitivity": MetricKind("classification", True), "specificity": MetricKind("classification", True),
    "mean_dice": MetricKind("segmentation"), "mean_iou": MetricKind("segmentation"),
    "lesion_mean_dice": MetricKind("segmentation"), "lesion_mean_iou": MetricKind("segmentation"),
}
"""Every metric name a model can headline or gate on, and what it applies to (the functions
are :data:`breastscan.evaluation.metrics.METRICS`, which must name exactly these)."""


def metric_names(task: str, n_classes: int = 0) -> tuple[str, ...]:
    """Metrics a model of ``task`` with ``n_classes`` classes reports (binary-only ones need two);
    a multi-task model reports both its classifier's and its segmenter's."""
    tasks = ("classification", "segmentation") if task == "multitask" else (task,)
    return tuple(name for name, kind in METRIC_KINDS.items()
                 if kind.task in tasks and not (kind.binary_only and n_classes != 2))


PER_CLASS_STATS: tuple[str, ...] = ("sensitivity", "specificity", "precision", "auc")
"""Per-class statistics a gate can floor (``per_class.<class>.<stat>``)."""

BACKBONES: tuple[str, ...] = ("compact", "mobilenetv3small", "efficientnetb0", "resnet50", "densenet121",
                              "densenet201")
"""Classifier backbones (``compact`` or a keras.applications name), in lower case; params.yaml
may spell them in any case (``EfficientNetB0``)."""


@dataclass(frozen=True)
class DedupConfig:
    """Near-duplicate detection: a pair is a duplicate when both conditions hold.

    Attributes:
        max_hamming: largest Hamming distance between 64-bit perceptual (DCT) hashes.
        min_correlation: smallest Pearson correlation of 64x64 thumbnails.
    """

    max_hamming: int = 8
    min_correlation: float = 0.9


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset directory in the manifest contract, as declared under ``datasets:``.

    Attributes:
        name: key in params.yaml (``mammography``, ``ultrasound``, ...).
        path: dataset directory holding ``manifest.csv``.
        modality: the modality every row must have.
        labels: label columns that must be filled on every row.
        stratify: label columns whose combination the splits keep balanced.
        masks_required: benign/malignant rows must have a lesion mask.
        dedup: near-duplicate detection thresholds.
        sites: a *pool* of datasets trained together (one per hospital or site): site name ->
            dataset directory, each inside :attr:`path` (the folder DVC watches for the pool).
            Every site is validated, grouped and split on its own with the pool's settings,
            and the pool's split artefact stacks them with a ``site`` column. Empty for a
            plain dataset.
    """

    name: str
    path: Path
    modality: str
    labels: tuple[str, ...] = ("pathology",)
    stratify: tuple[str, ...] = ("pathology",)
    masks_required: bool = False
    dedup: DedupConfig = field(default_factory=DedupConfig)
    sites: dict[str, Path] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"dataset {self.name}: modality must be one of {MODALITIES}")
        for col in (*self.labels, *self.stratify):
            if col not in LABEL_COLUMNS:
                raise ValueError(f"dataset {self.name}: {col!r} is not a label column {LABEL_COLUMNS}")
        self._check_sites()

    def _check_sites(self) -> None:
        """A pool names at least two sites, each a folder inside the pool's ``path``."""
        if not self.sites:
            return
        if len(self.sites) < 2:
            raise ValueError(f"dataset {self.name}: a pool needs at least two sites, "
                             f"got {sorted(self.sites)}")
        root = Path(self.path).resolve()
        for site, folder in self.sites.items():
            if not SITE_NAME.fullmatch(site):
                raise ValueError(f"dataset {self.name}: site name {site!r} must match {SITE_NAME.pattern}")
            if not Path(folder).resolve().is_relative_to(root) or Path(folder).resolve() == root:
                raise ValueError(f"dataset {self.name}: site {site} ({folder}) must be a folder inside the "
                                 f"pool's path {self.path} (the folder DVC watches for the pool)")

    @property
    def is_pool(self) -> bool:
        """Several sites trained together (:attr:`sites`), rather than one dataset directory."""
        return bool(self.sites)

    def site(self, name: str) -> DatasetConfig:
        """One site of a pool as a plain dataset with the pool's settings (named ``<pool>/<site>``)."""
        return replace(self, name=f"{self.name}/{name}", path=Path(self.sites[name]), sites={})


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; a zero (or ``False``) switches a transform off.

    Attributes:
        flip: random horizontal flips.
        rotation_deg: maximum rotation in degrees, either way (zero fill outside the image).
        brightness: maximum brightness shift as a fraction of the [0, 1] range.
        contrast: maximum contrast change factor (``1 +- contrast``).
        zoom: maximum zoom in or out as a fraction of the size (zero fill).
        noise: standard deviation of additive Gaussian noise on the [0, 1] image (another
            scanner's electronic noise); the result is clipped to [0, 1].
        speckle: standard deviation of multiplicative Gaussian noise, ``x * (1 + speckle * n)``
            (speckle scales with the echo, so bright tissue gets more); clipped to [0, 1].
    """

    flip: bool = True
    rotation_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.1
    zoom: float = 0.0
    noise: float = 0.0
    speckle: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rotation_deg <= 180.0:
            raise ValueError(f"rotation_deg must be in [0, 180], got {self.rotation_deg}")
        for field_name in ("brightness", "contrast", "zoom", "noise", "speckle"):
            value = getattr(self, field_name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{field_name} must be in [0, 1), got {value}")


@dataclass(frozen=True)
class ValidationRules:
    """Thresholds of the validation stage.

    Attributes:
        min_class_count: every class present in a label column needs this many rows.
        min_side: smallest accepted image side in pixels.
        max_side: largest accepted image side in pixels.
        min_max_intensity: an image whose brightest pixel is below this (in [0, 1]) is
            treated as all-black.
    """

    min_class_count: int = 10
    min_side: int = 32
    max_side: int = 8192
    min_max_intensity: float = 0.02


@dataclass(frozen=True)
class SplitConfig:
    """Leak-free split settings of the prepare stage.

    Attributes:
        seed: seed of the grouped, stratified assignment.
        test_fraction: share of groups held out for the final test.
        val_fraction: share of groups used for validation (early stopping, calibration).
        exclude_label_conflicts: drop duplicate groups whose members disagree on a label.
    """

    seed: int = 42
    test_fraction: float = 0.2
    val_fraction: float = 0.15
    exclude_label_conflicts: bool = True

    def __post_init__(self) -> None:
        if not (0 < self.test_fraction < 1 and 0 < self.val_fraction < 1):
            raise ValueError("test_fraction and val_fraction must be in (0, 1)")
        if self.test_fraction + self.val_fraction >= 0.9:
            raise ValueError("test_fraction + val_fraction leaves too little for training")


TASKS: tuple[str, ...] = ("classification", "segmentation", "multitask")
IMBALANCE: tuple[str, ...] = ("none", "class_weight", "balanced_sampling")
DISTRIBUTION: tuple[str, ...] = ("none", "mirrored", "multi_worker")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
NORMALIZE: tuple[str, ...] = ("none", "per_image")
TTA: tuple[str, ...] = ("none", "flip")
WEIGHT_AVERAGE: tuple[str, ...] = ("none", "ema")


@dataclass(frozen=True)
class GateConfig:
    """Quality gates a version must pass to be promoted (``breastscan promote``).

    Attributes:
        floors: metric name -> smallest accepted value on the test split (absolute floors);
            a per-class statistic is named ``per_class.<class>.<stat>`` (e.g.
            ``per_class.malignant.sensitivity``; stats: sensitivity, specificity, precision, auc).
        max_regression: largest accepted drop of each floored metric (and the headline
            metric) versus the version currently in the target stage, on the same split.
        every_class_predicted: refuse a classifier that never predicts one of its classes
            on the test split.
    """

    floors: dict[str, float] = field(default_factory=dict)
    max_regression: float = 0.02
    every_class_predicted: bool = False


@dataclass(frozen=True)
class RoiConfig:
    """Classify the lesion, not the picture: segment, crop the lesion's neighbourhood, classify the crop.

    A classifier with ``roi:`` is one Keras model (:func:`breastscan.models.build_roi_classifier`):
    its own U-Net segments the input (at ``seg_size``), the box around the predicted lesion,
    enlarged ``margin`` times and made square, is cut from the full-resolution input and
    resized to ``crop_size``, and the classification network sees only that crop. Where the
    U-Net finds no lesion the crop is the whole image. Training has two phases: the U-Net on
    the dataset's lesion masks, then the classifier on crops of the frozen U-Net's output.

    Attributes:
        seg_size: ``(H, W)`` the U-Net sees (divisible by ``2**seg_depth``).
        seg_filters: U-Net filters of the first level.
        seg_depth: U-Net down-sampling steps.
        seg_epochs: U-Net training epochs (cosine-decayed learning rate).
        seg_learning_rate: U-Net peak learning rate.
        seg_batch_size: U-Net images per step.
        crop_size: ``(H, W)`` of the crop the classifier sees.
        margin: box side = ``margin`` x the lesion's longer side (context: margin and halo).
        min_side: smallest box side as a fraction of the image's longer side.
        threshold: lesion probability above which a pixel is lesion.
    """

    seg_size: tuple[int, int] = (96, 96)
    seg_filters: int = 16
    seg_depth: int = 4
    seg_epochs: int = 30
    seg_learning_rate: float = 0.003
    seg_batch_size: int = 16
    crop_size: tuple[int, int] = (96, 96)
    margin: float = 1.5
    min_side: float = 0.15
    threshold: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "seg_size", tuple(int(v) for v in self.seg_size))
        object.__setattr__(self, "crop_size", tuple(int(v) for v in self.crop_size))
        step = 2 ** int(self.seg_depth)
        if len(self.seg_size) != 2 or any(v < step or v % step for v in self.seg_size):
            raise ValueError(f"roi.seg_size must be two sides divisible by 2**seg_depth = {step}, "
                             f"got {self.seg_size}")
        if len(self.crop_size) != 2 or min(self.crop_size) < 16:
            raise ValueError(f"roi.crop_size must be two sides >= 16, got {self.crop_size}")
        if self.margin < 1.0 or not 0.0 < self.min_side <= 1.0 or not 0.0 < self.threshold < 1.0:
            raise ValueError("roi: margin >= 1, min_side in (0, 1] and threshold in (0, 1) required")
        if min(self.seg_filters, self.seg_epochs, self.seg_batch_size) < 1 or self.seg_learning_rate <= 0:
            raise ValueError("roi: seg_filters, seg_epochs, seg_batch_size and seg_learning_rate "
                             "must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """One model declared under ``models:`` in params.yaml; another model needs only params.

    Attributes:
        name: key in params.yaml; the registered model is ``breastscan-<name>``.
        task: ``classification``, ``segmentation``, or ``multitask``: one U-Net whose
            features also feed a class head, trained on the class labels and the lesion
            masks at once (:mod:`breastscan.models.multitask`; ``label`` is the class column,
            ``depth`` and ``base_filters`` the U-Net's, ``threshold`` the mask's).
        dataset: key of the dataset under ``datasets:``.
        label: manifest column learnt (``density`` / ``pathology``; ``mask`` for segmentation).
        classes: manifest values in class-index order (classification), e.g. ``[1, 2, 3, 4]``.
        class_names: display names in the same order (default: from :mod:`breastscan.labels`).
        backbone: ``compact`` or a keras.applications name (:data:`BACKBONES`, any case).
        weights: ``none``, ``imagenet`` or a path of saved weights.
        freeze: backbone layers frozen for fine-tuning (int count or float fraction).
        dropout: dropout rate before the output layer.
        base_filters: filters of the first level of the U-Net (segmentation) or of the
            ``compact`` classifier backbone (16-32-64-96-128 at 16).
        depth: U-Net down-sampling steps (segmentation); input sides divisible by ``2**depth``.
        preprocess: the preprocessing spec (input size included) saved with the model.
        epochs: maximum training epochs.
        batch_size: images per step (global batch under a distribution strategy).
        learning_rate: Adam learning rate (the peak one under a schedule).
        schedule: ``constant`` learning rate, or ``cosine``: decayed to 0 over ``epochs``
            (steadier weights, and so steadier batch-norm statistics, in the last epochs).
        patience: early-stopping patience in epochs on the validation loss (0 = off).
        augment: augmentation strengths, applied to training batches only.
        imbalance: ``none``, ``class_weight`` (inverse frequency) or ``balanced_sampling``.
        seed: seed of weight initialisation, shuffling and augmentation.
        distribution: ``none``, ``mirrored`` (several local devices) or ``multi_worker``
            (``TF_CONFIG`` across hosts).
        threshold: probability above which a pixel is lesion (segmentation).
        normalize: ``none``, or ``per_image``: the network standardises each input (zero mean,
            unit variance) first, so a scanner's gain and contrast matter less.
        tta: test-time augmentation, stored in the contract and applied wherever the model
            runs (evaluation, calibration, the service): ``none``, or ``flip``: the logits of
            the image and of its left-right mirror are averaged (a mask is mirrored back
            first); twice the compute per image.
        class_loss_weight: a multi-task model's loss is the mask's BCE + Dice plus this
            weight times the class cross-entropy.
        weight_average: ``none``, or ``ema``: the model keeps an exponential moving average of
            its weights over the training steps (momentum 0.99) and ends with it.
        roi: classify the segmented lesion's neighbourhood (:class:`RoiConfig`; classification
            on a dataset with lesion masks), or ``None`` for the whole image.
        decision: how a class is called from the probabilities (classification): the arg-max
            by default, or a ``positive_ratio`` rule whose cutoff is declared or fitted on the
            validation split for a target sensitivity (:class:`~breastscan.decision.DecisionRule`).
        headline: the metric with a bootstrap CI, used for promotion comparisons.
        gates: promotion quality gates.
    """

    name: str
    task: str
    dataset: str
    label: str
    classes: tuple[Any, ...] = ()
    class_names: tuple[str, ...] = ()
    backbone: str = "compact"
    weights: str = "none"
    freeze: float | int = 0
    dropout: float = 0.2
    base_filters: int = 16
    depth: int = 4
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 1e-3
    schedule: str = "constant"
    patience: int = 5
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    imbalance: str = "class_weight"
    seed: int = 0
    distribution: str = "none"
    threshold: float = 0.5
    normalize: str = "none"
    tta: str = "none"
    weight_average: str = "none"
    class_loss_weight: float = 1.0
    roi: RoiConfig | None = None
    decision: DecisionRule = field(default_factory=DecisionRule)
    headline: str = ""
    gates: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        where = f"models.{self.name}"
        if self.task not in TASKS:
            raise ValueError(f"{where}.task must be one of {TASKS}, got {self.task!r}")
        if self.imbalance not in IMBALANCE:
            raise ValueError(f"{where}.imbalance must be one of {IMBALANCE}, got {self.imbalance!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{where}.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.distribution not in DISTRIBUTION:
            raise ValueError(f"{where}.distribution must be one of {DISTRIBUTION}, got {self.distribution!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"{where}.normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.tta not in TTA:
            raise ValueError(f"{where}.tta must be one of {TTA}, got {self.tta!r}")
        if self.weight_average not in WEIGHT_AVERAGE:
            raise ValueError(f"{where}.weight_average must be one of {WEIGHT_AVERAGE}, "
                             f"got {self.weight_average!r}")
        if self.roi is not None and self.task != "classification":
            raise ValueError(f"{where}.roi applies to classification models only")
        if self.task == "multitask":
            self._check_multitask(where)
        if self.task in ("classification", "multitask"):
            if self.label not in LABEL_COLUMNS:
                raise ValueError(f"{where}.label must be one of {LABEL_COLUMNS}, got {self.label!r}")
            if len(self.classes) < 2:
                raise ValueError(f"{where}.classes needs at least two values")
            if len(set(map(str, self.classes))) != len(self.classes):
                raise ValueError(f"{where}.classes has repeated values")
            if not self.class_names:
                object.__setattr__(self, "class_names", class_display_names(self.label, self.classes))
            if len(self.class_names) != len(self.classes):
                raise ValueError(f"{where}: class_names and classes differ in length")
            try:
                self.decision.check_classes(self.class_names)
            except ValueError as exc:
                raise ValueError(f"{where}.decision: {exc}") from None
        if self.task in ("segmentation", "multitask"):
            step = 2 ** self.depth
            if self.preprocess.height % step or self.preprocess.width % step:
                raise ValueError(f"{where}: input {self.preprocess.height}x{self.preprocess.width} "
                                 f"must be divisible by 2**depth = {step}")
        if self.task == "segmentation":
            if self.label != "mask":
                raise ValueError(f"{where}.label must be 'mask' for segmentation")
            if not self.decision.is_argmax:
                raise ValueError(f"{where}.decision applies to classification models only")
            object.__setattr__(self, "class_names", ("lesion",))
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise ValueError(f"{where}: epochs, batch_size and learning_rate must be positive")
        self._check_metric_names(where)

    def _check_multitask(self, where: str) -> None:
        if self.roi is not None:
            raise ValueError(f"{where}.roi: a multi-task model outlines the lesion itself (no roi)")
        if self.imbalance == "balanced_sampling":
            raise ValueError(f"{where}.imbalance: a multi-task model takes none or class_weight")
        if not self.class_loss_weight > 0:
            raise ValueError(f"{where}.class_loss_weight must be positive, got {self.class_loss_weight}")

    @property
    def has_classes(self) -> bool:
        """Whether the model calls classes (a classifier, or a multi-task model's head)."""
        return self.task in ("classification", "multitask")

    @property
    def has_mask(self) -> bool:
        """Whether the model outlines lesions (a segmenter, or a multi-task model's decoder)."""
        return self.task in ("segmentation", "multitask")

    def _check_metric_names(self, where: str) -> None:
        """Default the headline per task; refuse a headline or gate that is not a metric of this model."""
        if not self.headline:
            object.__setattr__(self, "headline", {"classification": "accuracy", "segmentation": "mean_dice",
                                                  "multitask": "macro_auc"}[self.task])
        allowed = metric_names(self.task, len(self.classes) if self.has_classes else 0)
        for name in (self.headline, *self.gates.floors):
            if name.startswith("per_class.") and self.has_classes:
                _, cls, stat = (name.split(".", 2) + ["", ""])[:3]
                if cls in self.class_names and stat in PER_CLASS_STATS:
                    continue
                raise ValueError(f"{where}: {name!r}: per-class metrics are per_class.<class>.<stat> with a "
                                 f"class of {list(self.class_names)} and a stat of {list(PER_CLASS_STATS)}")
            if name not in allowed:
                raise ValueError(f"{where}: {name!r} is not a metric of this model; choose one of "
                                 f"{', '.join(allowed)}")

    @property
    def registered_name(self) -> str:
        """Name of the model in the MLflow registry."""
        return f"breastscan-{self.name}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, 1)`` of one model input."""
        return (self.preprocess.height, self.preprocess.width, 1)

    def class_index(self, value: Any) -> int:
        """Index of a manifest label value (compared as text: ``"2"`` matches ``2``).

        Raises:
            KeyError: the value is not one of :attr:`classes`.
        """
        text = str(value)
        for i, c in enumerate(self.classes):
            if str(c) == text:
                return i
        raise KeyError(f"{self.label}={value!r} is not a class of model {self.name} {list(self.classes)}")


def segmenter_config(cfg: ModelConfig) -> ModelConfig:
    """The declaration of a lesion-aware classifier's U-Net (its first training phase).

    Same dataset, seed, normalisation and augmentation as the classifier; the size, width,
    depth, epochs, learning rate and batch size of ``cfg.roi``; a cosine schedule, no early
    stopping, dropout at most 0.1.
    """
    roi: RoiConfig = cfg.roi  # type: ignore[assignment]
    spec = replace(cfg.preprocess, height=roi.seg_size[0], width=roi.seg_size[1])
    return replace(cfg, name=f"{cfg.name}_segmenter", task="segmentation", label="mask", classes=(),
                   class_names=(), base_filters=roi.seg_filters, depth=roi.seg_depth, preprocess=spec,
                   epochs=roi.seg_epochs, learning_rate=roi.seg_learning_rate, schedule="cosine",
                   batch_size=roi.seg_batch_size,
                   patience=0, imbalance="none", roi=None, headline="mean_dice", gates=GateConfig(),
                   threshold=roi.threshold, dropout=min(cfg.dropout, 0.1), decision=DecisionRule())


def task_view(cfg: ModelConfig, task: str) -> ModelConfig:
    """A multi-task model's declaration read as its classifier or its segmenter alone.

    What scores one of its outputs (rows, targets, metrics, gates) takes this view: the
    classifier keeps the class label, decision rule and class metrics; the segmenter reads
    the ``mask`` and keeps the mask metrics. A model of another task comes back unchanged.

    Args:
        cfg: a model declaration.
        task: ``classification`` or ``segmentation``.
    """
    if cfg.task != "multitask":
        return cfg
    kind = {"classification": "classification", "segmentation": "segmentation"}[task]
    floors = {k: v for k, v in cfg.gates.floors.items()
              if (k.startswith("per_class.") and kind == "classification")
              or (k in METRIC_KINDS and METRIC_KINDS[k].task == kind)}
    headline = cfg.headline if cfg.headline in metric_names(kind, len(cfg.classes)) else ""
    gates = replace(cfg.gates, floors=floors, every_class_predicted=cfg.gates.every_class_predicted
                    and kind == "classification")
    if kind == "classification":
        return replace(cfg, task=kind, headline=headline, gates=gates)
    return replace(cfg, task=kind, label="mask", classes=(), class_names=(), decision=DecisionRule(),
                   headline=headline or "lesion_mean_dice", gates=gates)


@dataclass(frozen=True)
class Params:
    """Everything in params.yaml that the stages read."""

    datasets: dict[str, DatasetConfig]
    validate: ValidationRules
    prepare: SplitConfig
    raw: dict[str, Any]
    models: dict[str, ModelConfig] = field(default_factory=dict)

    def model(self, name: str) -> ModelConfig:
        """The model declared under ``models.<name>``; KeyError lists the known names."""
        try:
            return self.models[name]
        except KeyError:
            known = sorted(self.models)
            raise KeyError(f"unknown model {name!r}; params.yaml declares {known}") from None

    def dataset(self, name: str) -> DatasetConfig:
        """The dataset declared under ``datasets.<name>``; KeyError lists the known names."""
        try:
            return self.datasets[name]
        except KeyError:
            known = sorted(self.datasets)
            raise KeyError(f"unknown dataset {name!r}; params.yaml declares {known}") from None


def _dataset(name: str, raw: dict[str, Any]) -> DatasetConfig:
    raw = dict(raw)
    dedup = DedupConfig(**raw.pop("dedup", {}))
    return DatasetConfig(
        name=name,
        path=Path(raw.pop("path")),
        modality=raw.pop("modality"),
        labels=tuple(raw.pop("labels", ("pathology",))),
        stratify=tuple(raw.pop("stratify", ("pathology",))),
        masks_required=bool(raw.pop("masks_required", False)),
        dedup=dedup,
        sites={str(k): Path(v) for k, v in (raw.pop("sites", None) or {}).items()},
        **_no_extra(name, raw),
    )


def _no_extra(where: str, raw: dict[str, Any]) -> dict[str, Any]:
    if raw:
        raise ValueError(f"params.yaml: unknown keys under {where}: {', '.join(sorted(raw))}")
    return {}


def _model(name: str, raw: dict[str, Any], datasets: dict[str, DatasetConfig]) -> ModelConfig:
    raw = dict(raw)
    where = f"models.{name}"
    if raw.get("dataset") not in datasets:
        raise ValueError(f"params.yaml: {where}.dataset {raw.get('dataset')!r} is not under datasets: "
                         f"{sorted(datasets)}")
    gates = dict(raw.pop("gates", {}) or {})
    gate = GateConfig(floors={str(k): float(v) for k, v in (gates.pop("floors", {}) or {}).items()},
                      max_regression=float(gates.pop("max_regression", 0.02)),
                      every_class_predicted=bool(gates.pop("every_class_predicted", False)))
    _no_extra(f"{where}.gates", gates)
    try:
        preprocess = PreprocessSpec.from_dict(dict(raw.pop("preprocess", {}) or {}))
        augment = AugmentConfig(**(raw.pop("augment", {}) or {}))
        roi = raw.pop("roi", None)
        if roi is not None:
            raw["roi"] = RoiConfig(**roi)
        if raw.get("decision") is not None:
            raw["decision"] = _decision(raw["decision"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"params.yaml: {where}: {exc}") from None
    known = {f for f in ModelConfig.__dataclass_fields__} - {"name", "preprocess", "augment", "gates"}
    _no_extra(where, {k: v for k, v in raw.items() if k not in known})
    for key in ("classes", "class_names"):
        if key in raw:
            raw[key] = tuple(raw[key])
    if "backbone" in raw:
        raw["backbone"] = _backbone(where, raw["backbone"])
    if "weights" in raw:  # a path is kept verbatim; the two keywords in any case
        text = "none" if raw["weights"] is None else str(raw["weights"])
        raw["weights"] = text.lower() if text.lower() in ("none", "imagenet") else text
    return ModelConfig(name=name, preprocess=preprocess, augment=augment, gates=gate, **raw)


def _decision(raw: Any) -> DecisionRule:
    """A declared decision rule: the :data:`~breastscan.decision.DECLARED_KEYS` only, a target
    sensitivity or a fixed cutoff (not both), each in (0, 1)."""
    if not isinstance(raw, dict):
        raise ValueError(f"decision must be a mapping of {', '.join(DECLARED_KEYS)}")
    unknown = sorted(set(raw) - set(DECLARED_KEYS))
    if unknown:
        raise ValueError(f"decision: unknown keys {', '.join(map(str, unknown))}; "
                         f"use {', '.join(DECLARED_KEYS)}")
    if raw.get("target_sensitivity") is not None and raw.get("cutoff") is not None:
        raise ValueError("decision: give a target_sensitivity (the cutoff is fitted) or a cutoff, not both")
    cutoff = raw.get("cutoff")
    if cutoff is not None and not 0.0 < float(cutoff) < 1.0:
        raise ValueError(f"decision: cutoff must be in (0, 1), got {cutoff}")
    return DecisionRule.from_dict(raw)


def _backbone(where: str, value: Any) -> str:
    name = str(value).strip().lower()
    if name not in BACKBONES:
        raise ValueError(f"params.yaml: {where}.backbone: unknown backbone {value!r}; choose one of "
                         f"{', '.join(BACKBONES)} (any case, e.g. EfficientNetB0)")
    return name


def parse_params(raw: dict[str, Any]) -> Params:
    """Build :class:`Params` from an already-loaded params mapping.

    Raises:
        ValueError: on unknown or invalid keys, with the offending section named.
    """
    datasets = {name: _dataset(name, cfg) for name, cfg in (raw.get("datasets") or {}).items()}
    models = {name: _model(name, cfg, datasets) for name, cfg in (raw.get("models") or {}).items()}
    return Params(
        datasets=datasets,
        validate=ValidationRules(**(raw.get("validate") or {})),
        prepare=SplitConfig(**(raw.get("prepare") or {})),
        raw=raw,
        models=models,
    )


def load_params(path: str | Path = DEFAULT_PARAMS) -> Params:
    """Read and check ``params.yaml``.

    Args:
        path: the params file.

    Returns:
        The typed parameters.
    """
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    return parse_params(raw)
