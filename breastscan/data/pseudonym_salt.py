"""The secret key (salt) of the HMAC that turns DICOM PatientIDs into group ids.

:func:`breastscan.imaging.dicom.pseudonymize` is only as strong as its key: with a known
salt, anyone holding a list of PatientIDs can hash them all and match the group ids of a
manifest. :func:`resolve_salt` finds the project's secret salt, in this order:

1. ``$BREASTSCAN_PSEUDONYM_SALT``;
2. an explicit salt or salt file (``breastscan ingest --salt`` / ``--salt-file``);
3. :data:`DEFAULT_SALT_FILE` (relative to the working directory, the project root), created
   on first use with 32 random bytes, mode 0600, and git-ignored.

The same salt gives the same ids; a new salt gives unrelated ids, so data ingested before
and after no longer share patient groups: keep the file (or the variable) and back it up.
A public or short salt is refused unless explicitly allowed (demo and tests only).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

logger = logging.getLogger(__name__)

SALT_ENV = "BREASTSCAN_PSEUDONYM_SALT"
"""Environment variable holding the salt; wins over every other source."""

DEFAULT_SALT_FILE = Path(".breastscan/pseudonym.salt")
"""Where the salt is kept (and created on first use), relative to the working directory."""

PUBLIC_SALT = "breastscan"
"""The former default salt, published in the code: ids hashed with it are reversible."""

MIN_SALT_LENGTH = 16
"""Shortest salt accepted without ``allow_public``."""


class SaltError(ValueError):
    """No usable salt: a public or short one, an unreadable or empty salt file, two sources."""


def _read_salt_file(path: Path) -> str:
    """The stripped content of a salt file; warns when others may read it.

    Raises:
        SaltError: the file cannot be read or is empty.
    """
    try:
        salt = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SaltError(f"cannot read the salt file {path}: {exc.strerror or exc}") from exc
    if not salt:
        raise SaltError(f"the salt file {path} is empty")
    if mode & 0o077:
        logger.warning("salt file %s is readable by other users (mode %o): chmod 600 it",
                       path, mode & 0o777)
    return salt


def _create_salt_file(path: Path) -> str:
    """Write a new random salt to ``path`` (mode 0600, parent 0700) unless it exists; return the salt."""
    salt = secrets.token_hex(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it meanwhile: use theirs
        return _read_salt_file(path)
    except OSError as exc:
        raise SaltError(f"cannot create the salt file {path}: {exc.strerror or exc} "
                        f"(or set ${SALT_ENV})") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(salt + "\n")
    logger.warning("created a new pseudonymisation salt in %s (mode 0600): keep it "
                   "secret and back it up; a new salt gives new group ids, so data ingested "
                   "before and after would no longer share patient groups", path.resolve())
    return salt


def resolve_salt(
    salt: str | None = None,
    salt_file: Path | None = None,
    *,
    allow_public: bool = False,
    default_file: Path = DEFAULT_SALT_FILE,
) -> str:
    """Find the pseudonymisation salt: environment, then ``salt``/``salt_file``, then ``default_file``.

    Args:
        salt: a salt given explicitly (e.g. ``--salt``).
        salt_file: a file holding the salt (e.g. ``--salt-file``); must exist.
        allow_public: accept a public or short salt, with a warning, and fall back to
            :data:`PUBLIC_SALT` instead of ``default_file`` when no salt is given. Demo
            and tests only: such ids can be reversed by anyone with a list of PatientIDs.
        default_file: the salt file used (and created, mode 0600) when nothing else names one.

    Returns:
        The salt.

    Raises:
        SaltError: both ``salt`` and ``salt_file``; ``salt_file`` missing, unreadable or
            empty; a public or too short salt without ``allow_public``.
    """
    if salt is not None and salt_file is not None:
        raise SaltError("give --salt or --salt-file, not both")
    env = os.environ.get(SALT_ENV, "").strip()
    if env:
        if salt is not None or salt_file is not None:
            logger.warning("$%s is set: it is used, the salt given as an option is ignored", SALT_ENV)
        chosen, source = env, f"${SALT_ENV}"
    elif salt is not None:
        chosen, source = salt.strip(), "--salt"
    elif salt_file is not None:
        if not salt_file.is_file():
            raise SaltError(f"salt file {salt_file} not found (create one with: python -c "
                            f"'import secrets; print(secrets.token_hex(32))' > {salt_file}; "
                            f"chmod 600 {salt_file})")
        chosen, source = _read_salt_file(salt_file), str(salt_file)
    elif allow_public:
        chosen, source = PUBLIC_SALT, ""
    elif default_file.is_file():
        chosen, source = _read_salt_file(default_file), str(default_file)
    else:
        chosen, source = _create_salt_file(default_file), str(default_file)

    weak = (f"the public default salt {PUBLIC_SALT!r}" if chosen == PUBLIC_SALT else
            f"shorter than {MIN_SALT_LENGTH} characters" if len(chosen) < MIN_SALT_LENGTH else "")
    if weak and not allow_public:
        raise SaltError(f"the pseudonymisation salt from {source} is {weak}: anyone with a list of "
                        f"PatientIDs could reverse the group ids. Use a secret of at least "
                        f"{MIN_SALT_LENGTH} characters (${SALT_ENV} or --salt-file), or give no salt "
                        f"so that {default_file} is created, or pass --allow-public-salt (demo and "
                        f"tests only)")
    if weak:
        what = f"the salt from {source} is {weak}" if source else f"no salt given, using {weak}"
        logger.warning("pseudonymisation: %s (--allow-public-salt): the group ids are reversible by "
                       "anyone with a list of PatientIDs; demo and tests only", what)
    return chosen
