"""Model cards: a Markdown page that travels with every registered model.

:func:`render_model_card` writes what a reader needs before using a model: intended use
(research and engineering evaluation, **not** diagnosis), the data it was trained and tested
on, the preprocessing, the classes, the test metrics with the headline's 95 % confidence
interval, calibration, and known limitations. The card carries no version number: the
registry version it belongs to is recorded in MLflow next to it.

Inputs are the model's :class:`~breastscan.config.ModelConfig`, its
:class:`~breastscan.bundle.ModelContract`, the evaluation report (``metrics.json``) and a
``data`` mapping describing the dataset (see :func:`render_model_card`).

:func:`version_summary` says the same in brief, from the same inputs, for the description of
the model's registry version (what a reviewer sees first in the MLflow UI).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breastscan.jsonable import finite_float

if TYPE_CHECKING:
    from breastscan.bundle import ModelContract
    from breastscan.config import ModelConfig

log = logging.getLogger(__name__)

INTENDED_USE = (
    "Research and engineering evaluation of the breastscan platform: exercising the data, "
    "training, registry and serving pipeline, and comparing model versions."
)
NOT_FOR_CLINICAL_USE = (
    "**Not for diagnosis or clinical decisions.** This model is not a medical device and has not "
    "been clinically validated. Its outputs must not be used to screen, diagnose, triage or treat "
    "anyone, nor shown to patients or clinicians as medical advice."
)

DEFAULT_LIMITATIONS: tuple[str, ...] = (
    "Trained and tested on the project's synthetic phantoms unless it was retrained on real data; "
    "metrics on phantoms say nothing about performance on clinical images.",
    "Small test set: the confidence intervals are wide, and differences between versions within "
    "them are not meaningful.",
    "Not validated on external sites, other vendors' equipment, other acquisition protocols or "
    "other populations; expect a drop under any such shift.",
    "Inputs are resized to a small fixed size; small findings (calcifications, small masses) may "
    "be lost.",
    "Probabilities are calibrated on the validation split only; calibration may not hold on new data.",
)

# Report keys that are not test metrics (shown elsewhere on the card, or bookkeeping).
_NOT_METRICS = {
    "headline", "headline_value", "headline_ci_low", "headline_ci_high", "headline_ci_level",
    "n_test", "n", "n_val", "temperature", "calibration", "threshold", "class_names", "confusion_matrix",
    "per_class", "decision", "sites",
}
_ECE_BEFORE = ("ece_before", "ece_uncalibrated", "ece_raw", "val_ece_before", "test_ece_before")
_ECE_AFTER = ("ece_after", "ece_calibrated", "ece", "val_ece_after", "test_ece_after")


def _fmt(value: Any, digits: int = 3) -> str:
    number = finite_float(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _count(value: Any) -> str:
    number = finite_float(value)
    return "n/a" if number is None else str(int(number))


def _first(metrics: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for key in keys:
        value = finite_float(metrics.get(key))
        if value is not None:
            return value
    return None


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _split_sizes(data: Mapping[str, Any]) -> list[list[Any]]:
    splits = data.get("splits")
    rows: list[list[Any]] = []
    if isinstance(splits, Mapping):
        for split in ("train", "val", "test"):
            info = splits.get(split)
            if isinstance(info, Mapping):
                rows.append([split, info.get("images", "n/a"), info.get("groups", "n/a")])
            elif info is not None:
                rows.append([split, info, "n/a"])
    return rows


def _is_synthetic(data: Mapping[str, Any]) -> bool | None:
    flag = data.get("synthetic")
    if isinstance(flag, bool):
        return flag
    text = " ".join(str(data.get(k, "")) for k in ("dataset", "path", "source")).lower()
    if "phantom" in text or "synthetic" in text:
        return True
    return None


def _what_it_does(cfg: ModelConfig, modality: str, class_names: Sequence[str]) -> str:
    """One sentence: what the model does to an image of ``modality``."""
    image = f"{'an' if modality[:1].lower() in 'aeiou' else 'a'} {modality} image"
    classes = (f"Classifies the **{cfg.label}** of {image} into "
               f"{len(class_names)} classes ({', '.join(class_names)}).")
    lesions = f"Segments lesions in {image}: one probability per pixel."
    return {"classification": classes, "segmentation": lesions,
            "multitask": f"{classes[:-1]}, and outlines its lesion (one probability per pixel), both "
                         "from one forward pass of one network."}[cfg.task]


def _summary_section(cfg: ModelConfig, contract: ModelContract) -> list[str]:
    """The title and a one-sentence summary of what the model does."""
    return [f"# Model card: {cfg.registered_name}", "",
            _what_it_does(cfg, contract.modality, contract.class_names), ""]


def _intended_use_section() -> list[str]:
    """Intended use, the not-for-clinical-use warning and what is out of scope."""
    return ["## Intended use", "", f"- {INTENDED_USE}", f"- {NOT_FOR_CLINICAL_USE}",
            "- Out of scope: any use on real patients, any unattended decision, any population or "
            "modality other than the one in *Data*.", ""]


def _data_rows(data: Mapping[str, Any], contract: ModelContract) -> list[list[Any]]:
    """Rows of the data table: dataset and modality, then the locations, hashes and counts given."""
    rows = [["dataset", f"`{data.get('dataset', contract.dataset)}`"],
            ["modality", data.get("modality", contract.modality)]]
    for key, label in (("path", "location"), ("source", "source"), ("data_hash", "data hash (DVC)"),
                       ("split_id", "test split id")):
        if data.get(key):
            rows.append([label, f"`{data[key]}`"])
    for key, label in (("n_images", "images after validation"), ("n_groups", "patient/duplicate groups"),
                       ("excluded_images", "images excluded (label conflicts)")):
        if data.get(key) is not None:
            rows.append([label, data[key]])
    return rows


def _data_section(data: Mapping[str, Any], contract: ModelContract) -> list[str]:
    """The data table, the split sizes and a note on synthetic data."""
    out = ["## Data", ""]
    out += _table(["", ""], _data_rows(data, contract)) + [""]
    sizes = _split_sizes(data)
    if sizes:
        out += ["Splits are grouped (near-duplicates and one patient's images stay in one split) "
                "and stratified:", ""]
        out += _table(["split", "images", "groups"], sizes) + [""]
    synthetic = _is_synthetic(data)
    if synthetic:
        out += ["> The data are **synthetic phantoms** generated by the project "
                "(`breastscan synth`), not patient images. The metrics below show that the "
                "pipeline works, not that the model works on real images.", ""]
    elif synthetic is None:
        out += ["> The demo data shipped with the project are synthetic phantoms; unless this model "
                "was trained on a real dataset, its metrics say nothing about real images.", ""]
    return out


def _preprocessing_section(cfg: ModelConfig, contract: ModelContract) -> list[str]:
    """The model input shape and the preprocessing spec's settings."""
    h, w, c = contract.input_shape
    out = ["## Input and preprocessing", "",
           f"Model input: `(batch, {h}, {w}, {c})` float32 in [0, 1], produced from any PNG, JPEG, PGM "
           "or DICOM image by the preprocessing spec saved with the model (`preprocess.json`, "
           f"spec id `{contract.spec_id or cfg.preprocess.spec_id}`):", ""]
    spec_rows = [[k, f"`{v}`"] for k, v in cfg.preprocess.to_dict().items()]
    return out + _table(["setting", "value"], spec_rows) + [""]


def _outputs_section(cfg: ModelConfig, contract: ModelContract) -> list[str]:
    """What the model returns: class probabilities in order, or a per-pixel probability."""
    out = ["## Outputs", ""]
    if cfg.task == "multitask":
        out += ["Two outputs from one forward pass of one U-Net (a class head reads its bottleneck and "
                "its decoder's features pooled over the lesion it outlines):", ""]
    if cfg.has_classes:
        out += ["Calibrated class probabilities, `(batch, k)`, rows summing to 1, in this order:", ""]
        out += _table(["index", "label value", "class"],
                      [[i, f"`{v}`", n] for i, (v, n) in enumerate(zip(contract.classes, contract.class_names,
                                                                        strict=False))]) + [""]
        if cfg.roi is not None:
            roi = cfg.roi
            out += [f"Lesion-aware: the model segments its input with its own U-Net ({roi.seg_size[0]}x"
                    f"{roi.seg_size[1]}), cuts the square around the predicted lesion ({roi.margin:g} times "
                    f"its longer side) out of the input and classifies that crop ({roi.crop_size[0]}x"
                    f"{roi.crop_size[1]}); with no lesion found it classifies the whole image. The "
                    "probabilities rest on the lesion's neighbourhood; Grad-CAM maps are drawn in its box.",
                    ""]
    if cfg.has_mask:
        h, w, _ = contract.input_shape
        out += [f"Lesion probability per pixel, `(batch, {h}, {w}, 1)` in [0, 1]; a pixel is lesion "
                f"above the threshold {_fmt(contract.threshold, 2)}.", ""]
    if contract.tta == "flip":
        out += ["Test-time flips: every output is the mean of the model's on the image and on its left-right "
                "mirror (a mask mirrored back), wherever the model runs (evaluation, calibration, the "
                "service): twice the compute per image.", ""]
    return out


def _metric_rows(cfg: ModelConfig, metrics: Mapping[str, Any], headline: str, value: float | None,
                 low: float | None, high: float | None) -> list[list[Any]]:
    """Rows of the metrics table (metric, value, 95 % CI of the headline, promotion floor),
    sorted by name; the headline first when the report names it only as ``headline_value``."""
    rows: list[list[Any]] = []
    for key in sorted(metrics):
        if key in _NOT_METRICS or key.startswith(("ece", "val_", "headline")):
            continue
        number = finite_float(metrics[key])
        if number is None:
            continue
        floor = cfg.gates.floors.get(key)
        ci = f"{_fmt(low)}-{_fmt(high)}" if key == headline and low is not None and high is not None else ""
        rows.append([f"**{key}**" if key == headline else key, _fmt(number), ci,
                     _fmt(floor) if floor is not None else ""])
    if not any(key == headline for key in metrics) and value is not None:
        rows.insert(0, [f"**{headline}**", _fmt(value),
                        f"{_fmt(low)}-{_fmt(high)}" if low is not None and high is not None else "",
                        _fmt(cfg.gates.floors[headline]) if headline in cfg.gates.floors else ""])
    return rows


def _headline(cfg: ModelConfig, metrics: Mapping[str, Any]) -> tuple[str, float | None, float | None,
                                                                     float | None]:
    """``(name, value, ci_low, ci_high)`` of the report's headline metric (``None`` where unknown)."""
    headline = str(metrics.get("headline") or cfg.headline)
    value = finite_float(metrics.get("headline_value"))
    if value is None:
        value = finite_float(metrics.get(headline))
    return (headline, value, finite_float(metrics.get("headline_ci_low")),
            finite_float(metrics.get("headline_ci_high")))


def _headline_text(headline: str, value: float | None, low: float | None, high: float | None) -> str:
    """``**macro_auc = 0.850** (95% CI 0.780-0.910, bootstrap)``."""
    return (f"**{headline} = {_fmt(value)}**"
            + (f" (95% CI {_fmt(low)}-{_fmt(high)}, bootstrap)" if low is not None and high is not None
               else " (95% CI not computed)"))


def _metrics_section(cfg: ModelConfig, metrics: Mapping[str, Any], data: Mapping[str, Any]) -> list[str]:
    """The headline with its 95 % CI, the metrics table and the promotion rule."""
    headline, value, low, high = _headline(cfg, metrics)
    n_test = metrics.get("n_test", metrics.get("n"))
    out = ["## Metrics", "",
           f"On the held-out test split ({_count(n_test)} images"
           + (f", split `{data['split_id']}`" if data.get("split_id") else "") + "). Headline metric: "
           + _headline_text(headline, value, low, high) + ".", ""]
    rows = _metric_rows(cfg, metrics, headline, value, low, high)
    if rows:
        out += _table(["metric", "value", "95% CI", "promotion floor"], rows) + [""]
    out += [f"Promotion to production needs every floor met, and neither the headline nor a floored metric "
            f"more than {_fmt(cfg.gates.max_regression)} below the current production version on the "
            "same test split.", ""]
    return out


def _positive_class(cfg: ModelConfig) -> str:
    """The class whose sensitivity a site's row shows: the decision rule's positive class,
    else ``malignant`` where the model has it, else its last class."""
    return cfg.decision.positive or ("malignant" if "malignant" in cfg.class_names else cfg.class_names[-1])


def _site_rows(cfg: ModelConfig, sites: Mapping[str, Any]) -> list[list[Any]]:
    """One row per site: test images, the headline with its CI, and a classifier's malignant-class
    (or positive-class) sensitivity / specificity at the decision rule and its ECE."""
    positive = _positive_class(cfg)
    rows = []
    for site, m in sorted(sites.items()):
        low, high = finite_float(m.get("headline_ci_low")), finite_float(m.get("headline_ci_high"))
        row = [site, _count(m.get("n_test")), _fmt(finite_float(m.get("headline_value"))),
               f"{_fmt(low)}-{_fmt(high)}" if low is not None and high is not None else ""]
        if cfg.has_classes:
            stats = (m.get("per_class") or {}).get(positive) or {}
            row += [_fmt(finite_float(stats.get("sensitivity"))),
                    _fmt(finite_float(stats.get("specificity"))),
                    _fmt(finite_float(m.get("ece")))]
        rows.append(row)
    return rows


def _sites_section(cfg: ModelConfig, metrics: Mapping[str, Any]) -> list[str]:
    """A model trained on a pool of sites: each site's test rows scored apart (none otherwise)."""
    table = _site_table(cfg, metrics)
    if not table:
        return []
    return ["## Per site", "",
            "Trained on a pool of sites; each site's test rows scored apart (the pooled numbers are above). "
            "A metric a site cannot define (e.g. the AUC of a class it lacks) is left out.", "",
            *table, ""]


def _site_table(cfg: ModelConfig, metrics: Mapping[str, Any]) -> list[str]:
    """The per-site table of a model trained on a pool (no lines for one site)."""
    sites = metrics.get("sites")
    if not isinstance(sites, Mapping) or not sites:
        return []
    header = ["site", "test images", cfg.headline, "95% CI"]
    if cfg.has_classes:
        positive = _positive_class(cfg)
        header += [f"{positive} sensitivity", f"{positive} specificity", "ECE"]
    return _table(header, _site_rows(cfg, sites))


def _calibration_section(cfg: ModelConfig, contract: ModelContract, metrics: Mapping[str, Any]) -> list[str]:
    """The temperature and the ECE before/after calibration (classifiers; none for segmenters)."""
    if not cfg.has_classes:
        return []
    temperature = finite_float(metrics.get("temperature"))
    if temperature is None:
        temperature = contract.temperature
    before, after = _first(metrics, _ECE_BEFORE), _first(metrics, _ECE_AFTER)
    found = metrics.get("calibration")
    record: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    if _uncalibrated(record, temperature):
        served = (f"Temperature scaling was fitted on the validation split (T = "
                  f"{_fmt(record['fitted_temperature'])}) but did not lower the validation ECE and NLL "
                  "(below), so the served probabilities are **uncalibrated** (T = 1).")
    else:
        served = (f"Temperature scaling fitted on the validation split: T = {_fmt(temperature)} "
                  "(served probabilities are `softmax(logits / T)`).")
    rows = [["test, before calibration", _fmt(before)], ["test, as served", _fmt(after)]]
    rows += [[f"validation, {label}", _fmt(record.get(f"val_ece_{key}"))]
             for key, label in (("before", "T = 1"), ("after", "fitted T")) if f"val_ece_{key}" in record]
    table = _table(["expected calibration error (ECE)", "value"], rows)
    return ["## Calibration", "", served, ""] + table + [""]


def _uncalibrated(record: Mapping[str, Any], temperature: float | None) -> bool:
    """Temperature scaling was fitted but not kept: the served probabilities are the raw softmax."""
    return record.get("fitted_temperature") is not None and temperature == 1.0


def _decision_section(cfg: ModelConfig, contract: ModelContract) -> list[str]:
    """How a classifier calls its class: the rule, its cutoff and target, and the validation
    sensitivity / specificity at the cutoff (none for segmenters)."""
    if not cfg.has_classes:
        return []
    rule = contract.rule
    out = ["## Decision rule", "", rule.describe(), ""]
    if rule.is_argmax:
        return out + ["The served `predicted` class, the test metrics and the promotion gates use this rule.",
                      ""]
    target = _fmt(rule.target_sensitivity, 2) if rule.target_sensitivity else "none (declared cutoff)"
    rows = [["rule", f"`{rule.rule}`"], ["positive class", rule.positive], ["weighed against", rule.versus],
            ["cutoff", _fmt(rule.cutoff)], ["target sensitivity", target],
            ["fitted on", rule.fitted_on or "declared"],
            [f"validation sensitivity ({rule.positive})", _fmt(rule.val_sensitivity)],
            [f"validation specificity ({rule.positive} vs rest)", _fmt(rule.val_specificity)],
            ["validation images (positive / other)",
             f"{_count(rule.val_positives)} / {_count(rule.val_negatives)}"]]
    return out + _table(["", ""], rows) + [
        "", "The served `predicted` class, the test metrics (sensitivity, specificity, per-class statistics) "
        "and the promotion gates all use this rule, not the most probable class; `confidence` stays the "
        "probability of the predicted class.", ""]


def _sci(value: Any) -> str:
    number = finite_float(value)
    return "n/a" if number is None else f"{number:.1e}"


def _ms(times: Any) -> str:
    """``1.3 / 0.49 ms``: milliseconds per image at batch 1 / 32 (``export.json``'s ``*_ms``)."""
    found = times if isinstance(times, Mapping) else {}
    values = [finite_float(found.get(k)) for k in ("batch_1", "batch_32")]
    return " / ".join("n/a" if v is None else f"{v:.2g}" for v in values) + " ms"


def _serving_section(export: Mapping[str, Any] | None) -> list[str]:
    """Which runtime serves the model: its ONNX export with the check against Keras, or TensorFlow
    and why (none without an export report)."""
    if not export:
        return []
    check = export.get("equivalence") or {}
    out = ["## Serving runtime", "", _serving_text(export), ""]
    if check.get("error"):
        return out
    criteria = check.get("criteria") or {}
    agreement = finite_float(check.get("decision_agreement"))
    ties = len(check.get("disagreements") or [])
    rows = [[f"largest {what} probability difference", _sci(check.get(key)),
             f"<= {_sci(criteria.get('max_prob_diff'))}"]
            for key, what in (("max_prob_diff", "class"), ("max_mask_prob_diff", "mask pixel"))
            if check.get(key) is not None]
    rows.append(["TensorFlow against itself (batch 1 vs 32), for scale", _sci(check.get("keras_batch_diff")),
                 ""])
    if agreement is not None:
        rows.append(["decision agreement", f"{agreement:.1%} ({ties} disagreeing)",
                     f">= {_fmt(criteria.get('decision_agreement'), 3)}, every disagreement a tie"])
    if check.get("mask_dice_min") is not None:
        dice = f"{_fmt(check['mask_dice_min'], 4)} / {_fmt(check.get('mask_dice_mean'), 4)}"
        rows.append(["mask Dice, smallest / mean", dice, f">= {_fmt(criteria.get('mask_dice_min'), 3)}"])
    rows += [["time per image, batch 1 / 32, Keras", _ms(check.get("keras_ms")), ""],
             ["time per image, batch 1 / 32, ONNX Runtime", _ms(check.get("onnx_ms")), ""]]
    return out + _table(["ONNX export vs Keras", "value", "pass criterion"], rows) + [""]


def _serving_text(export: Mapping[str, Any]) -> str:
    """One paragraph: which runtime serves the model, and why."""
    check = export.get("equivalence") or {}
    if check.get("error"):
        return f"The model could not be exported to ONNX ({check['error']}); TensorFlow serves it."
    flips = ", test-time flips built in" if export.get("tta") == "flip" else ""
    how = f"ONNX (opset {export.get('opset')}, {export.get('converter')}{flips})"
    images = _count(check.get("images"))
    if export.get("passed"):
        return (f"The service runs this model's forward pass exported to {how} with ONNX Runtime, without "
                "TensorFlow (`model.onnx` beside `model.keras`); the export answered as the Keras model on "
                f"the {images} test images:")
    return (f"The model's export to {how} did not answer as the Keras model on the {images} test images "
            f"({check.get('reason') or 'check failed'}); TensorFlow serves it.")


def _limitations_section(limitations: Sequence[str] | None) -> list[str]:
    """The known limitations as a list (:data:`DEFAULT_LIMITATIONS` when ``None``)."""
    out = ["## Known limitations", ""]
    out += [f"- {item}" for item in (DEFAULT_LIMITATIONS if limitations is None else limitations)]
    return out + [""]


def render_model_card(cfg: ModelConfig, contract: ModelContract, metrics: Mapping[str, Any], *,
                      data: Mapping[str, Any], limitations: Sequence[str] | None = None,
                      export: Mapping[str, Any] | None = None) -> str:
    """Render the model card as Markdown.

    Args:
        cfg: the model's configuration (name, task, headline, gates, preprocessing).
        contract: the served model's contract (classes, input shape, temperature, decision
            rule, threshold).
        metrics: the evaluation report: metric name -> value, ``headline_value``,
            ``headline_ci_low``/``headline_ci_high`` (95 % bootstrap CI), ``n_test``, and for
            classifiers ``temperature`` and ECE before/after calibration (``ece_before``,
            ``ece_after``; ``ece_uncalibrated``/``ece_calibrated`` are accepted too).
        data: the dataset: ``dataset``, ``modality``, ``path``, ``data_hash``, ``split_id``,
            ``splits`` (``{"train": {"images": n, "groups": g}, ...}`` as in
            ``reports/prepare/<dataset>.json``), optional ``synthetic`` (bool) and ``source``.
        limitations: known limitations; ``None`` uses :data:`DEFAULT_LIMITATIONS`.
        export: the ONNX export's report (``export.json``,
            :meth:`breastscan.exported.ExportInfo.to_dict`): a *Serving runtime* section.

    Returns:
        The card, Markdown text ending in a newline.
    """
    out = _summary_section(cfg, contract)
    out += _intended_use_section()
    out += _data_section(data, contract)
    out += _preprocessing_section(cfg, contract)
    out += _outputs_section(cfg, contract)
    out += _metrics_section(cfg, metrics, data)
    out += _sites_section(cfg, metrics)
    out += _calibration_section(cfg, contract, metrics)
    out += _decision_section(cfg, contract)
    out += _serving_section(export)
    out += _limitations_section(limitations)
    return "\n".join(out)


def write_model_card(cfg: ModelConfig, contract: ModelContract, metrics: Mapping[str, Any], *,
                     data: Mapping[str, Any], path: str | Path,
                     limitations: Sequence[str] | None = None,
                     export: Mapping[str, Any] | None = None) -> Path:
    """Render the card (see :func:`render_model_card`) and write it to ``path``.

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(cfg, contract, metrics, data=data, limitations=limitations,
                                      export=export))
    log.info("model card written to %s", path)
    return path


# --------------------------------------------------------------------------- the card in brief

SUMMARY_LIMIT = 4000
"""Most characters of :func:`version_summary`: MLflow keeps up to 5000 in a version's
description, and the registry appends how the version got its stage."""


def version_summary(cfg: ModelConfig, metrics: Mapping[str, Any], *, data: Mapping[str, Any],
                    contract: ModelContract | None = None, export: Mapping[str, Any] | None = None) -> str:
    """The model card in brief, as the description of the model's registry version (Markdown).

    Built from the inputs of :func:`render_model_card` (whichever the caller has): what the
    model does, intended use, data, the headline with its 95 % CI, per-class and per-site
    numbers where the report has them, calibration, and the promotion gates with this
    version's values. At most :data:`SUMMARY_LIMIT` characters (longer text is cut at a line).

    Args:
        cfg: the model's configuration.
        metrics: the evaluation report (see :func:`render_model_card`); any key may be missing.
        data: the dataset (see :func:`render_model_card`); any key may be missing.
        contract: the served model's contract (modality, class names, temperature), if known.
        export: the ONNX export's report (``export.json``), if any: one line on the serving runtime.

    Returns:
        Markdown text.
    """
    modality = str(data.get("modality") or (contract.modality if contract is not None else "") or "breast")
    class_names = contract.class_names if contract is not None else cfg.class_names
    blocks = [f"**{cfg.registered_name}** ({cfg.task}). {_what_it_does(cfg, modality, class_names)}",
              f"**Intended use:** {INTENDED_USE} **Not for diagnosis or clinical decisions.**",
              _data_brief(data, metrics),
              "**Headline (test split):** " + _headline_text(*_headline(cfg, metrics)) + ".",
              _titled("Per class (test split)", _per_class_table(metrics)),
              _titled("Per site (test split)", _site_table(cfg, metrics)),
              _calibration_brief(cfg, contract, metrics),
              _gates_brief(cfg, metrics),
              _serving_brief(export),
              "The full model card is the `model_card.md` artifact of this version's model."]
    return _fit("\n\n".join(b for b in blocks if b), SUMMARY_LIMIT)


def _titled(title: str, table: list[str]) -> str:
    return f"**{title}:**\n\n" + "\n".join(table) if table else ""


def _data_brief(data: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    """``**Data:** dataset `x` (synthetic phantoms), test split `id` (79 images), data hash `h`.``"""
    synthetic = {True: " (synthetic phantoms: the numbers show the pipeline works, not the model on real "
                       "images)", False: " (real images)", None: ""}[_is_synthetic(data)]
    parts = [f"dataset `{data.get('dataset', 'unknown')}`{synthetic}"]
    n_test = metrics.get("n_test", metrics.get("n"))
    if data.get("split_id") or n_test is not None:
        parts.append("test split" + (f" `{data['split_id']}`" if data.get("split_id") else "")
                     + (f" ({_count(n_test)} images)" if n_test is not None else ""))
    if data.get("data_hash"):
        parts.append(f"data hash `{data['data_hash']}`")
    return "**Data:** " + ", ".join(parts) + "."


def _per_class_table(metrics: Mapping[str, Any]) -> list[str]:
    """Sensitivity, specificity, precision and AUC of each class (no lines without ``per_class``)."""
    per_class = metrics.get("per_class")
    if not isinstance(per_class, Mapping) or not per_class:
        return []
    stats = ("sensitivity", "specificity", "precision", "auc")
    rows = [[name, *(_fmt(s.get(k)) for k in stats), _count(s.get("support"))]
            for name, s in per_class.items() if isinstance(s, Mapping)]
    return _table(["class", *stats, "support"], rows)


def _calibration_brief(cfg: ModelConfig, contract: ModelContract | None, metrics: Mapping[str, Any]) -> str:
    """The temperature and the test ECE before/after (classifiers; empty for segmenters)."""
    if not cfg.has_classes:
        return ""
    temperature = finite_float(metrics.get("temperature"))
    if temperature is None and contract is not None:
        temperature = contract.temperature
    found = metrics.get("calibration")
    how = ("uncalibrated (T = 1: the fitted temperature did not help on validation)"
           if _uncalibrated(found if isinstance(found, Mapping) else {}, temperature)
           else f"T = {_fmt(temperature)} (temperature scaling fitted on the validation split)")
    before, after = _first(metrics, _ECE_BEFORE), _first(metrics, _ECE_AFTER)
    return f"**Calibration:** {how}; test ECE {_fmt(before)} before, {_fmt(after)} as served."


def _gates_brief(cfg: ModelConfig, metrics: Mapping[str, Any]) -> str:
    """The promotion floors with this version's values, and the no-regression rule."""

    floors = []
    for metric, floor in cfg.gates.floors.items():
        value = report_metric(metrics, metric)
        verdict = "n/a" if value is None else ("ok" if value >= floor else "FAIL")
        floors.append(f"{metric} {_fmt(value)} vs floor {_fmt(floor)} ({verdict})")
    if cfg.gates.every_class_predicted and cfg.has_classes:
        floors.append("every class predicted on the test split")
    return ("**Promotion gates** (params.yaml): " + ("; ".join(floors) or "no floors")
            + f"; and neither the headline nor a floored metric more than {_fmt(cfg.gates.max_regression)} "
              "below the version holding the stage, on the same test split.")


def _serving_brief(export: Mapping[str, Any] | None) -> str:
    """``**Serving runtime:** ONNX Runtime (...)`` or ``TensorFlow (why)``; empty without a report."""
    if not export:
        return ""
    check = export.get("equivalence") or {}
    if check.get("error"):
        return f"**Serving runtime:** TensorFlow (no ONNX export: {str(check['error'])[:300]})."
    if not export.get("passed"):
        return (f"**Serving runtime:** TensorFlow (the ONNX export did not answer as the Keras model: "
                f"{str(check.get('reason'))[:300]}).")
    diffs = [v for v in (finite_float(check.get(k)) for k in ("max_prob_diff", "max_mask_prob_diff"))
             if v is not None]
    parts = [f"probabilities within {max(diffs):.1e}" if diffs else ""]
    agreement = finite_float(check.get("decision_agreement"))
    parts.append(f"decisions agree on {agreement:.1%}" if agreement is not None else "")
    parts.append(f"smallest mask Dice {_fmt(check.get('mask_dice_min'), 4)}"
                 if check.get("mask_dice_min") is not None else "")
    return (f"**Serving runtime:** ONNX Runtime, no TensorFlow (export checked against Keras on "
            f"{_count(check.get('images'))} test images: {', '.join(p for p in parts if p)}).")


def _fit(text: str, limit: int) -> str:
    """``text``, or its lines up to ``limit`` characters and a note that the rest was cut."""
    if len(text) <= limit:
        return text
    note = "\n\n(cut: see the full model card)"
    cut = text.rfind("\n", 0, limit - len(note))
    return text[:cut if cut > 0 else limit - len(note)] + note


def report_metric(metrics: Mapping[str, Any], key: str) -> float | None:
    """A metric from a report: ``metrics[key]``, a nested ``per_class.<class>.<stat>``, or the
    headline value when key is the headline."""
    node: Any = metrics
    for part in key.split(".", 2) if key.startswith("per_class.") else [key]:
        node = node.get(part) if isinstance(node, Mapping) else None
    value = finite_float(node)
    if value is None and metrics.get("headline") == key:
        value = finite_float(metrics.get("headline_value"))
    return value
