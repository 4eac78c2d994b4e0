"""breastscan.registry.modelcard: the Markdown model card."""

from __future__ import annotations

from pathlib import Path

from breastscan.bundle import ModelContract
from breastscan.config import GateConfig, ModelConfig
from breastscan.imaging.preprocessing import PreprocessSpec
from breastscan.registry.modelcard import DEFAULT_LIMITATIONS, render_model_card, write_model_card

SPEC = PreprocessSpec(height=128, width=96, clahe=True)
DATA = {
    "dataset": "mammography", "path": "data/mammography", "modality": "mammography",
    "split_id": "0123456789ab", "data_hash": "285bbc4b1161f05404f51943c39e9e23.dir", "synthetic": True,
    "n_images": 400, "n_groups": 279,
    "splits": {"train": {"images": 253, "groups": 170}, "val": {"images": 64, "groups": 43},
               "test": {"images": 79, "groups": 52}},
}


def density_cfg() -> ModelConfig:
    return ModelConfig(name="density", task="classification", dataset="mammography", label="density",
                       classes=(1, 2, 3, 4), preprocess=SPEC, headline="quadratic_kappa",
                       gates=GateConfig(floors={"quadratic_kappa": 0.5, "accuracy": 0.45},
                                        max_regression=0.03))


def test_classifier_card() -> None:
    cfg = density_cfg()
    contract = ModelContract.from_config(cfg, "mammography")
    metrics = {"headline": "quadratic_kappa", "headline_value": 0.712, "headline_ci_low": 0.61,
               "headline_ci_high": 0.79, "quadratic_kappa": 0.712, "accuracy": 0.58, "macro_auc": 0.81,
               "balanced_accuracy": None, "n_test": 79, "temperature": 1.37, "ece_before": 0.121,
               "ece_after": 0.043, "per_class": {"A": {"auc": 0.9}}, "confusion_matrix": [[1]]}
    card = render_model_card(cfg, contract, metrics, data=DATA, limitations=None)
    assert card.startswith("# Model card: breastscan-density\n")
    assert "version" not in card.splitlines()[0].lower()
    lower = card.lower()
    assert "not for diagnosis or clinical decisions" in lower
    assert "research and engineering evaluation" in lower
    # data
    assert "285bbc4b1161f05404f51943c39e9e23.dir" in card and "0123456789ab" in card
    assert "| test | 79 | 52 |" in card
    assert "synthetic phantoms" in card
    # preprocessing and classes
    assert "`(batch, 128, 96, 1)` float32 in [0, 1]" in card
    assert f"`{SPEC.spec_id}`" in card and "| clahe | `True` |" in card
    assert "| 0 | `1` | A |" in card and "| 3 | `4` | D |" in card
    # metrics, CI, floors
    assert "**quadratic_kappa = 0.712** (95% CI 0.610-0.790, bootstrap)" in card
    assert "| **quadratic_kappa** | 0.712 | 0.610-0.790 | 0.500 |" in card
    assert "| accuracy | 0.580 |  | 0.450 |" in card
    assert "| macro_auc | 0.810 |  |  |" in card
    assert "balanced_accuracy" not in card and "per_class" not in card
    assert "79 images" in card
    # calibration
    assert "T = 1.370" in card
    assert "| test, before calibration | 0.121 |" in card and "| test, as served | 0.043 |" in card
    assert "Temperature scaling fitted on the validation split" in card
    # decision rule: the arg-max, said in one line
    assert "## Decision rule\n\nThe most probable class is called (arg-max)." in card
    # default limitations
    for item in DEFAULT_LIMITATIONS:
        assert f"- {item}" in card
    assert "external sites" in card and "Small test set" in card


def test_segmentation_card_and_custom_limitations(tmp_path: Path) -> None:
    cfg = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask",
                      preprocess=PreprocessSpec(height=96, width=128), headline="mean_dice",
                      gates=GateConfig(floors={"mean_dice": 0.5}))
    contract = ModelContract.from_config(cfg, "ultrasound")
    metrics = {"headline": "mean_dice", "headline_value": 0.66, "mean_dice": 0.66, "mean_iou": 0.52,
               "n_test": 40}
    data = {"dataset": "ultrasound", "modality": "ultrasound"}
    path = write_model_card(cfg, contract, metrics, data=data, path=tmp_path / "cards" / "card.md",
                            limitations=["Only one scanner."])
    card = path.read_text()
    assert "## Calibration" not in card
    assert "probability per pixel" in card and "threshold 0.50" in card
    assert "mean_dice = 0.660** (95% CI not computed)" in card
    assert "- Only one scanner." in card and DEFAULT_LIMITATIONS[0] not in card
    assert "not for diagnosis" in card.lower()
    assert "unless this model was trained on a real dataset" in card  # synthetic-or-not unknown


def test_real_data_card_has_no_synthetic_note() -> None:
    cfg = density_cfg()
    card = render_model_card(cfg, ModelContract.from_config(cfg, "mammography"), {"quadratic_kappa": 0.6},
                             data={**DATA, "synthetic": False}, limitations=[])
    assert "synthetic phantoms" not in card
    assert "**quadratic_kappa = 0.600** (95% CI not computed)" in card
    assert card.rstrip().endswith("## Known limitations")


def test_card_says_when_the_served_model_is_uncalibrated() -> None:
    """A fitted temperature that did not help on validation is not served, and the card says so."""
    cfg = density_cfg()
    contract = ModelContract.from_config(cfg, "mammography")
    record = {"fitted_temperature": 2.5, "val_nll_before": 0.70, "val_nll_after": 0.69,
              "val_ece_before": 0.05, "val_ece_after": 0.08, "source": "uncalibrated"}
    metrics = {"headline": "quadratic_kappa", "headline_value": 0.7, "quadratic_kappa": 0.7, "n_test": 79,
               "temperature": 1.0, "ece_before": 0.06, "ece_after": 0.06, "calibration": record}
    card = render_model_card(cfg, contract, metrics, data=DATA, limitations=None)
    assert "(T = 2.500) but did not lower the validation ECE and NLL" in card
    assert "**uncalibrated** (T = 1)" in card
    assert "| validation, T = 1 | 0.050 |" in card and "| validation, fitted T | 0.080 |" in card


def test_card_states_the_fitted_decision_rule() -> None:
    from breastscan.decision import DecisionRule

    cfg = ModelConfig(name="tumor", task="classification", dataset="ultrasound", label="pathology",
                      classes=("benign", "malignant", "normal"), preprocess=SPEC, headline="macro_auc",
                      decision=DecisionRule("positive_ratio", positive="malignant", versus="benign",
                                            target_sensitivity=0.9))
    fitted = DecisionRule("positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9,
                          cutoff=0.2134, fitted_on="validation split", val_sensitivity=0.913,
                          val_specificity=0.624, val_positives=23, val_negatives=101)
    contract = ModelContract.from_config(cfg, "ultrasound")
    assert contract.rule == cfg.decision  # declared, not fitted yet
    served = ModelContract.from_dict({**contract.to_dict(), "decision": fitted.to_dict()})
    metrics = {"headline": "macro_auc", "headline_value": 0.8, "macro_auc": 0.8, "n_test": 150,
               "temperature": 1.2, "decision": fitted.to_dict()}
    card = render_model_card(cfg, served, metrics, data=DATA, limitations=[])
    section = card.split("## Decision rule", 1)[1].split("\n## ", 1)[0]
    assert fitted.describe() in section
    for row in ("| cutoff | 0.213 |", "| target sensitivity | 0.90 |", "| fitted on | validation split |",
                "| validation sensitivity (malignant) | 0.913 |",
                "| validation specificity (malignant vs rest) | 0.624 |",
                "| validation images (positive / other) | 23 / 101 |"):
        assert row in section, row
    assert "not the most probable class" in section
    assert "| decision |" not in card  # the rule is no metric row


def test_version_summary_is_the_card_in_brief() -> None:
    """The registry version's description: from the card's inputs, never from its Markdown."""
    from breastscan.registry.modelcard import SUMMARY_LIMIT, version_summary

    cfg = density_cfg()
    contract = ModelContract.from_config(cfg, "mammography")
    site = {"headline": "quadratic_kappa", "headline_value": 0.70, "headline_ci_low": 0.6,
            "headline_ci_high": 0.8, "n_test": 40, "ece": 0.05,
            "per_class": {"D": {"sensitivity": 0.5, "specificity": 0.9}}}
    metrics = {"headline": "quadratic_kappa", "headline_value": 0.712, "headline_ci_low": 0.61,
               "headline_ci_high": 0.79, "quadratic_kappa": 0.712, "accuracy": 0.41, "n_test": 79,
               "temperature": 1.37, "ece_before": 0.121, "ece_after": 0.043,
               "per_class": {"A": {"sensitivity": 0.9, "specificity": 0.8, "precision": None, "auc": 0.95,
                                   "support": 20}},
               "sites": {"busi": site, "busbra": {**site, "headline_value": 0.65}}}
    summary = version_summary(cfg, metrics, data=DATA, contract=contract)
    assert summary.startswith("**breastscan-density** (classification). Classifies the **density** of a "
                              "mammography image into 4 classes (A, B, C, D).")
    assert "Not for diagnosis or clinical decisions" in summary
    assert ("**Data:** dataset `mammography` (synthetic phantoms: the numbers show the pipeline works, not "
            "the model on real images), test split `0123456789ab` (79 images), data hash "
            "`285bbc4b1161f05404f51943c39e9e23.dir`.") in summary
    assert "**quadratic_kappa = 0.712** (95% CI 0.610-0.790, bootstrap)" in summary
    assert "| A | 0.900 | 0.800 | n/a | 0.950 | 20 |" in summary
    assert "| busbra | 40 | 0.650 | 0.600-0.800 |" in summary and "| busi | 40 | 0.700 |" in summary
    assert "T = 1.370" in summary and "test ECE 0.121 before, 0.043 as served" in summary
    assert "quadratic_kappa 0.712 vs floor 0.500 (ok); accuracy 0.410 vs floor 0.450 (FAIL)" in summary
    assert "## " not in summary and len(summary) <= SUMMARY_LIMIT

    many = {**metrics, "sites": {f"site{i:03d}": site for i in range(200)}}
    cut = version_summary(cfg, many, data=DATA, contract=contract)
    assert len(cut) <= SUMMARY_LIMIT and cut.endswith("(cut: see the full model card)")
    lesion = ModelConfig(name="lesion", task="segmentation", dataset="ultrasound", label="mask",
                         preprocess=PreprocessSpec(height=96, width=128), headline="mean_dice")
    brief = version_summary(lesion, {"mean_dice": 0.66}, data={"modality": "ultrasound"})
    assert "Segments lesions in an ultrasound image" in brief and "Calibration" not in brief
    assert "**mean_dice = 0.660** (95% CI not computed)" in brief and "no floors" in brief
