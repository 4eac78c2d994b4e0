"""A throwaway PostgreSQL cluster for tests that run ``mlflow server`` against a real database.

Usage (the session fixture :func:`postgres`, loaded as a plugin by tests/conftest.py)::

    def test_x(postgres: PostgresCluster) -> None:
        uri = postgres.create_database("mlflow_x")   # postgresql+psycopg2://postgres@/mlflow_x?host=...
        with mlflow_server(tmp_path, backend_store_uri=uri) as server_uri:
            ...

or directly: ``with postgres_cluster() as cluster: ...``.

The cluster is made by ``initdb`` in a new directory under /tmp, started with ``pg_ctl`` on
a unix socket in that directory only (``listen_addresses=''``: nothing on the network; the
port only names the socket), trust authentication, durability off (``fsync=off``: a test
database), and stopped and deleted at the end. ``initdb`` and the server refuse to run as
root: as root they run as the ``postgres`` user (``runuser -u postgres --``, which Debian's
package creates) and the directory is owned by it; as anyone else, as that user.

Binaries: ``$BREASTSCAN_PG_BINDIR``, else the newest ``/usr/lib/postgresql/<major>/bin``
(Debian's packages, not on ``PATH``), else ``initdb``/``pg_ctl`` on ``PATH``. Without them
the tests that need PostgreSQL are skipped with the reason, or FAIL under CI (``$CI`` set)
or under ``make test`` (``BREASTSCAN_POSTGRES_TESTS=require``); ``make test POSTGRES=skip``
(``BREASTSCAN_POSTGRES_TESTS=skip``) skips them on purpose.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from breastscan.processes import free_port

__all__ = ["INSTALL", "PostgresCluster", "pg_bindir", "postgres", "postgres_cluster"]

INSTALL = "apt-get install -y postgresql"
"""How to get the binaries (Debian/Ubuntu, as root; `make postgres` does it)."""
PSYCOPG = "psycopg2-binary"
"""The driver of the store URIs here, ``postgresql+psycopg2://`` (a dev dependency). Named on
purpose: SQLAlchemy 2.1 takes psycopg 3 for a bare ``postgresql://``, and with psycopg 3
MLflow 3.17's stage transitions fail on PostgreSQL (``integer <> character varying``: it binds
the version as a string), so ``models:/<name>/Production`` would never resolve."""
SUPERUSER = "postgres"
"""Database superuser created by initdb (and OS user the cluster runs as, when we are root)."""
_NEEDED = ("initdb", "pg_ctl", "postgres", "psql")


def pg_bindir() -> Path | None:
    """Directory holding initdb, pg_ctl, postgres and psql, or ``None`` when PostgreSQL is absent."""
    candidates: list[Path] = []
    if os.environ.get("BREASTSCAN_PG_BINDIR"):
        candidates.append(Path(os.environ["BREASTSCAN_PG_BINDIR"]))
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                    key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)] or [0], reverse=True)
    candidates += debian
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for cand in candidates:
        if all(os.access(cand / tool, os.X_OK) for tool in _NEEDED):
            return cand
    return None


@dataclass(frozen=True)
class PostgresCluster:
    """A running cluster: where it lives and how to reach it (unix socket only)."""

    bindir: Path
    root: Path
    port: int

    @property
    def socket_dir(self) -> Path:
        return self.root

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    def uri(self, database: str) -> str:
        """SQLAlchemy URI of ``database`` over the unix socket (what ``--backend-store-uri`` takes)."""
        return (f"postgresql+psycopg2://{SUPERUSER}@/{database}"
                f"?host={quote(str(self.socket_dir), safe='/')}&port={self.port}")

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run one SQL command with psql as the superuser; its unaligned, tuples-only output."""
        proc = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database,
             "-c", sql],
            capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql {sql!r} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    def create_database(self, name: str) -> str:
        """``CREATE DATABASE name``; its URI."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"not a plain database name: {name!r}")
        self.psql(f"CREATE DATABASE {name}")
        return self.uri(name)


def _as_cluster_owner() -> list[str]:
    """Command prefix running a tool as the cluster's owner: ``runuser -u postgres --`` as root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    if os.access(runuser, os.X_OK):
        return [runuser, "-u", SUPERUSER, "--"]
    return ["su", SUPERUSER, "-s", "/bin/sh", "-c", '"$0" "$@"']


def _run(cmd: list[str], what: str, log_file: Path | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        log = ""
        if log_file is not None and log_file.exists():
            log = "\n--- server log ---\n" + log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}{log}")


@contextmanager
def postgres_cluster(bindir: Path | None = None) -> Iterator[PostgresCluster]:
    """initdb + pg_ctl start a cluster in a new /tmp directory; stop and delete it on exit.

    Raises:
        FileNotFoundError: no PostgreSQL binaries (see :func:`pg_bindir`).
        RuntimeError: as root without a ``postgres`` user, or initdb / pg_ctl failed.
    """
    bindir = bindir or pg_bindir()
    if bindir is None:
        raise FileNotFoundError(f"PostgreSQL binaries not found (install: {INSTALL})")
    # Under /tmp, not pytest's tmp_path: root's /tmp/pytest-of-root is 0700 (the postgres user
    # could not enter it) and a unix socket path must stay under ~100 characters.
    root = Path(tempfile.mkdtemp(prefix="breastscan-pg-", dir="/tmp"))
    prefix = _as_cluster_owner()
    if prefix:
        try:
            owner = pwd.getpwnam(SUPERUSER)
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError(f"running as root and there is no '{SUPERUSER}' user for initdb "
                               f"(Debian's package creates it: {INSTALL})") from None
        os.chown(root, owner.pw_uid, owner.pw_gid)
    os.chmod(root, 0o700)
    cluster = PostgresCluster(bindir=bindir, root=root, port=free_port())
    data = root / "data"
    started = False
    try:
        _run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust",
              "-E", "UTF8", "--locale=C", "--no-sync"], "initdb")
        options = (f"-p {cluster.port} -k {root} -c listen_addresses='' -c fsync=off "
                   f"-c synchronous_commit=off -c full_page_writes=off")
        _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(cluster.log_file),
              "-o", options, "-w", "-t", "60", "start"], "pg_ctl start", cluster.log_file)
        started = True
        yield cluster
    finally:
        if started:
            try:
                _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60",
                      "stop"], "pg_ctl stop", cluster.log_file)
            except (RuntimeError, subprocess.TimeoutExpired):
                _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                     "pg_ctl stop -m immediate", cluster.log_file)
        shutil.rmtree(root, ignore_errors=True)


def _unavailable(reason: str) -> None:
    """Skip, or fail under CI / ``make test`` (see the module docstring)."""
    mode = os.environ.get("BREASTSCAN_POSTGRES_TESTS", "")
    if mode == "require" or (os.environ.get("CI") and mode != "skip"):
        pytest.fail(f"{reason}; `make test POSTGRES=skip` to skip these tests", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster for the session (skipped or failed without PostgreSQL, see above)."""
    if os.environ.get("BREASTSCAN_POSTGRES_TESTS") == "skip":
        pytest.skip("PostgreSQL NOT tested: skipped on purpose (make test POSTGRES=skip)")
    bindir = pg_bindir()
    if bindir is None:
        _unavailable(f"PostgreSQL is not installed (no initdb/pg_ctl in /usr/lib/postgresql/*/bin or on "
                     f"PATH): as root `{INSTALL}` (`make postgres` does it) or set BREASTSCAN_PG_BINDIR")
    try:
        import psycopg2  # noqa: F401  (mlflow server's driver for postgresql+psycopg2:// stores)
    except ImportError:
        _unavailable(f"{PSYCOPG} is not installed in this environment: .venv/bin/uv pip install "
                     f"--python .venv/bin/python '{PSYCOPG}' (make install installs it)")
    with postgres_cluster(bindir) as cluster:
        yield cluster
