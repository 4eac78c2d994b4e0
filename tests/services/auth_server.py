"""A second real service with API keys required (``auth: enabled``), over the session's models.

A pytest plugin, not a test module: a test module that needs :func:`auth_service` names it
in ``pytest_plugins = ["tests.services.auth_server"]``. Importing the fixture function into
two modules instead would define it twice, and each definition would start its own server;
a plugin's fixture is one definition, so the server starts once a session, for every module
that uses it.

Two keys are accepted: :attr:`AuthServed.file_key`, made by
:func:`breastscan.serving.auth.add_key` into the keys file the config names, and
:attr:`AuthServed.env_key`, whose hash alone is given through ``BREASTSCAN_API_KEYS``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from breastscan.serving.auth import add_key, hash_key, new_key
from breastscan.serving.client import API_KEY_ENV
from breastscan.serving.config import AUTH_ENV, KEYS_FILE_ENV
from tests.services.conftest import Served, variant_service

KEYS_ENV = "BREASTSCAN_API_KEYS"
"""The variable the test config names for hashed keys (``auth.keys_env``)."""


@dataclass
class AuthServed:
    """The service with keys required, and the two keys it accepts."""

    served: Served
    file_key: str
    """Made by ``add_key`` (its hash is in the keys file, label ``tests``)."""
    env_key: str
    """Its hash is in ``BREASTSCAN_API_KEYS`` (label ``env-client``)."""
    keys_file: Path

    @property
    def http_url(self) -> str:
        return self.served.http_url

    @property
    def grpc_target(self) -> str:
        return self.served.grpc_target


@pytest.fixture(scope="session")
def auth_service(served_project: tuple[Path, dict[str, str]]) -> Iterator[AuthServed]:
    """The service with ``auth: enabled`` on free loopback ports, for the whole session."""
    root, env = served_project
    keys_file = root / "auth" / "api-keys"
    file_key = add_key(keys_file, "tests")
    env_key = new_key()
    server_env = {k: v for k, v in env.items() if k not in (AUTH_ENV, KEYS_FILE_ENV, API_KEY_ENV)}
    server_env[KEYS_ENV] = f"{hash_key(env_key)} env-client"
    auth = {"enabled": True, "keys_file": str(keys_file), "keys_env": KEYS_ENV}
    with variant_service(served_project, "auth", {"auth": auth}, server_env) as served:
        yield AuthServed(served, file_key, env_key, keys_file)
