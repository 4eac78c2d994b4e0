"""breastscan.decision: the rule's semantics (two and three classes), the cutoff fit, and the rule's
journey through a contract (JSON round trip, contracts written before rules existed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from breastscan.bundle import ModelContract, read_contract, write_contract
from breastscan.decision import ARGMAX_RULE, DecisionRule, fit_cutoff

TUMOR = ("benign", "malignant", "normal")
MALIGNANT = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.3)


def test_argmax_is_the_default_and_calls_the_most_probable_class() -> None:
    probs = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3], [0.1, 0.2, 0.7]])
    assert DecisionRule() == ARGMAX_RULE and ARGMAX_RULE.is_argmax and ARGMAX_RULE.ready
    assert ARGMAX_RULE.decide(probs, TUMOR).tolist() == [1, 0, 2]
    assert ARGMAX_RULE.decide(probs, TUMOR).dtype == np.int64
    assert ARGMAX_RULE.to_dict() == {"rule": "argmax"}
    assert DecisionRule.from_dict(None) == DecisionRule.from_dict({}) == ARGMAX_RULE
    assert "most probable" in ARGMAX_RULE.describe()


def test_with_two_classes_the_ratio_is_the_positive_probability() -> None:
    rule = DecisionRule("positive_ratio", positive="malignant", versus="benign", cutoff=0.3)
    probs = np.array([[0.75, 0.25], [0.7, 0.3], [0.69, 0.31], [0.2, 0.8]])
    np.testing.assert_allclose(rule.ratio(probs, ("benign", "malignant")), probs[:, 1])
    # p(malignant) >= 0.3 is malignant (the cutoff itself included), although benign is more probable
    assert rule.decide(probs, ("benign", "malignant")).tolist() == [0, 1, 1, 1]
    assert ARGMAX_RULE.decide(probs, ("benign", "malignant")).tolist() == [0, 0, 0, 1]


def test_with_three_classes_the_ratio_leaves_the_third_class_out() -> None:
    probs = np.array([
        [0.50, 0.25, 0.25],   # r = 1/3 >= 0.3: malignant, though benign is the arg-max
        [0.56, 0.24, 0.20],   # r = 0.3 exactly: malignant
        [0.70, 0.20, 0.10],   # r = 0.22 < 0.3: benign
        [0.40, 0.10, 0.50],   # r = 0.2 < 0.3, the pair (0.5) holds normal (0.5) off: benign
        [0.10, 0.02, 0.88],   # normal outweighs benign and malignant together: normal
        [0.02, 0.02, 0.96],   # r = 0.5, but no lesion found (0.04 against 0.96): normal
        [0.00, 0.00, 1.00],   # no lesion probability at all: normal
    ])
    np.testing.assert_allclose(MALIGNANT.ratio(probs, TUMOR), [1 / 3, 0.3, 2 / 9, 0.2, 1 / 6, 0.5, 0.0])
    assert MALIGNANT.in_pair(probs, TUMOR).tolist() == [True] * 4 + [False] * 3
    assert MALIGNANT.decide(probs, TUMOR).tolist() == [1, 1, 0, 0, 2, 2, 2]
    # the classes are found by name, in any column order
    order = [2, 0, 1]
    assert MALIGNANT.decide(probs[:, order], [TUMOR[i] for i in order]).tolist() == [2, 2, 1, 1, 0, 0, 0]


def test_fit_cutoff_reaches_the_target_exactly_with_the_most_specific_cutoff() -> None:
    positives = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    negatives = np.array([0.85, 0.65, 0.45, 0.05])
    ratio = np.concatenate([positives, negatives])
    is_positive = np.arange(len(ratio)) < len(positives)
    cutoff = fit_cutoff(ratio, is_positive, 0.8)
    assert cutoff == 0.3  # the 8th largest of 10 positives
    assert np.mean(positives >= cutoff) == 0.8  # exactly the target ...
    assert np.mean(positives >= np.nextafter(cutoff, 1.0)) < 0.8  # ... and any larger cutoff misses it
    assert fit_cutoff(ratio, is_positive, 0.75) == 0.3  # 7.5 positives round up to 8
    assert fit_cutoff(ratio, is_positive, 1.0) == 0.1
    assert fit_cutoff(ratio, is_positive, 0.05) == 0.95
    tied = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    assert fit_cutoff(tied, np.ones(5, bool), 0.5) == 0.5  # ties: sensitivity 0.8 >= 0.5
    with pytest.raises(ValueError, match="no positive"):
        fit_cutoff(ratio, np.zeros(len(ratio), bool), 0.9)
    with pytest.raises(ValueError, match="target"):
        fit_cutoff(ratio, is_positive, 0.0)


def test_fit_records_the_validation_facts_and_decides_at_the_fitted_cutoff() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=60)
    y = rng.integers(0, 3, size=60)
    declared = DecisionRule("positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9)
    assert not declared.ready
    with pytest.raises(ValueError, match="no cutoff"):
        declared.decide(probs, TUMOR)
    fitted = declared.fit(probs, y, TUMOR)
    malignant, pair = y == 1, declared.in_pair(probs, TUMOR)
    # a malignant row called normal (no lesion found) is a miss the cutoff cannot undo
    reachable = pair[malignant].mean()
    scores = np.where(pair, declared.ratio(probs, TUMOR), -np.inf)
    assert fitted.cutoff == max(0.0, fit_cutoff(scores, malignant, 0.9))
    called = fitted.decide(probs, TUMOR) == 1
    assert fitted.val_sensitivity == pytest.approx(called[malignant].mean())
    assert fitted.val_sensitivity >= min(0.9, reachable) and reachable < 1.0
    lesions = declared.fit(probs[pair], y[pair], TUMOR)  # every row inside the pair: the target is met
    assert lesions.val_sensitivity >= 0.9
    assert fitted.val_specificity == pytest.approx((~called[~malignant]).mean())
    assert (fitted.val_positives, fitted.val_negatives) == (malignant.sum(), (~malignant).sum())
    assert fitted.fitted_on == "validation split" and fitted.ready
    text = fitted.describe()
    assert f"{fitted.cutoff:.3f}" in text and "0.90" in text and f"{fitted.val_specificity:.2f}" in text
    assert ARGMAX_RULE.fit(probs, y, TUMOR) is ARGMAX_RULE
    fixed = MALIGNANT.fit(probs, y, TUMOR)  # a declared cutoff is kept; only the facts are added
    assert fixed.cutoff == 0.3 and fixed.fitted_on == "" and fixed.val_sensitivity is not None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"rule": "threshold"}, "one of"),
    ({"cutoff": 0.5}, "argmax rule takes"),
    ({"rule": "positive_ratio", "positive": "malignant", "versus": "malignant", "cutoff": 0.5},
     "two different"),
    ({"rule": "positive_ratio", "positive": "malignant", "versus": "benign"}, "target_sensitivity"),
    ({"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "target_sensitivity": 1.0},
     r"\(0, 1\)"),
    ({"rule": "positive_ratio", "positive": "malignant", "versus": "benign", "cutoff": 1.5}, r"\[0, 1\]"),
])
def test_invalid_rules_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DecisionRule(**kwargs)


def test_a_rule_names_classes_the_model_has() -> None:
    with pytest.raises(ValueError, match="'cancer' is not one of"):
        DecisionRule("positive_ratio", positive="cancer", versus="benign", cutoff=0.5).decide(
            np.full((1, 3), 1 / 3), TUMOR)
    with pytest.raises(ValueError, match="unknown decision rule keys: threshold"):
        DecisionRule.from_dict({"rule": "argmax", "threshold": 0.5})


def _contract(**kwargs: object) -> ModelContract:
    return ModelContract(name="tumor", task="classification", label="pathology", classes=TUMOR,
                         class_names=TUMOR, input_shape=(8, 8, 1), dataset="mammography",
                         modality="mammography", **kwargs)  # type: ignore[arg-type]


def test_a_fitted_rule_survives_the_contract_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    declared = DecisionRule("positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9)
    fitted = declared.fit(rng.dirichlet([1.0, 1.0, 1.0], size=30), np.arange(30) % 3, TUMOR)
    contract = _contract(temperature=1.7, decision=fitted.to_dict())
    again = ModelContract.from_dict(json.loads(json.dumps(contract.to_dict())))
    assert again == contract and again.rule == fitted
    write_contract(contract, tmp_path)
    assert read_contract(tmp_path).rule == fitted


def test_an_older_contract_without_a_rule_is_read_as_argmax(tmp_path: Path) -> None:
    old = _contract().to_dict()
    del old["decision"]
    (tmp_path / "contract.json").write_text(json.dumps(old))
    contract = read_contract(tmp_path)
    assert contract.rule == ARGMAX_RULE and contract.decision == {"rule": "argmax"}


def test_a_contract_refuses_a_rule_it_cannot_follow() -> None:
    with pytest.raises(ValueError, match="'cancer' is not one of"):
        _contract(decision={"rule": "positive_ratio", "positive": "cancer", "versus": "benign",
                            "cutoff": 0.5})
    with pytest.raises(ValueError, match="classifiers only"):
        ModelContract(name="lesion", task="segmentation", label="mask", classes=(), class_names=("lesion",),
                      input_shape=(8, 8, 1), dataset="ultrasound", modality="ultrasound",
                      decision=MALIGNANT.to_dict())


def test_the_served_bundle_carries_the_rule_evaluate_fitted() -> None:
    from breastscan.bundle import ModelBundle
    from breastscan.imaging.preprocessing import PreprocessSpec
    from breastscan.registry.runs import calibrated

    declared = DecisionRule("positive_ratio", positive="malignant", versus="benign", target_sensitivity=0.9)
    bundle = ModelBundle(model=None, spec=PreprocessSpec(height=8, width=8),  # type: ignore[arg-type]
                         contract=_contract(decision=declared.to_dict()))
    fitted = declared.fit(np.array([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]), np.array([0, 1]), TUMOR)
    served = calibrated(bundle, {"temperature": 1.5, "decision": fitted.to_dict()})
    assert served.contract.temperature == 1.5 and served.contract.rule == fitted
    plain = calibrated(bundle.with_decision(ARGMAX_RULE), {"temperature": 1.0})  # argmax reports have no key
    assert plain.contract.rule == ARGMAX_RULE
