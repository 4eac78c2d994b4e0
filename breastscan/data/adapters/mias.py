"""mini-MIAS adapter: the original ``Info.txt`` + ``mdbNNN.pgm`` files → the manifest contract.

Source layout (Suckling et al. 1994, ``all-mias.tar.gz``)::

    all-mias/
        Info.txt        one line per abnormality: REFNUM TISSUE CLASS [SEVERITY X Y RADIUS]
        mdb001.pgm ...  1024x1024 8-bit binary PGM, MLO views

``Info.txt`` examples::

    mdb001 G CIRC B 535 425 197     benign circumscribed mass, centre (535, 425), radius 197
    mdb003 D NORM                   normal film
    mdb059 F CIRC B *NOTE 3*        abnormality without coordinates

TISSUE is the background tissue F (fatty) / G (fatty-glandular) / D (dense-glandular),
mapped to density 1 / 2 / 3 (:data:`breastscan.labels.MIAS_DENSITY`). Several lines for one
film are several lesions. Coordinates have their ORIGIN AT THE BOTTOM-LEFT of the film
(row = H - y). Lines not starting with ``mdb`` (headers, comments) are skipped.

Output (``out_dir``)::

    images/mdbNNN.png            8-bit gray, original size
    masks/mdbNNN_mask.png        union of the lesion circles, 0/255 (all zero for normal
                                 films and for abnormal films without coordinates)
    manifest.csv                 modality mammography; density 1-3; pathology malignant if
                                 any lesion is M, else benign if any is B, else normal;
                                 group pNNN (films come in L/R pairs mdb001+mdb002 = p001);
                                 refnum, laterality (odd R, even L), tissue, abnormality
                                 (|-joined), n_lesions, has_roi
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from breastscan.data.adapters.generic import finish_manifest, rasterise_circles, read_gray_u8
from breastscan.imaging.files import write_mask, write_png
from breastscan.labels import MIAS_DENSITY

logger = logging.getLogger(__name__)

_REFNUM = re.compile(r"^mdb(\d{3,})$", re.IGNORECASE)
_SEVERITY = {"B": "benign", "M": "malignant"}


@dataclass
class _Film:
    refnum: str
    tissue: str
    classes: list[str] = field(default_factory=list)
    severities: list[str] = field(default_factory=list)
    circles: list[tuple[float, float, float]] = field(default_factory=list)  # (x, y, r), MIAS


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_info(path: str | Path) -> dict[str, _Film]:
    """Parse a MIAS ``Info.txt`` into one record per film.

    Args:
        path: the ``Info.txt`` file.

    Returns:
        ``refnum`` (e.g. ``"mdb001"``) → film record, in file order.

    Raises:
        ValueError: a film line with an unknown tissue code or too few fields.
    """
    films: dict[str, _Film] = {}
    for lineno, raw in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        tokens = raw.split()
        if not tokens or not _REFNUM.match(tokens[0]):
            continue
        if len(tokens) < 3:
            raise ValueError(f"{path}:{lineno}: expected REFNUM TISSUE CLASS, got {raw.strip()!r}")
        refnum, tissue, cls = tokens[0].lower(), tokens[1].upper(), tokens[2].upper()
        if tissue not in MIAS_DENSITY:
            raise ValueError(
                f"{path}:{lineno}: unknown tissue code {tissue!r} (expected one of "
                f"{', '.join(MIAS_DENSITY)})"
            )
        film = films.setdefault(refnum, _Film(refnum, tissue))
        if film.tissue != tissue:
            logger.warning("%s: %s has tissue %s and %s; keeping %s",
                           Path(path).name, refnum, film.tissue, tissue, film.tissue)
        if cls == "NORM":
            continue
        film.classes.append(cls)
        severity = tokens[3].upper() if len(tokens) > 3 else ""
        if severity in _SEVERITY:
            film.severities.append(severity)
        coords = [_number(t) for t in tokens[4:7]]
        if len(coords) == 3 and all(c is not None for c in coords) and coords[2] > 0:  # type: ignore[operator]
            film.circles.append((coords[0], coords[1], coords[2]))  # type: ignore[arg-type]
    return films


def _pathology(film: _Film) -> str:
    if "M" in film.severities:
        return "malignant"
    if "B" in film.severities:
        return "benign"
    return "normal" if not film.classes else ""


def _find_info(source: Path) -> Path:
    for name in ("Info.txt", "info.txt", "INFO.TXT"):
        if (source / name).is_file():
            return source / name
    matches = [p for p in source.iterdir() if p.is_file() and p.name.lower() == "info.txt"]
    if matches:
        return matches[0]
    raise FileNotFoundError(f"no Info.txt in MIAS source folder {source}")


def convert_mias(source: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """Convert the original mini-MIAS files into a dataset in the manifest contract.

    Args:
        source: folder holding ``Info.txt`` and the ``mdbNNN.pgm`` films (any size; the
            size is read from each file).
        out_dir: the output dataset folder (created).

    Returns:
        The manifest written, one row per film listed in ``Info.txt`` whose PGM exists.

    Raises:
        FileNotFoundError: ``source`` is not a folder or has no ``Info.txt``.
        ValueError: ``Info.txt`` lists no film, no listed film has a PGM, a film does not
            decode.
    """
    source, out_dir = Path(source), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"MIAS source folder not found: {source}")
    info = _find_info(source)
    films = parse_info(info)
    if not films:
        raise ValueError(f"{info} lists no film (no line starts with 'mdb')")
    pgms = {p.stem.lower(): p for p in source.iterdir() if p.suffix.lower() == ".pgm"}

    rows: list[dict[str, object]] = []
    missing = 0
    unknown_pathology = 0
    for refnum, film in films.items():
        pgm = pgms.get(refnum)
        if pgm is None:
            missing += 1
            logger.warning("%s is listed in %s but %s.pgm is missing; skipped",
                           refnum, info.name, refnum)
            continue
        image = read_gray_u8(pgm)
        height = image.shape[0]
        number = int(_REFNUM.match(refnum)[1])  # type: ignore[index]
        # MIAS coordinates: origin at the bottom-left → row = H - y.
        circles = [(x, height - y, r) for x, y, r in film.circles]
        mask = rasterise_circles(image.shape, circles)
        image_rel, mask_rel = f"images/{refnum}.png", f"masks/{refnum}_mask.png"
        write_png(out_dir / image_rel, image)
        write_mask(out_dir / mask_rel, mask)
        pathology = _pathology(film)
        if not pathology:
            unknown_pathology += 1
            logger.warning("%s: abnormality without B/M severity; pathology left empty", refnum)
        rows.append({
            "image": image_rel,
            "modality": "mammography",
            "density": MIAS_DENSITY.index(film.tissue) + 1,
            "pathology": pathology,
            "mask": mask_rel,
            "group": f"p{(number + 1) // 2:03d}",
            "refnum": refnum,
            "laterality": "R" if number % 2 else "L",
            "tissue": film.tissue,
            "abnormality": "|".join(dict.fromkeys(film.classes)) or "NORM",
            "n_lesions": len(film.classes),
            "has_roi": bool(circles),
        })
    extra = sorted(set(pgms) - set(films))
    if extra:
        logger.warning("%d PGM files are not listed in %s and were skipped (e.g. %s)",
                       len(extra), info.name, extra[0])
    if not rows:
        raise ValueError(f"none of the films listed in {info} has a PGM file in {source}")
    df = finish_manifest(rows, out_dir)
    logger.info(
        "MIAS: %d films %s, %d with ROI, %d listed but missing, %d with unknown pathology -> %s",
        len(df), df["pathology"].value_counts().to_dict(), int(df["has_roi"].sum()),
        missing, unknown_pathology, out_dir,
    )
    return df
