"""API-key authentication (breastscan.serving.auth) without a service: key files, the HTTP edge's
key check, the gRPC interceptor on an in-process server, the clients' keys and the config's ``auth:``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from breastscan.serving.auth import (
    UNAUTHORIZED_MESSAGE,
    ApiKeys,
    add_key,
    grpc_interceptor,
    hash_key,
    is_open_path,
    new_key,
    parse_keys,
    presented_key,
)
from breastscan.serving.client import (
    API_KEY_ENV,
    GRPCClient,
    HTTPClient,
    ServiceError,
    grpc_error,
    resolve_api_key,
)
from breastscan.serving.config import Auth, load_serving_config, parse_serving_config
from breastscan.serving.http import Edge
from breastscan.serving.request import Request, api_routes
from tests.conftest import REPO

KEY = new_key()
OTHER = new_key()


@pytest.fixture(autouse=True)
def _no_client_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


# --------------------------------------------------------------------------- keys


def test_new_keys_are_random_url_safe_tokens() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    assert all(len(k) == 43 and k.replace("-", "").replace("_", "").isalnum() for k in keys)
    assert hash_key(KEY).startswith("sha256:") and len(hash_key(KEY)) == 7 + 64


def test_parse_keys_reads_lines_comments_commas_and_labels() -> None:
    text = (f"# the clinic's clients\n\n{hash_key(KEY)} clinic-a   # added today\n"
            f"  {hash_key(OTHER).upper().replace('SHA256:', 'sha256:')}\tpacs\n"
            f"{hash_key('x')}, {hash_key('y')} batch ,\n")
    keys = parse_keys(text, "keys")
    assert keys == {hash_key(KEY): "clinic-a", hash_key(OTHER): "pacs",
                    hash_key("x"): f"key-{hash_key('x')[7:15]}", hash_key("y"): "batch"}
    assert parse_keys("", "empty") == {} and parse_keys("# nothing\n", "c") == {}


@pytest.mark.parametrize("entry", [KEY, f"sha256:{KEY}", "sha256:" + "g" * 64, "sha256:" + "a" * 63,
                                   "md5:" + "a" * 64, "sha256:-" + "a" * 63, "sha256:0x" + "a" * 62])
def test_parse_keys_refuses_what_is_not_a_hash_without_showing_it(entry: str) -> None:
    with pytest.raises(ValueError, match="line 2: .*never the key") as info:
        parse_keys(f"{hash_key(OTHER)} ok\n{entry} someone\n", "api-keys")
    assert KEY not in str(info.value) and entry not in str(info.value)


def test_load_reads_the_file_and_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{hash_key(KEY)} from-file\n")
    env = {"KEYS": f"{hash_key(OTHER)} from-env"}
    keys = ApiKeys.load(path, "KEYS", env)
    assert keys.client(KEY) == "from-file" and keys.client(OTHER) == "from-env"
    assert ApiKeys.load(tmp_path / "missing", "KEYS", env).client(OTHER) == "from-env"  # a container's case
    assert ApiKeys.load(path, None, {}).client(KEY) == "from-file"
    assert ApiKeys.load(path, "KEYS", {}).client(OTHER) is None


def test_load_without_any_key_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("# no key yet\n")
    for keys_file, keys_env, env in ((tmp_path / "missing", "KEYS", {}),
                                     (tmp_path / "empty", "KEYS", {"KEYS": ""}), (None, None, {})):
        with pytest.raises(ValueError, match="no API key is configured"):
            ApiKeys.load(keys_file, keys_env, env)
    with pytest.raises(ValueError, match=r"\$KEYS: line 1"):
        ApiKeys.load(None, "KEYS", {"KEYS": KEY})  # a key in clear in the variable


def test_client_names_the_key_or_none() -> None:
    keys = ApiKeys({hash_key(KEY): "a", hash_key(OTHER): "b"})
    assert keys.client(KEY) == "a" and keys.client(OTHER) == "b"
    for bad in (None, "", new_key(), KEY.upper(), KEY[:-1], hash_key(KEY), " " + KEY):
        assert keys.client(bad) is None


@pytest.mark.parametrize("headers, key", [
    ([("x-api-key", KEY)], KEY),
    ([("x-api-key", f"  {KEY} ")], KEY),
    ([("authorization", f"Bearer {KEY}")], KEY),
    ([("authorization", f"bearer {KEY}")], KEY),
    ([("authorization", f"BEARER   {KEY}")], KEY),
    ([("accept", "*/*"), ("authorization", f"Bearer {KEY}")], KEY),
    ([("authorization", f"Basic {KEY}")], None),
    ([("authorization", KEY)], None),
    ([("x-api-key2", KEY)], None),
    ([], None),
])
def test_presented_key(headers: list[tuple[str, str]], key: str | None) -> None:
    assert presented_key(headers) == key


def test_add_key_creates_a_private_file_and_a_key_that_verifies(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "api-keys"
    first = add_key(path, "clinic-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = add_key(path, "clinic-b")
    text = path.read_text()
    assert first not in text and second not in text  # hashes only
    keys = ApiKeys.load(path, None, {})
    assert (keys.client(first), keys.client(second)) == ("clinic-a", "clinic-b")
    for label in ("", "two words", "a#b", "a,b"):
        with pytest.raises(ValueError, match="one word"):
            add_key(path, label)


def test_add_key_after_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"{hash_key(OTHER)} by-hand")  # edited by hand, no final newline
    key = add_key(path, "new")
    keys = ApiKeys.load(path, None, {})
    assert (keys.client(OTHER), keys.client(key)) == ("by-hand", "new")


# --------------------------------------------------------------------------- HTTP: the edge


class Harness:
    """The HTTP edge with API keys over a tiny app and an engine, recording what reached them."""

    def __init__(self) -> None:
        self.reached: list[dict[str, Any]] = []
        self.requests: list[Request] = []
        self.edge = Edge(self.app, routes=api_routes(["lesion"]), engine=lambda: self,
                         max_body_bytes=1 << 20, timeout_s=10, keys=ApiKeys({hash_key(KEY): "clinic"}))

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        self.reached.append(dict(scope))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def answer(self, request: Request) -> list[Any]:
        """The engine's one entry (answers ``/models``: no model)."""
        self.requests.append(request)
        return []

    def request(self, path: str, headers: dict[str, str] | None = None, kind: str = "http",
                method: str = "POST") -> tuple[list[dict[str, Any]], int]:
        sent: list[dict[str, Any]] = []
        reads = 0

        async def receive() -> dict[str, Any]:
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(dict(message))

        scope = {"type": kind, "method": method, "path": path,
                 "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]}
        asyncio.run(self.edge(scope, receive, send))
        return sent, reads


def test_open_paths_pass_without_a_key() -> None:
    harness = Harness()
    for path in ("/healthz", "/livez", "/readyz", "/", "/ui", "/ui/", "/ui/app.js",
                 "/static_content/index.css"):
        sent, _ = harness.request(path, method="GET")
        assert sent[0]["status"] == 200, path
    assert len(harness.reached) == 8
    sent, _ = harness.request("/docs.json", method="GET")  # the edge's own
    assert sent[0]["status"] == 200 and b'"openapi"' in sent[1]["body"] and len(harness.reached) == 8
    for path in ("/models", "/metrics", "/lesion", "/healthz/", "/uix", "/ui.js", "//models", "/UI/",
                 "/docs.json/x"):
        assert not is_open_path(path), path


def test_refusal_is_a_401_with_the_error_body_and_the_body_unread() -> None:
    harness = Harness()
    for path in ("/lesion", "/models", "/metrics", "/nowhere"):
        for headers in ({}, {"x-api-key": OTHER}, {"Authorization": f"Bearer {OTHER}"},
                        {"Authorization": f"Basic {KEY}"}, {"x-api-key": ""}):
            sent, reads = harness.request(path, headers)
            assert reads == 0  # refused before reading a byte of the body
            start, body = sent
            assert start["status"] == 401
            head = dict(start["headers"])
            assert head[b"content-type"] == b"application/json"
            assert head[b"www-authenticate"] == b'Bearer realm="breastscan"'
            assert int(head[b"content-length"]) == len(body["body"])
            assert httpx.Response(401, content=body["body"]).json() == {"error": UNAUTHORIZED_MESSAGE,
                                                                         "code": "unauthorized"}
    assert harness.reached == [] and harness.requests == []


def test_a_valid_key_reaches_the_app_and_the_engine_with_the_client_label() -> None:
    harness = Harness()
    for headers in ({"X-API-Key": KEY}, {"authorization": f"Bearer {KEY}"}):
        sent, _ = harness.request("/metrics", headers, method="GET")
        assert sent[0]["status"] == 200
        sent, _ = harness.request("/models", headers)
        assert (sent[0]["status"], sent[1]["body"]) == (200, b"[]")
    assert [s["state"]["client"] for s in harness.reached] == ["clinic", "clinic"]
    assert [r.caller for r in harness.requests] == ["clinic", "clinic"]


def test_websockets_need_a_key_and_lifespan_passes() -> None:
    harness = Harness()
    sent, reads = harness.request("/stream", kind="websocket")
    assert sent == [{"type": "websocket.close", "code": 1008}] and reads == 0
    assert harness.reached == []
    harness.request("/stream", {"x-api-key": KEY}, kind="websocket")
    harness.request("", kind="lifespan")
    assert [s["type"] for s in harness.reached] == ["websocket", "lifespan"]


# --------------------------------------------------------------------------- gRPC interceptor


@pytest.fixture(scope="module")
def grpc_target() -> Iterator[str]:
    """The real gRPC server (no model) with the key interceptor, on a free loopback port."""
    from breastscan.serving.engine import Engine
    from breastscan.serving.grpc_server import start_grpc_server

    async def never(*_: Any) -> Any:
        raise AssertionError("no model is served")

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="auth-loop", daemon=True)
    thread.start()
    keys = ApiKeys({hash_key(KEY): "clinic"})
    engine = Engine({}, never, never, max_upload_bytes=1 << 20)  # no model: no TensorFlow import
    handle = start_grpc_server(engine, loop, host="127.0.0.1", port=0, max_workers=2,
                               max_message_bytes=1 << 20, timeout_s=10, interceptors=[grpc_interceptor(keys)])
    try:
        yield f"127.0.0.1:{handle.port}"
    finally:
        handle.stop(None)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture(scope="module")
def streaming_target() -> Iterator[str]:
    """A bare server with every kind of streaming RPC (echo) behind the interceptor."""
    from concurrent.futures import ThreadPoolExecutor

    def echo_stream(requests: Any, _context: Any) -> Any:
        yield from requests

    def first(requests: Any, _context: Any) -> bytes:
        return bytes(next(iter(requests)))

    def repeat(request: bytes, _context: Any) -> Any:
        yield request
        yield request

    handler = grpc.method_handlers_generic_handler("test.Echo", {
        "Both": grpc.stream_stream_rpc_method_handler(echo_stream),
        "In": grpc.stream_unary_rpc_method_handler(first),
        "Out": grpc.unary_stream_rpc_method_handler(repeat),
    })
    keys = ApiKeys({hash_key(KEY): "c"})
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[grpc_interceptor(keys)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_grpc_calls_with_the_key_pass(grpc_target: str) -> None:
    with GRPCClient(grpc_target, timeout=10, api_key=KEY) as client:
        assert client.models() == []
        assert client.health() == "SERVING"
    from breastscan.serving.proto.breastscan.v1 import breastscan_pb2 as pb
    from breastscan.serving.proto.breastscan.v1 import breastscan_pb2_grpc as pb_grpc

    with grpc.insecure_channel(grpc_target) as channel:
        stub = pb_grpc.BreastScanStub(channel)
        for metadata in ((("x-api-key", KEY),), (("authorization", f"bearer {KEY}"),)):
            assert list(stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=metadata).models) == []


@pytest.mark.parametrize("key", ["", OTHER, KEY[:-1]])
def test_grpc_calls_without_a_valid_key_are_unauthenticated(grpc_target: str, key: str) -> None:
    with GRPCClient(grpc_target, timeout=10, api_key=key) as client:
        with pytest.raises(ServiceError) as info:
            client.models()
        assert (info.value.code, info.value.status) == ("unauthorized", grpc.StatusCode.UNAUTHENTICATED)
        assert info.value.message == UNAUTHORIZED_MESSAGE
        assert client.health() == "SERVING"  # health stays open


def test_a_refused_grpc_request_is_never_parsed(grpc_target: str) -> None:
    """Bytes no Predict request parses: UNAUTHENTICATED without a key (not a parse error)."""
    with grpc.insecure_channel(grpc_target) as channel:
        predict = channel.unary_unary("/breastscan.v1.BreastScan/Predict")
        with pytest.raises(grpc.RpcError) as info:
            predict(b"\xff\xff\xff not a protobuf", timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("error-code", "unauthorized") in tuple(info.value.trailing_metadata() or ())
        unknown = channel.unary_unary("/breastscan.v1.BreastScan/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as missing:
            unknown(b"", timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_grpc_reflection_is_open(grpc_target: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert "breastscan.v1.BreastScan" in names


def test_streaming_grpc_calls_are_refused_too(streaming_target: str) -> None:
    with grpc.insecure_channel(streaming_target) as channel:
        both = channel.stream_stream("/test.Echo/Both")
        into = channel.stream_unary("/test.Echo/In")
        out = channel.unary_stream("/test.Echo/Out")
        calls = [lambda md: list(both(iter([b"a", b"b"]), timeout=10, metadata=md)),
                 lambda md: into(iter([b"a"]), timeout=10, metadata=md),
                 lambda md: list(out(b"a", timeout=10, metadata=md))]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call((("x-api-key", OTHER),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert ("error-code", "unauthorized") in tuple(info.value.trailing_metadata() or ())
        assert [c((("x-api-key", KEY),)) for c in calls] == [[b"a", b"b"], b"a", [b"a", b"a"]]
    with GRPCClient(streaming_target, timeout=10, api_key=KEY) as client:  # the client's metadata on streams
        assert list(client.channel.stream_stream("/test.Echo/Both")(iter([b"z"]), timeout=10)) == [b"z"]


# --------------------------------------------------------------------------- clients


def _recording_transport(seen: list[httpx.Request], status: int = 200,
                         body: Any = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, json=[] if body is None else body)
    return httpx.MockTransport(handle)


def test_http_client_sends_the_key_as_bearer(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []
    with HTTPClient("http://svc", transport=_recording_transport(seen), api_key=KEY) as client:
        client.models()
        client.health()
    assert [r.headers["authorization"] for r in seen] == [f"Bearer {KEY}"] * 2
    monkeypatch.setenv(API_KEY_ENV, f" {OTHER}\n")
    with HTTPClient("http://svc", transport=_recording_transport(seen)) as client:
        client.models()
    assert seen[-1].headers["authorization"] == f"Bearer {OTHER}"
    with HTTPClient("http://svc", transport=_recording_transport(seen), api_key="") as client:
        client.models()  # "" sends none, whatever the environment says
    assert "authorization" not in seen[-1].headers
    with HTTPClient("http://svc", transport=_recording_transport(seen), headers={"X-API-Key": KEY}) as client:
        client.models()  # the caller's own header wins
    assert seen[-1].headers["x-api-key"] == KEY and "authorization" not in seen[-1].headers


def test_http_client_without_a_key_sends_none() -> None:
    seen: list[httpx.Request] = []
    with HTTPClient("http://svc", transport=_recording_transport(seen)) as client:
        client.models()
    assert "authorization" not in seen[0].headers and "x-api-key" not in seen[0].headers


@pytest.mark.parametrize("body", [{"error": UNAUTHORIZED_MESSAGE, "code": "unauthorized"},
                                  {"detail": "nope"}])
def test_http_401_is_unauthorized(body: Any) -> None:
    with HTTPClient("http://svc", transport=_recording_transport([], 401, body)) as client:
        with pytest.raises(ServiceError) as info:
            client.models()
    assert (info.value.code, info.value.status) == ("unauthorized", 401)


def test_a_key_a_header_cannot_carry_is_refused_before_sending() -> None:
    for bad in ("two words", "caf\u00e9", "a\nb"):
        with pytest.raises(ValueError, match="printable ASCII"):
            resolve_api_key(bad)
    assert resolve_api_key(None, {API_KEY_ENV: ""}) is None
    assert resolve_api_key(None, {}) is None
    assert resolve_api_key(None, {API_KEY_ENV: KEY}) == KEY
    assert resolve_api_key(" ", {API_KEY_ENV: KEY}) is None


def test_grpc_unauthenticated_without_the_trailer_is_unauthorized() -> None:
    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAUTHENTICATED

        def details(self) -> str:
            return "a proxy said no"

        def trailing_metadata(self) -> tuple[()]:
            return ()

    error = grpc_error(Failed())
    assert (error.code, error.message) == ("unauthorized", "a proxy said no")


# --------------------------------------------------------------------------- config


def test_the_shipped_config_has_auth_off() -> None:
    auth = load_serving_config(REPO / "services" / "serving.yaml", {}).auth
    assert auth == Auth(enabled=False, keys_file=".breastscan/api-keys", keys_env="BREASTSCAN_API_KEYS")


def test_auth_section_and_defaults() -> None:
    assert parse_serving_config({}).auth == Auth(enabled=False, keys_file=None,
                                                 keys_env="BREASTSCAN_API_KEYS")
    auth = parse_serving_config({"auth": {"enabled": True, "keys_file": "/k", "keys_env": "MY_KEYS"}}).auth
    assert auth == Auth(enabled=True, keys_file="/k", keys_env="MY_KEYS")
    assert parse_serving_config({"auth": {"keys_env": None}}).auth.keys_env is None
    with pytest.raises(ValueError, match="unknown auth keys: key"):
        parse_serving_config({"auth": {"enabled": True, "key": "x"}})


@pytest.mark.parametrize("switch, enabled", [("on", True), ("ON", True), ("true", True), ("1", True),
                                             ("off", False), ("false", False), ("0", False),
                                             (" off ", False)])
def test_auth_environment_overrides(switch: str, enabled: bool) -> None:
    raw = {"auth": {"enabled": not enabled, "keys_file": "/from/yaml"}}
    env = {"BREASTSCAN_AUTH": switch, "BREASTSCAN_API_KEYS_FILE": "/from/env"}
    auth = parse_serving_config(raw, env).auth
    assert (auth.enabled, auth.keys_file) == (enabled, "/from/env")
    # empty: the file's
    assert parse_serving_config(raw, {"BREASTSCAN_AUTH": ""}).auth.enabled is (not enabled)


@pytest.mark.parametrize("switch", ["yes", "enabled", "2"])
def test_a_bad_auth_switch_is_an_error(switch: str) -> None:
    with pytest.raises(ValueError, match="BREASTSCAN_AUTH must be on or off"):
        parse_serving_config({}, {"BREASTSCAN_AUTH": switch})


def test_keys_file_mode_is_not_loosened(tmp_path: Path) -> None:
    """An existing keys file keeps the mode its owner gave it (e.g. group-readable for a service)."""
    path = tmp_path / "keys"
    path.write_text("")
    os.chmod(path, 0o640)
    add_key(path, "x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
