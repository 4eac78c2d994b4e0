"""Leak-free splits: near-duplicate grouping, label-conflict detection, grouped stratified splits.

Real breast-imaging datasets repeat the same lesion under different file names (BUSI has
145 near-duplicate groups) and sometimes file one scan under two labels. A random
image-level split then puts the same scan in training and test. Here:

1. every image gets a 64-bit perceptual (DCT) hash and a 64x64 thumbnail;
2. pairs with a close hash *and* correlated thumbnails are near-duplicates;
3. near-duplicates and the manifest's ``group`` (patient) are merged into one
   ``dup_group`` (connected components);
4. copies of one scan (``dup_cluster``: near-duplicate links only) that disagree on a
   label are *conflicts*, reported and optionally excluded; two images of one patient
   may rightly differ (a normal left breast, a malignant right one);
5. train / val / test are assigned per ``dup_group`` with scikit-learn's
   ``StratifiedGroupKFold``, stratified on the combined labels, seeded;
6. for benchmarks, :func:`cv_folds` makes grouped, stratified k-fold cross-validation
   folds the same way, each with a validation part carved from its training groups.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from breastscan.config import DedupConfig, SplitConfig
from breastscan.data.manifest import resolve
from breastscan.imaging.preprocessing import decode_image

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
EXCLUDED = "excluded"
THUMB = 64


@dataclass(frozen=True)
class Fingerprints:
    """Perceptual fingerprints of a list of images.

    Attributes:
        hashes: ``(n,)`` uint64 DCT perceptual hashes (imagehash.phash, 8x8 bits).
        thumbs: ``(n, 64*64)`` float32 thumbnails, zero-mean and unit-norm, so that a dot
            product is the Pearson correlation.
    """

    hashes: np.ndarray
    thumbs: np.ndarray


def fingerprint(images: Sequence[np.ndarray]) -> Fingerprints:
    """Compute perceptual hashes and normalised thumbnails.

    Args:
        images: ``(H, W)`` float32 gray images in [0, 1], any sizes.

    Returns:
        Their :class:`Fingerprints`.
    """
    import imagehash
    from PIL import Image

    hashes = np.zeros(len(images), dtype=np.uint64)
    thumbs = np.zeros((len(images), THUMB * THUMB), dtype=np.float32)
    for i, img in enumerate(images):
        u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
        bits = imagehash.phash(Image.fromarray(u8), hash_size=8).hash.flatten()
        hashes[i] = np.uint64(int("".join("1" if b else "0" for b in bits), 2))
        t = cv2.resize(img, (THUMB, THUMB), interpolation=cv2.INTER_AREA).ravel()
        t = t - t.mean()
        norm = float(np.linalg.norm(t))
        thumbs[i] = t / norm if norm > 0 else t
    return Fingerprints(hashes, thumbs)


def near_duplicate_pairs(fp: Fingerprints, cfg: DedupConfig, block: int = 1024) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, whose hashes are within ``cfg.max_hamming`` bits and whose
    thumbnails correlate at least ``cfg.min_correlation``.

    Runs in blocks of rows so memory stays ``O(block * n)``.
    """
    n = len(fp.hashes)
    pairs: list[tuple[int, int]] = []
    for start in range(0, n, block):
        rows = fp.hashes[start : start + block]
        dist = np.bitwise_count(rows[:, None] ^ fp.hashes[None, :])
        ii, jj = np.nonzero(dist <= cfg.max_hamming)
        ii = ii + start
        keep = jj > ii
        ii, jj = ii[keep], jj[keep]
        if len(ii):
            corr = np.einsum("ij,ij->i", fp.thumbs[ii], fp.thumbs[jj])
            ok = corr >= cfg.min_correlation
            pairs += list(zip(ii[ok].tolist(), jj[ok].tolist(), strict=True))
    return pairs


def merge_groups(groups: Sequence[str], pairs: Sequence[tuple[int, int]]) -> list[str]:
    """Connected components over "same group" and "near-duplicate" links.

    Args:
        groups: the manifest's group of every row.
        pairs: near-duplicate row pairs.

    Returns:
        One merged group name per row: the smallest original group name in its component.
    """
    parent = list(range(len(groups)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, g in enumerate(groups):
        union(i, first.setdefault(g, i))
    for a, b in pairs:
        union(a, b)
    names: dict[int, str] = {}
    for i, g in enumerate(groups):
        r = find(i)
        names[r] = min(names.get(r, g), g)
    return [names[find(i)] for i in range(len(groups))]


def label_conflicts(
    df: pd.DataFrame, group_col: str, labels: Sequence[str]
) -> dict[str, dict[str, list[str]]]:
    """Groups whose members carry different values of any label column.

    Returns:
        ``{group: {label: sorted distinct values}}`` for every conflicting group.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for label in labels:
        labelled = df.dropna(subset=[label])
        values = labelled.groupby(group_col)[label].agg(lambda s: sorted({str(v) for v in s}))
        for group, vals in values.items():
            if len(vals) > 1:
                out.setdefault(str(group), {})[label] = vals
    return out


def _strata(df: pd.DataFrame, stratify: Sequence[str]) -> np.ndarray:
    key = df[list(stratify)].astype("string").fillna("?").agg("|".join, axis=1)
    return key.to_numpy()


def _one_fold(y: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of one held-out fold holding about ``fraction`` of the groups."""
    n_groups = len(set(groups.tolist()))
    n_splits = int(min(max(2, round(1.0 / fraction)), n_groups))
    if n_splits < 2:
        raise ValueError("need at least two groups to split")
    # Rare strata trigger a warning from scikit-learn; they are still assigned.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from sklearn.model_selection import StratifiedGroupKFold  # 1.4 s to import: only where splitting

        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(splitter.split(np.zeros(len(y)), y, groups))
    mask = np.zeros(len(y), dtype=bool)
    mask[held] = True
    return mask


def assign_splits(y: np.ndarray, groups: np.ndarray, cfg: SplitConfig) -> np.ndarray:
    """Assign each row to train, val or test, whole groups at a time.

    Args:
        y: ``(n,)`` stratum of each row (combined labels).
        groups: ``(n,)`` group of each row; a group never spans two splits.
        cfg: fractions and seed.

    Returns:
        ``(n,)`` array of ``"train"``, ``"val"``, ``"test"``.
    """
    split = np.full(len(y), "train", dtype=object)
    test = _one_fold(y, groups, cfg.test_fraction, cfg.seed)
    split[test] = "test"
    rest = np.nonzero(~test)[0]
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    val = _one_fold(y[rest], groups[rest], val_share, cfg.seed + 1)
    split[rest[val]] = "val"
    return split


def _exclude_and_split(
    df: pd.DataFrame, conflicts: Mapping[str, Any], stratify: Sequence[str], cfg: SplitConfig
) -> np.ndarray:
    """In place: fill ``exclusion`` (label conflicts, when excluded) and ``split``.

    Returns:
        ``(n,)`` bool, True for the rows kept (assigned to train/val/test).
    """
    df["exclusion"] = pd.Series([None] * len(df), dtype="string")
    if cfg.exclude_label_conflicts and conflicts:
        df.loc[df["dup_cluster"].isin(list(conflicts)), "exclusion"] = "label_conflict"
    keep = df["exclusion"].isna().to_numpy()
    split = np.full(len(df), EXCLUDED, dtype=object)
    split[keep] = assign_splits(
        _strata(df[keep], stratify), df.loc[keep, "dup_group"].to_numpy(), cfg
    )
    df["split"] = split
    return keep


def split_counts(df: pd.DataFrame, stratify: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per split: images, ``dup_group`` groups and images per ``column=value`` of ``stratify``."""
    return {
        s: {
            "images": int((df["split"] == s).sum()),
            "groups": int(df.loc[df["split"] == s, "dup_group"].nunique()),
            **{
                f"{col}={v}": int(n)
                for col in stratify
                for v, n in df.loc[df["split"] == s, col].dropna().value_counts().sort_index().items()
            },
        }
        for s in SPLITS
    }


def _prepare_summary(
    df: pd.DataFrame,
    pairs: Sequence[tuple[int, int]],
    conflicts: Mapping[str, Any],
    keep: np.ndarray,
    stratify: Sequence[str],
) -> dict[str, Any]:
    """The ``summary`` part of :func:`prepare_splits`' report: counts of images, groups,
    near-duplicates, conflicts, exclusions, and per split."""
    sizes = df.groupby("dup_group").size()
    return {
        "n_images": len(df),
        "n_groups": int(df["group"].nunique()),
        "n_dup_groups": int(df["dup_group"].nunique()),
        "near_duplicate_pairs": len(pairs),
        "merged_groups": int((sizes > 1).sum()),
        "images_in_merged_groups": int(sizes[sizes > 1].sum()),
        "label_conflict_groups": len(conflicts),
        "excluded_images": int((~keep).sum()),
        "splits": split_counts(df, stratify),
    }


def _prepare_details(
    df: pd.DataFrame, pairs: Sequence[tuple[int, int]], conflicts: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``details`` part of :func:`prepare_splits`' report: the near-duplicate image pairs
    and, per conflicting cluster, its labels and images."""
    return {
        "near_duplicate_pairs": [
            [str(df.at[i, "image"]), str(df.at[j, "image"])] for i, j in pairs
        ],
        "label_conflicts": {
            g: {"labels": v, "images": df.loc[df["dup_cluster"] == g, "image"].astype(str).tolist()}
            for g, v in sorted(conflicts.items())
        },
    }


def prepare_splits(
    manifest: pd.DataFrame,
    root: str | Path,
    *,
    labels: Sequence[str],
    stratify: Sequence[str],
    dedup: DedupConfig,
    cfg: SplitConfig,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Group near-duplicates, find label conflicts and assign leak-free splits.

    Args:
        manifest: a validated, normalised manifest (see ``normalize_manifest``).
        root: the dataset directory.
        labels: label columns checked for conflicts.
        stratify: label columns whose combination is balanced across splits.
        dedup: near-duplicate thresholds.
        cfg: split settings.

    Returns:
        The manifest with ``dup_group`` (manifest groups merged through near-duplicate
        links: the unit of splitting), ``dup_cluster`` (near-duplicate copies of one scan:
        the unit of label-conflict checks), ``split`` (train/val/test/excluded) and
        ``exclusion`` columns, and a JSON-able report of what was found.
    """
    root = Path(root)
    images = [decode_image(resolve(root, p), min_side=1, max_side=10**6) for p in manifest["image"]]
    fp = fingerprint(images)
    pairs = near_duplicate_pairs(fp, dedup)
    df = manifest.copy().reset_index(drop=True)
    df["dup_group"] = merge_groups([str(g) for g in df["group"]], pairs)
    # Conflicts are sought among copies of one scan only: two images of one patient may
    # rightly carry different labels (a normal left breast, a malignant right one).
    df["dup_cluster"] = merge_groups([str(p) for p in df["image"]], pairs)
    conflicts = label_conflicts(df, "dup_cluster", labels)
    keep = _exclude_and_split(df, conflicts, stratify, cfg)

    report = _prepare_summary(df, pairs, conflicts, keep, stratify)
    details = _prepare_details(df, pairs, conflicts)
    log.info(
        "%d images, %d near-duplicate pairs, %d merged groups, %d label-conflict groups (%s), "
        "split %s",
        len(df), len(pairs), report["merged_groups"], len(conflicts),
        "excluded" if cfg.exclude_label_conflicts else "kept",
        {s: report["splits"][s]["images"] for s in SPLITS},
    )
    return df, {"summary": report, "details": details}


def split_id(splits_csv: str | Path, split: str = "test") -> str:
    """A short id of one split's content: same images with the same bytes, same id.

    Two model versions evaluated on splits with one id were evaluated on the same images,
    so their metrics can be compared directly (promotion gates rely on it).

    Args:
        splits_csv: a split artefact written by the prepare stage.
        split: ``train``, ``val`` or ``test``.

    Returns:
        12 hex digits.
    """
    import hashlib

    df = pd.read_csv(splits_csv, dtype=str, keep_default_na=False)
    rows = df[df["split"] == split]
    key_cols = [c for c in ("image", "image_md5", "mask_md5") if c in rows.columns]
    lines = sorted("\t".join(r) for r in rows[key_cols].itertuples(index=False, name=None))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def _cv_groups(frame: pd.DataFrame, columns: Sequence[str]) -> np.ndarray:
    """One splitting unit per row: rows sharing a value in any of ``columns`` are merged.

    A row with no value in any column is its own singleton group. Units are named after
    their smallest ``column=value`` (so the assignment does not depend on the row order),
    singletons after their position.
    """
    names: list[str] = []
    pairs: list[tuple[int, int]] = []
    values = [frame[c].to_numpy(dtype=object) for c in columns]
    first: dict[tuple[int, str], int] = {}
    for i in range(len(frame)):
        name = None
        for c, col in enumerate(columns):
            v = values[c][i]
            if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)):
                continue
            key = (c, str(v))
            pairs.append((first.setdefault(key, i), i))
            if name is None:
                name = f"{col}={v}"
        names.append(name if name is not None else f"~row{i:09d}")
    return np.asarray(merge_groups(names, [(a, b) for a, b in pairs if a != b]), dtype=object)


def _fold_index(y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """``(n,)`` index ``0..n_folds-1`` of the test fold of each row (whole groups)."""
    import warnings

    fold = np.full(len(y), -1, dtype=np.int64)
    # Rare strata trigger a warning from scikit-learn; they are still assigned.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from sklearn.model_selection import StratifiedGroupKFold

        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, held) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
            fold[held] = k
    return fold


def _check_fold_settings(n_folds: int, val_fraction: float) -> None:
    """Refuse ``n_folds < 2`` and ``val_fraction`` outside ``[0, 1 - 1/n_folds)``."""
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    if not 0 <= val_fraction < 1 - 1 / n_folds:
        raise ValueError(
            f"val_fraction must be in [0, {1 - 1 / n_folds:g}) for n_folds={n_folds}, got {val_fraction}"
        )


def _cv_conflicts(
    df: pd.DataFrame,
    groups: np.ndarray,
    check: Sequence[str],
    conflict_column: str | None,
    exclude: bool,
) -> tuple[dict[str, dict[str, list[str]]], np.ndarray]:
    """Label conflicts within the conflict units (``conflict_column``, else ``groups``).

    Returns:
        The conflicts (as :func:`label_conflicts` gives them) and ``(n,)`` bool, True for
        the rows kept: all of them unless ``exclude``, else those outside a conflicting unit
        (rows with no unit are kept).
    """
    unit = "__cv_unit__"
    units = pd.DataFrame({unit: df[conflict_column].to_numpy() if conflict_column else groups})
    units[check] = df[check].to_numpy()
    conflicts = label_conflicts(units, unit, check)
    keep = np.ones(len(df), dtype=bool)
    if exclude and conflicts:
        keep = ~units[unit].astype(str).isin(list(conflicts)).to_numpy() | units[unit].isna().to_numpy()
    return conflicts, keep


def _cv_test_folds(
    y: np.ndarray, groups: np.ndarray, n_folds: int, seed: int, excluded: bool
) -> tuple[np.ndarray, int]:
    """The test fold ``0..n_folds-1`` of each kept row (``(n_kept,)`` int64), and the number
    of groups; ``excluded`` says whether rows were dropped (for the error message only).

    Raises:
        ValueError: fewer groups than folds, or strata too small to split.
    """
    n_groups = len(set(groups.tolist()))
    if n_groups < n_folds:
        raise ValueError(
            f"{n_groups} group(s) to split (of {len(y)} row(s)"
            f"{', label conflicts excluded' if excluded else ''}) but n_folds={n_folds}: "
            "need at least as many groups as folds"
        )
    try:
        test_fold = _fold_index(y, groups, n_folds, seed)
    except ValueError as e:  # e.g. every stratum smaller than n_folds
        raise ValueError(
            f"cannot make {n_folds} folds of {len(y)} row(s) in {n_groups} group(s): {e}"
        ) from e
    return test_fold, n_groups


def _fold_parts(
    y: np.ndarray,
    groups: np.ndarray,
    test_fold: np.ndarray,
    k: int,
    n_folds: int,
    val_share: float,
    seed: int,
) -> np.ndarray:
    """``(n_kept,)`` object array: ``test``, ``val`` or ``train`` of each kept row in fold
    ``k``; the validation part (``val_share`` of the training groups, seed ``seed + 1 + k``)
    is carved from the training groups.

    Raises:
        ValueError: the fold has no test rows, or too few training groups to carve from.
    """
    part = np.where(test_fold == k, "test", "train").astype(object)
    if not (part == "test").any():
        raise ValueError(
            f"fold {k} of {n_folds} got no test rows: {len(set(groups.tolist()))} groups are too few"
        )
    if val_share > 0:
        train = np.nonzero(part == "train")[0]
        try:
            val = _one_fold(y[train], groups[train], val_share, seed + 1 + k)
        except ValueError as e:
            raise ValueError(
                f"fold {k} of {n_folds} leaves {len(train)} training row(s) in "
                f"{len(set(groups[train].tolist()))} group(s): too few to carve a validation part "
                f"(use more groups or val_fraction=0): {e}"
            ) from e
        part[train[val]] = "val"
    return part


def _fold_frame(
    df: pd.DataFrame, k: int, kept: np.ndarray, part: np.ndarray, exclusion: Any
) -> pd.DataFrame:
    """A copy of ``df`` with ``fold = k``, ``split`` (``part`` on the ``kept`` row positions,
    ``excluded`` elsewhere) and ``exclusion``."""
    split = np.full(len(df), EXCLUDED, dtype=object)
    split[kept] = part
    out = df.copy()
    out["fold"] = k
    out["split"] = split
    out["exclusion"] = exclusion
    return out


def _fold_summary(k: int, part: np.ndarray, groups: np.ndarray) -> dict[str, Any]:
    """Rows and groups per part (train/val/test) of fold ``k``."""
    return {
        "fold": k,
        **{
            s: {"rows": int((part == s).sum()), "groups": len(set(groups[part == s].tolist()))}
            for s in SPLITS
        },
    }


def _log_cv(report: Mapping[str, Any], check: Sequence[str], excluded: bool, n_kept: int) -> None:
    """Log the conflicts found (a warning) and the folds made."""
    if report["label_conflict_groups"]:
        log.warning(
            "cv_folds: %d label-conflict group(s) over %s, %s (%d row(s))",
            report["label_conflict_groups"], ", ".join(check),
            "excluded" if excluded else "kept", report["excluded_rows"],
        )
    log.info(
        "cv_folds: %d rows in %d groups, %d folds (seed %d), test rows per fold %s",
        n_kept, report["n_groups"], report["n_folds"], report["seed"],
        [f["test"]["rows"] for f in report["folds"]],
    )


def cv_folds(
    frame: pd.DataFrame,
    *,
    stratify: Sequence[str],
    n_folds: int = 5,
    group_column: str | Sequence[str] = "group",
    seed: int = 0,
    val_fraction: float = 0.15,
    exclude_label_conflicts: bool = False,
    labels: Sequence[str] | None = None,
    conflict_column: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Grouped, stratified k-fold cross-validation, with a validation subset per fold.

    Groups are assigned to ``n_folds`` test folds with scikit-learn's
    ``StratifiedGroupKFold`` (stratified on the combined ``stratify`` labels, seeded); for
    fold ``k`` the groups of the other folds are training data, of which about
    ``val_fraction`` of the whole set (whole groups again, stratified, seed ``seed + 1 + k``)
    is carved out for validation. A group never spans two test folds, nor two parts of one
    fold.

    Args:
        frame: one row per image; any columns (e.g. a manifest or ``prepare_splits``'
            output).
        stratify: label columns whose combination is balanced across folds (missing values
            are a stratum of their own).
        n_folds: number of folds, at least 2.
        group_column: column(s) whose rows stay together, e.g. ``"dup_group"`` (BUSI) or
            ``"patient_id"`` (mini-MIAS). With several columns, rows sharing a value in any
            of them are merged (connected components, as near-duplicates are). A row with no
            value is a group of its own.
        seed: seed of the assignment; same frame and seed, same folds.
        val_fraction: share of the whole set used for validation in each fold, in
            ``[0, 1 - 1/n_folds)``; 0 gives no validation part.
        exclude_label_conflicts: drop rows of a conflict unit whose members disagree on a
            label (``split == "excluded"`` in every fold). Conflicts are reported either way.
        labels: label columns checked for conflicts; defaults to ``stratify``.
        conflict_column: the unit within which labels must agree; defaults to the merged
            groups. Pass ``"dup_cluster"`` for ``prepare_splits``' output, where two images of
            one patient may rightly differ (left and right breast).

    Returns:
        A long frame, ``n_folds`` copies of ``frame`` one after another (index: the input's,
        repeated once per fold) with the columns ``fold`` (``0..n_folds-1``) and ``split``
        (``train``, ``val``, ``test`` or ``excluded``) added (replaced when present), and
        ``exclusion`` (``"label_conflict"`` or missing). ``cv[cv["fold"] == k]`` has the
        shape of a prepare stage ``splits.csv``, ready to train model ``k``; the rows with
        ``split == "test"`` over all folds are the input's kept rows, each once. Also a
        JSON-able report: counts of rows, groups, conflicts, excluded rows and, per fold,
        rows and groups per part.

    Raises:
        ValueError: ``n_folds < 2``, ``val_fraction`` out of range, a missing column, fewer
            groups than folds, or strata / a fold's training part too small to split (each
            message names the numbers).
    """
    _check_fold_settings(n_folds, val_fraction)
    group_cols = [group_column] if isinstance(group_column, str) else list(group_column)
    check = list(labels) if labels is not None else list(stratify)
    needed = [*group_cols, *stratify, *check, *([conflict_column] if conflict_column else [])]
    missing = sorted({c for c in needed if c not in frame.columns})
    if missing:
        raise ValueError(f"cv_folds: column(s) {', '.join(missing)} not in the frame")

    df = frame.drop(columns=["fold", "split", "exclusion"], errors="ignore")
    groups = _cv_groups(df, group_cols)
    conflicts, keep = _cv_conflicts(df, groups, check, conflict_column, exclude_label_conflicts)
    kept = np.nonzero(keep)[0]
    y = _strata(df.iloc[kept], stratify)
    g = groups[kept]
    test_fold, n_groups = _cv_test_folds(y, g, n_folds, seed, bool((~keep).any()))
    val_share = val_fraction / (1.0 - 1.0 / n_folds)

    exclusion = pd.array([None if ok else "label_conflict" for ok in keep], dtype="string")
    parts: list[pd.DataFrame] = []
    fold_report: list[dict[str, Any]] = []
    for k in range(n_folds):
        part = _fold_parts(y, g, test_fold, k, n_folds, val_share, seed)
        parts.append(_fold_frame(df, k, kept, part, exclusion))
        fold_report.append(_fold_summary(k, part, g))
    cv = pd.concat(parts)
    report: dict[str, Any] = {
        "n_rows": len(df),
        "n_groups": n_groups,
        "n_folds": n_folds,
        "seed": seed,
        "label_conflict_groups": len(conflicts),
        "excluded_rows": int((~keep).sum()),
        "label_conflicts": {k: v for k, v in sorted(conflicts.items())},
        "folds": fold_report,
    }
    _log_cv(report, check, exclude_label_conflicts, len(kept))
    return cv, report
