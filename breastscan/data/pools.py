"""Pools: several datasets (sites, hospitals) trained together, each split on its own.

A dataset entry with ``sites:`` (:class:`breastscan.config.DatasetConfig`) is a pool. Its
split artefact is the stack of every site's own leak-free split
(:func:`breastscan.data.splits.prepare_splits` per site, with the pool's settings): a
patient or near-duplicate group never leaves its site, no site's rows can link groups of
another, and each site's train/val/test proportions hold within the site. Rows carry a
``site`` column; their paths are relative to the pool's folder, so the pool loads like any
dataset (:func:`breastscan.data.loading.load_split`).

Sites may lack a class (BUS-BRA has no ``normal`` images): :func:`site_classes` says which
classes each site can label, so training can leave the absent ones out of a site's loss
rather than teach the model that a site never shows them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from breastscan.config import DatasetConfig, SplitConfig
from breastscan.data.manifest import content_hashes, normalize_manifest, read_manifest
from breastscan.data.splits import SPLITS, prepare_splits, split_counts

log = logging.getLogger(__name__)

SITE_COLUMN = "site"
"""The column naming each row's site in a pool's split artefact (and in its predictions)."""

_PREFIXED = ("group", "dup_group", "dup_cluster")
"""Group columns made site-unique (``<site>:<group>``): two sites' patient ids may collide."""


def _in_pool(df: pd.DataFrame, site: str, folder: Path, pool_root: Path) -> pd.DataFrame:
    """One site's split rows as pool rows: ``site`` column, paths relative to the pool, groups prefixed."""
    rel = Path(os.path.relpath(folder, pool_root))
    out = df.copy()
    for column in ("image", "mask"):
        if column in out.columns:
            out[column] = [p if not isinstance(p, str) or not p or Path(p).is_absolute() else str(rel / p)
                           for p in out[column]]
    for column in _PREFIXED:
        if column in out.columns:
            out[column] = [f"{site}:{g}" for g in out[column]]
    out.insert(0, SITE_COLUMN, site)
    return out


def prepare_pool(pool: DatasetConfig, cfg: SplitConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Split every site of a pool on its own and stack the splits.

    Args:
        pool: a dataset declaration with ``sites``.
        cfg: split settings, applied to each site (same seed and fractions).

    Returns:
        The pool's split rows (every site's :func:`prepare_splits` output with
        ``image_md5``/``mask_md5``, a ``site`` column, paths relative to ``pool.path`` and
        site-prefixed groups) and a report: ``summary`` (pooled counts per split and per
        ``site=`` value, and every site's own summary under ``sites``) and ``details`` per site.
    """
    frames, summaries, details = [], {}, {}
    for name in pool.sites:
        site = pool.site(name)
        manifest = normalize_manifest(read_manifest(site.path))
        df, report = prepare_splits(manifest, site.path, labels=site.labels, stratify=site.stratify,
                                    dedup=site.dedup, cfg=cfg)
        df["image_md5"], df["mask_md5"] = content_hashes(df, site.path)
        frames.append(_in_pool(df, name, Path(site.path), Path(pool.path)))
        summaries[name], details[name] = report["summary"], report["details"]
    stacked = pd.concat(frames, ignore_index=True)
    summary = {
        "n_images": int(len(stacked)),
        "n_sites": len(pool.sites),
        "excluded_images": int(sum(s["excluded_images"] for s in summaries.values())),
        "splits": split_counts(stacked, [SITE_COLUMN, *pool.stratify]),
        "sites": summaries,
    }
    log.info("pool %s: %s", pool.name, {n: {s: summaries[n]["splits"][s]["images"] for s in SPLITS}
                                       for n in pool.sites})
    return stacked, {"summary": summary, "details": details}


def site_classes(frame: pd.DataFrame, label: str, classes: Sequence[Any]) -> dict[str, tuple[bool, ...]]:
    """Which classes each site of a pool's rows can label.

    Args:
        frame: split rows with a ``site`` column and the label column.
        label: the label column (``pathology``).
        classes: the model's classes in class-index order (compared as text).

    Returns:
        ``{site: (k,) flags}``: ``True`` where the site has at least one row of that class
        (in ``frame``); empty when ``frame`` has no ``site`` column or every site has every class.
    """
    if SITE_COLUMN not in frame.columns or label not in frame.columns:
        return {}
    text = [str(c) for c in classes]
    out = {str(site): tuple(t in set(rows[label].astype(str)) for t in text)
           for site, rows in frame.groupby(SITE_COLUMN, sort=True)}
    return {} if all(all(flags) for flags in out.values()) else out


def allowed_classes(frame: pd.DataFrame, sets: dict[str, tuple[bool, ...]], k: int) -> np.ndarray:
    """``(n, k)`` bool: the classes each row's site can label (all ``True`` without ``sets``).

    Args:
        frame: ``n`` rows (a ``site`` column where ``sets`` is not empty).
        sets: :func:`site_classes` of the training rows.
        k: the model's number of classes.
    """
    allowed = np.ones((len(frame), k), dtype=bool)
    if sets and SITE_COLUMN in frame.columns:
        for i, site in enumerate(frame[SITE_COLUMN].astype(str)):
            if site in sets:
                allowed[i] = sets[site]
    return allowed
