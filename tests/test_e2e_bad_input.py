"""Bad-input battery through a REAL gRPC server on loopback (no mocks).

Each case gets its documented status (README "Errors"), the refusal is counted
in ``qlora_rejections_total{reason,tenant}``, and afterwards the server is still
healthy: health SERVING and a normal request succeeds.
"""

from __future__ import annotations

import json
import logging
import math
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import wait_until
from e2e_keys import rejections
from qlora_serve.server.client import Client
from qlora_serve.v1 import inference_pb2, registry_pb2

MAX_MESSAGE_BYTES = 1 << 20
GENERATE = "/qlora_serve.v1.Inference/Generate"
GENERATE_STREAM = "/qlora_serve.v1.Inference/GenerateStream"
GET_ADAPTER = "/qlora_serve.v1.AdapterRegistry/GetAdapter"
TENANT = "anonymous"  # auth is off in this module: every caller is the anonymous admin


@pytest.fixture(scope="module")
def bad_server(start_server):
    return start_server(max_message_bytes=MAX_MESSAGE_BYTES, engine={"default_max_new_tokens": 4})


@pytest.fixture(scope="module")
def client(bad_server):
    with Client(f"127.0.0.1:{bad_server.port}", timeout=60) as c:
        yield c


def assert_healthy(server, client) -> None:
    """Health SERVING, a normal request succeeds, and nothing is left held."""
    resp = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    out = client.generate("hello world", adapter="pirate", max_new_tokens=3)
    assert out.completion_tokens == 3 and out.adapter.name == "pirate"
    wait_until(lambda: server.runtime.engine.stats()["running"] == 0 and server.runtime.engine.stats()["queued"] == 0
               and server.runtime.quotas.in_flight(TENANT) == 0, what="engine idle and leases released")


def raw_call(client, method: str, payload: bytes, stream: bool = False):
    """Send raw bytes as the request (identity serializers): what a buggy or hostile client can send."""
    if stream:
        return list(client.channel.unary_stream(method)(payload, timeout=30))
    return client.channel.unary_unary(method)(payload, timeout=30)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_malformed_utf8_and_garbage_bytes_are_invalid_argument(bad_server, client):
    before = rejections(bad_server, "invalid_argument", TENANT)
    bad_utf8 = b"\xff\xfe\xc3("  # not UTF-8 in a proto3 string field
    cases = {
        "prompt": (GENERATE, field_bytes(2, bad_utf8), False),
        "prompt (stream)": (GENERATE_STREAM, field_bytes(2, bad_utf8), True),
        "adapter": (GENERATE, field_bytes(1, bad_utf8) + field_bytes(2, b"hello"), False),
        "stop": (GENERATE, field_bytes(2, b"hello") + field_bytes(9, bad_utf8), False),
        "request_id": (GENERATE, field_bytes(2, b"hello") + field_bytes(10, bad_utf8), False),
        "registry ref": (GET_ADAPTER, field_bytes(1, bad_utf8), False),
        "truncated message": (GENERATE, field_bytes(2, b"hello")[:-2], False),
        "garbage": (GENERATE, b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", False),
    }
    for what, (method, payload, stream) in cases.items():
        code, details = status_of(lambda: raw_call(client, method, payload, stream))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (what, code, details)
        assert "could not be parsed" in details and "UTF-8" in details, details
    assert rejections(bad_server, "invalid_argument", TENANT) == before + len(cases)
    # The same raw path with well-formed bytes works (the passthrough parses it).
    ok = client.channel.unary_unary(GENERATE, response_deserializer=inference_pb2.GenerateResponse.FromString)(
        inference_pb2.GenerateRequest(prompt="héllo wörld", max_new_tokens=2).SerializeToString(), timeout=60)
    assert ok.completion_tokens == 2
    assert_healthy(bad_server, client)


def test_unknown_fields_are_ignored_as_proto3_does(bad_server, client):
    known = inference_pb2.GenerateRequest(prompt="hello world", max_new_tokens=3).SerializeToString()
    unknown = varint(999 << 3 | 0) + varint(12345) + field_bytes(1000, b"\xff not utf-8, but unknown fields are bytes")
    call = client.channel.unary_unary(GENERATE, response_deserializer=inference_pb2.GenerateResponse.FromString)
    with_unknown = call(known + unknown, timeout=60)
    plain = call(known, timeout=60)
    assert with_unknown.token_ids == plain.token_ids and with_unknown.completion_tokens == 3
    assert_healthy(bad_server, client)


def test_huge_prompts_and_oversize_messages(bad_server, client):
    before = rejections(bad_server, "invalid_argument", TENANT)
    # Over --max-prompt-tokens (8192): INVALID_ARGUMENT naming the limit.
    code, details = status_of(lambda: client.generate("hello " * 10_000, max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-prompt-tokens" in details, details
    code, details = status_of(lambda: client.generate(prompt_token_ids=[5] * 9000, max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 8192" in details, details
    # Under the token limit but over the model's context (512).
    code, details = status_of(lambda: client.generate(prompt_token_ids=[5] * 600, max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in details, details
    assert rejections(bad_server, "invalid_argument", TENANT) == before + 3
    # Over --max-message-bytes (1 MiB here): gRPC itself refuses it, RESOURCE_EXHAUSTED.
    for stream in (False, True):
        fn = client.stream if stream else client.generate
        code, details = status_of(lambda: list(fn("x" * (MAX_MESSAGE_BYTES + 1024), max_new_tokens=2))
                                  if stream else fn("x" * (MAX_MESSAGE_BYTES + 1024), max_new_tokens=2))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (stream, code, details)
        assert "larger than max" in details or "message" in details.lower(), details
    assert_healthy(bad_server, client)


@pytest.mark.parametrize("field,value,needle", [
    ("temperature", -1.0, "temperature"),
    ("temperature", math.nan, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("top_p", math.nan, "top_p"),
    ("top_p", -0.5, "top_p"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("max_new_tokens", -5, "max_new_tokens"),
    ("max_new_tokens", 10**6, "max_new_tokens"),
    ("prompt_token_ids", [2**31], "vocabulary"),
])
def test_negative_and_nan_sampling_values_are_invalid_argument(bad_server, client, field, value, needle):
    before = rejections(bad_server, "invalid_argument", TENANT)
    kw = {"max_new_tokens": 2, field: value}
    for fn in (client.generate, lambda *a, **k: list(client.stream(*a, **k))):
        code, details = status_of(lambda: fn("" if field == "prompt_token_ids" else "hello", **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, value, code, details)
        assert needle in details, details
    assert rejections(bad_server, "invalid_argument", TENANT) == before + 2


def test_thousands_of_stop_strings_and_long_ones_are_invalid_argument(bad_server, client):
    code, details = status_of(lambda: client.generate("hello", max_new_tokens=2, stop=[f"s{i}" for i in range(5000)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "stop has 5000 strings; the limit is 16" in details, details
    code, details = status_of(lambda: client.generate("hello", max_new_tokens=2, stop=["x" * 10_000]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "longer than 256 characters" in details, details
    code, details = status_of(lambda: client.generate("hello", max_new_tokens=2, stop=[""]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "non-empty" in details, details
    assert_healthy(bad_server, client)


def test_streams_cancelled_at_once_free_everything(bad_server, client):
    calls = [client.stream("hello world", max_new_tokens=64) for _ in range(20)]
    for call in calls:
        call.cancel()
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            list(call)
        assert e.value.code() == grpc.StatusCode.CANCELLED
    # Cancelled after the first token, while running.
    running = [client.stream("The quick brown fox", max_new_tokens=200) for _ in range(4)]
    for call in running:
        next(call)
    for call in running:
        call.cancel()
    wait_until(lambda: bad_server.runtime.engine.stats()["running"] == 0, what="cancelled rows freed")
    assert_healthy(bad_server, client)


def test_unknown_method_and_unimplemented_paths(bad_server, client):
    code, _ = status_of(lambda: client.channel.unary_unary("/qlora_serve.v1.Inference/Nope")(b"", timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert_healthy(bad_server, client)


def test_request_log_has_ids_and_no_prompt_text_unless_debug(bad_server, client, caplog):
    from qlora_serve.server.cli import JsonFormatter

    secret = "my secret prompt text"
    caplog.set_level(logging.INFO, logger="qlora_serve.requests")
    out = client.generate(secret, adapter="poet", max_new_tokens=3, request_id="log-1")
    code, _ = status_of(lambda: client.generate(secret, adapter="no-such-adapter", request_id="log-2"))
    assert code == grpc.StatusCode.NOT_FOUND
    wait_until(lambda: sum(r.name == "qlora_serve.requests" for r in caplog.records) >= 2, what="request logs")
    lines = {r.request_id: r for r in caplog.records if r.name == "qlora_serve.requests"}
    ok, refused = lines["log-1"], lines["log-2"]
    assert (ok.method, ok.tenant, ok.adapter, ok.code) == ("Generate", TENANT, "poet@1", "OK")
    assert (ok.prompt_tokens, ok.completion_tokens) == (out.prompt_tokens, 3) and ok.latency_ms > 0
    assert (refused.code, refused.reason, refused.adapter) == ("NOT_FOUND", "not_found", "no-such-adapter")
    assert secret not in caplog.text
    as_json = json.loads(JsonFormatter().format(ok))
    assert {k: as_json[k] for k in ("request_id", "tenant", "adapter", "code", "completion_tokens")} == {
        "request_id": "log-1", "tenant": TENANT, "adapter": "poet@1", "code": "OK", "completion_tokens": 3}
    assert "latency_ms" in as_json and "prompt" not in as_json

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="qlora_serve.requests")
    client.generate(secret, max_new_tokens=1, request_id="log-3")
    wait_until(lambda: any(getattr(r, "request_id", "") == "log-3" for r in caplog.records), what="debug log")
    assert secret in caplog.text  # debug logging on: the prompt is logged


def test_max_concurrent_rpcs_refuses_beyond_the_limit(start_server):
    server = start_server(max_concurrent_rpcs=4)
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        release = threading.Event()

        def held_upload():  # a client stream that stays open until released: holds one RPC slot
            yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(name="held"))
            release.wait(30)

        futures = [c.registry.UploadAdapter.future(held_upload(), timeout=30) for _ in range(4)]
        try:
            # The 5th concurrent RPC is refused: the probe, or an upload when a probe got in first.
            wait_until(lambda: any(_limit_refusal(f) for f in futures) or _refused(c), timeout=20,
                       what="the 5th concurrent RPC to be refused")
        finally:
            release.set()
        for f in futures:  # the held uploads end (an upload with no files is INVALID_ARGUMENT); one may
            # itself have been refused if a probe took its slot first: that is the same limit at work
            assert f.exception(timeout=30).code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                      grpc.StatusCode.RESOURCE_EXHAUSTED)
        wait_until(lambda: not _refused(c), timeout=20, what="slots free again")
        assert_healthy(server, c)


def _limit_refusal(future) -> bool:
    if not future.done() or future.exception() is None:
        return False
    e = future.exception()
    return e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "Concurrent RPC limit exceeded" in e.details()


def _refused(c) -> bool:
    code, details = status_of(lambda: c.list_adapters())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        assert "Concurrent RPC limit exceeded" in details, details
        return True
    assert code == grpc.StatusCode.OK, (code, details)
    return False
