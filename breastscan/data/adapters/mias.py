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

from breastscan.data.adapters.errors import LayoutError, describe, not_layout
from breastscan.data.adapters.generic import finish_manifest, rasterise_circles, read_gray_u8
from breastscan.imaging.files import write_mask, write_png
from breastscan.labels import MIAS_DENSITY

logger = logging.getLogger(__name__)

_REFNUM = re.compile(r"^mdb(\d{3,})$", re.IGNORECASE)
_SEVERITY = {"B": "benign", "M": "malignant"}
_EXPECTED = "a folder holding Info.txt and the films it lists as mdbNNN.pgm"
"""What :func:`convert_mias` needs, as its layout errors say."""


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
        LayoutError: a film line with an unknown tissue code or too few fields.
    """
    films: dict[str, _Film] = {}
    for lineno, raw in enumerate(Path(path).read_text(errors="replace").splitlines(), 1):
        tokens = raw.split()
        if not tokens or not _REFNUM.match(tokens[0]):
            continue
        if len(tokens) < 3:
            raise LayoutError(f"{path}:{lineno}: expected REFNUM TISSUE CLASS, got {raw.strip()!r}")
        refnum, tissue, cls = tokens[0].lower(), tokens[1].upper(), tokens[2].upper()
        if tissue not in MIAS_DENSITY:
            raise LayoutError(
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
    """The ``Info.txt`` of a MIAS folder (any case of the name).

    Raises:
        LayoutError: ``source`` is not a folder or holds no ``Info.txt``.
    """
    if not source.is_dir():
        raise not_layout("mini-MIAS", _EXPECTED, source)
    matches = [p for p in sorted(source.iterdir()) if p.is_file() and p.name.lower() == "info.txt"]
    if not matches:
        raise not_layout("mini-MIAS", _EXPECTED, source)
    return next((p for p in matches if p.name == "Info.txt"), matches[0])


def _films_with_pgm(source: Path) -> tuple[Path, dict[str, tuple[_Film, Path]]]:
    """Read ``Info.txt`` and pair each film it lists with its PGM; warn about the rest.

    Returns:
        The ``Info.txt`` path, and ``refnum`` → (film, PGM path) for the films whose PGM exists.

    Raises:
        LayoutError: no ``Info.txt``, it lists no film, or no listed film has a PGM.
    """
    info = _find_info(source)
    films = parse_info(info)
    if not films:
        raise not_layout("mini-MIAS", "Info.txt lines 'mdbNNN TISSUE CLASS ...'", source,
                         found=f"no line starting with 'mdb' in {info}")
    pgms = {p.stem.lower(): p for p in source.iterdir() if p.suffix.lower() == ".pgm"}
    paired = {ref: (film, pgms[ref]) for ref, film in films.items() if ref in pgms}
    if not paired:
        raise not_layout("mini-MIAS", _EXPECTED, source,
                         found=f"none of the {len(films)} films listed in {info.name} "
                               f"(e.g. {next(iter(films))}.pgm) in {describe(source)}")
    missing = [ref for ref in films if ref not in paired]
    if missing:
        logger.warning("%d films listed in %s have no PGM file and were skipped (e.g. %s.pgm)",
                       len(missing), info.name, missing[0])
    extra = sorted(set(pgms) - set(films))
    if extra:
        logger.warning("%d PGM files are not listed in %s and were skipped (e.g. %s)",
                       len(extra), info.name, extra[0])
    return info, paired


def _convert_film(film: _Film, pgm: Path, out_dir: Path) -> dict[str, object]:
    """Write one film and its lesion mask under ``out_dir``; its manifest row."""
    refnum = film.refnum
    image = read_gray_u8(pgm)
    height = image.shape[0]
    number = int(_REFNUM.match(refnum)[1])  # type: ignore[index]
    # MIAS coordinates: origin at the bottom-left → row = H - y.
    circles = [(x, height - y, r) for x, y, r in film.circles]
    image_rel, mask_rel = f"images/{refnum}.png", f"masks/{refnum}_mask.png"
    write_png(out_dir / image_rel, image)
    write_mask(out_dir / mask_rel, rasterise_circles(image.shape, circles))
    pathology = _pathology(film)
    if not pathology:
        logger.warning("%s: abnormality without B/M severity; pathology left empty", refnum)
    return {
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
    }


def convert_mias(source: str | Path, out_dir: str | Path) -> pd.DataFrame:
    """Convert the original mini-MIAS files into a dataset in the manifest contract.

    Args:
        source: folder holding ``Info.txt`` and the ``mdbNNN.pgm`` films (any size; the
            size is read from each file).
        out_dir: the output dataset folder (created).

    Returns:
        The manifest written, one row per film listed in ``Info.txt`` whose PGM exists.

    Raises:
        LayoutError: ``source`` is not a folder or has no ``Info.txt``; ``Info.txt`` lists
            no film or has a malformed film line; no listed film has a PGM; a film does not
            decode. Nothing is written before the layout is checked.
    """
    source, out_dir = Path(source), Path(out_dir)
    info, paired = _films_with_pgm(source)
    rows = [_convert_film(film, pgm, out_dir) for film, pgm in paired.values()]
    df = finish_manifest(rows, out_dir)
    logger.info(
        "MIAS: %d films %s, %d with ROI, %d with unknown pathology (from %s) -> %s",
        len(df), df["pathology"].value_counts().to_dict(), int(df["has_roi"].sum()),
        int((df["pathology"] == "").sum()), info.name, out_dir,
    )
    return df
