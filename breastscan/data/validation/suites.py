"""Great Expectations 1.x suites, written as code, for a dataset in the manifest contract.

Two suites per dataset:

* the *manifest* suite runs on the manifest joined with the image-level facts of
  :mod:`breastscan.data.validation.images` (columns, domains, unique images, files present and
  decodable, size range, not all-black, masks present, same size, binary);
* the *class-count* suite runs on a small table of label counts (every class present
  must have at least ``min_class_count`` rows).
"""

from __future__ import annotations

from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe

from breastscan.config import DatasetConfig, ValidationRules
from breastscan.data.manifest import CONTRACT_COLUMNS
from breastscan.labels import DENSITY_LEVELS, MODALITIES, PATHOLOGIES


def _add(suite: gx.ExpectationSuite, expectation: Any, meaning: str) -> None:
    """Add an expectation with its meaning (the words a data steward reads in the report)."""
    expectation.description = meaning
    suite.add_expectation(expectation)


def columns_suite(name: str) -> gx.ExpectationSuite:
    """Suite that checks the manifest has every contract column (run first: the rest needs them)."""
    suite = gx.ExpectationSuite(name=f"{name}-columns")
    _add(
        suite,
        gxe.ExpectTableColumnsToMatchSet(column_set=list(CONTRACT_COLUMNS), exact_match=False),
        f"the manifest has the contract columns {', '.join(CONTRACT_COLUMNS)}",
    )
    return suite


def manifest_suite(dataset: DatasetConfig, rules: ValidationRules) -> gx.ExpectationSuite:
    """Suite for the manifest joined with image facts.

    Args:
        dataset: the dataset's declaration (modality, required labels, masks).
        rules: thresholds shared by every dataset.

    Returns:
        An unsaved :class:`great_expectations.ExpectationSuite`.
    """
    s = gx.ExpectationSuite(name=f"{dataset.name}-manifest")
    _add(s, gxe.ExpectTableRowCountToBeBetween(min_value=1), "the manifest has rows")
    _add(s, gxe.ExpectColumnValuesToNotBeNull(column="image"), "every row names an image file")
    _add(s, gxe.ExpectColumnValuesToBeUnique(column="image"), "no image is listed twice")
    _add(s, gxe.ExpectColumnValuesToNotBeNull(column="modality"), "every row has a modality")
    _add(
        s,
        gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=[dataset.modality]),
        f"modality is {dataset.modality!r} (known: {', '.join(MODALITIES)})",
    )
    _add(
        s,
        gxe.ExpectColumnValuesToBeInSet(column="density", value_set=[str(d) for d in DENSITY_LEVELS]),
        "density is 1-4 or empty",
    )
    _add(
        s,
        gxe.ExpectColumnValuesToBeInSet(column="pathology", value_set=list(PATHOLOGIES)),
        f"pathology is one of {', '.join(PATHOLOGIES)} or empty",
    )
    for label in dataset.labels:
        # Required labels: a NotNull expectation per column, recorded under its own meaning.
        _add(s, gxe.ExpectColumnValuesToNotBeNull(column=label), f"every row has a {label} label")
    facts = [
        ("image_exists", "the image file exists"),
        ("image_decodes", "the image decodes (PNG, JPEG, PGM, DICOM)"),
        ("mask_exists", "the mask file named by the row exists"),
        ("mask_decodes", "the mask decodes"),
        ("mask_same_size", "the mask has the image's size"),
        ("mask_binary", "the mask is binary (0/255 or 0/1)"),
        ("normal_mask_empty", "a normal image has an empty mask"),
    ]
    if dataset.masks_required:
        facts.append(("mask_present", "every benign or malignant image has a mask"))
    for column, meaning in facts:
        _add(s, gxe.ExpectColumnValuesToBeInSet(column=column, value_set=[True]), meaning)
    for column in ("image_height", "image_width"):
        _add(
            s,
            gxe.ExpectColumnValuesToBeBetween(
                column=column, min_value=rules.min_side, max_value=rules.max_side
            ),
            f"{column.split('_')[1]} is {rules.min_side}-{rules.max_side} pixels",
        )
    _add(
        s,
        gxe.ExpectColumnValuesToBeBetween(column="image_max", min_value=rules.min_max_intensity),
        "the image is not all black",
    )
    return s


def class_count_suite(dataset: DatasetConfig, rules: ValidationRules) -> gx.ExpectationSuite:
    """Suite for the label-count table (columns ``label``, ``value``, ``count``)."""
    s = gx.ExpectationSuite(name=f"{dataset.name}-class-counts")
    _add(
        s,
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=rules.min_class_count),
        f"every class has at least {rules.min_class_count} images",
    )
    return s
