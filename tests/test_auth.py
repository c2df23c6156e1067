"""Auth through a real gRPC server on loopback with the interceptor installed."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qlora_serve.server.auth import (
    ANONYMOUS,
    AuthInterceptor,
    Authenticator,
    KeyFileError,
    Principal,
    add_keys_parser,
    check_adapter_access,
    generate_key,
    hash_key,
    key_stanza,
    principal_from_context,
    require_admin,
)
from qlora_serve.errors import PermissionDenied, Unauthenticated

CLIENT_KEY, CLIENT_SHA = generate_key()
ADMIN_KEY, ADMIN_SHA = generate_key()


@pytest.fixture
def key_file(tmp_path):
    p = tmp_path / "keys.toml"
    p.write_text(key_stanza("acme", "client", CLIENT_SHA) + "\n" + key_stanza("ops", "admin", ADMIN_SHA))
    return p


@pytest.fixture
def server(key_file):
    """A real gRPC server: test.Echo/Who (unary) and test.Echo/Count (server streaming), plus health."""
    auth = Authenticator.from_file(key_file)
    seen: list[Principal] = []

    def who(request: bytes, context) -> bytes:
        p = principal_from_context(context, auth)
        seen.append(p)
        return f"{p.tenant}/{p.role}".encode()

    def count(request: bytes, context):
        seen.append(principal_from_context(context, auth))
        for i in range(3):
            yield bytes([i])

    ident = dict(request_deserializer=None, response_serializer=None)
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Who": grpc.unary_unary_rpc_method_handler(who, **ident),
            "Count": grpc.unary_stream_rpc_method_handler(count, **ident),
        },
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[AuthInterceptor(auth)])
    srv.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel, seen
    finally:
        channel.close()
        srv.stop(None)


def _who(channel, metadata=None):
    return channel.unary_unary("/test.Echo/Who")(b"", metadata=metadata, timeout=5)


def _code_and_details(fn):
    with pytest.raises(grpc.RpcError) as ei:
        fn()
    return ei.value.code(), ei.value.details()


def test_no_key_is_unauthenticated_and_handler_not_run(server):
    channel, seen = server
    code, details = _code_and_details(lambda: _who(channel))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in details
    assert seen == []


def test_unknown_key_is_unauthenticated_without_echo(server):
    channel, seen = server
    bogus = "qls_not-a-real-key-1234567890"
    code, details = _code_and_details(lambda: _who(channel, [("authorization", f"Bearer {bogus}")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown API key" in details
    assert bogus not in details
    assert seen == []


def test_wrong_scheme_is_unauthenticated(server):
    channel, _ = server
    code, details = _code_and_details(lambda: _who(channel, [("authorization", f"Basic {CLIENT_KEY}")]))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert CLIENT_KEY not in details


def test_valid_keys_reach_handler_with_principal(server):
    channel, seen = server
    assert _who(channel, [("authorization", f"Bearer {CLIENT_KEY}")]) == b"acme/client"
    assert _who(channel, [("x-api-key", ADMIN_KEY)]) == b"ops/admin"
    assert seen == [Principal("acme", "client"), Principal("ops", "admin")]


def test_streaming_method_is_guarded_too(server):
    channel, seen = server
    count = channel.unary_stream("/test.Echo/Count")
    code, _ = _code_and_details(lambda: list(count(b"", timeout=5)))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert seen == []
    assert list(count(b"", metadata=[("authorization", f"bearer {CLIENT_KEY}")], timeout=5)) == [
        b"\x00", b"\x01", b"\x02"
    ]
    assert seen == [Principal("acme", "client")]


def test_health_is_exempt(server):
    channel, _ = server
    resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_authenticator_unit_and_disabled():
    auth = Authenticator([(hash_key("k1"), Principal("t", "client"))])
    assert auth.authenticate([("authorization", "Bearer k1")]) == Principal("t", "client")
    with pytest.raises(Unauthenticated, match="no API key"):
        auth.authenticate([])
    with pytest.raises(Unauthenticated, match="no key after"):
        auth.authenticate([("authorization", "Bearer ")])
    off = Authenticator.disabled()
    assert not off.enabled
    assert off.authenticate([]) == ANONYMOUS and ANONYMOUS.is_admin


@pytest.mark.parametrize(
    "body, fragment",
    [
        ('[[keys]]\ntenant = "acme"\nrole = "owner"\nsha256 = "' + "a" * 64 + '"\n', "keys[0] (tenant 'acme'): role"),
        ('[[keys]]\ntenant = "acme"\nrole = "client"\nsha256 = "' + "a" * 64 + '"\n'
         '[[keys]]\ntenant = "beta"\nrole = "client"\nsha256 = "xyz"\n', "keys[1] (tenant 'beta'): sha256"),
        ('[[keys]]\ntenant = "a b"\nrole = "client"\nsha256 = "' + "a" * 64 + '"\n', "keys[0]: tenant"),
        ('[[keys]]\ntenant = "acme"\nrole = "client"\nsha256 = "' + "a" * 64 + '"\nkey = "plain"\n',
         "unknown field(s) ['key']"),
        ('[[keys]]\ntenant = "acme"\nrole = "client"\nsha256 = "' + "a" * 64 + '"\n'
         '[[keys]]\ntenant = "acme"\nrole = "admin"\nsha256 = "' + "A" * 64 + '"\n', "same sha256"),
        ("", "no [[keys]] entries"),
        ("[[keys]\n", "not valid TOML"),
    ],
)
def test_bad_key_file_names_the_entry(tmp_path, body, fragment):
    p = tmp_path / "keys.toml"
    p.write_text(body)
    with pytest.raises(KeyFileError) as ei:
        Authenticator.from_file(p)
    assert fragment in str(ei.value)
    assert "keys.toml" in str(ei.value)


def test_missing_key_file(tmp_path):
    with pytest.raises(KeyFileError, match="does not exist"):
        Authenticator.from_file(tmp_path / "nope.toml")


def test_adapter_access_rules():
    acme, beta, admin = Principal("acme", "client"), Principal("beta", "client"), Principal("ops", "admin")
    check_adapter_access(acme, "acme")
    check_adapter_access(acme, "acme", write=True)
    check_adapter_access(acme, None)  # public: anyone may use
    check_adapter_access(admin, "acme", write=True)
    check_adapter_access(admin, None, write=True)
    with pytest.raises(PermissionDenied, match="belongs to another tenant") as ei:
        check_adapter_access(beta, "acme", adapter="adapter 'x'")
    assert "acme" not in str(ei.value)  # never names the other tenant
    with pytest.raises(PermissionDenied, match="may change only"):
        check_adapter_access(beta, "acme", write=True)
    with pytest.raises(PermissionDenied, match="public"):
        check_adapter_access(acme, None, write=True)
    require_admin(admin)
    with pytest.raises(PermissionDenied, match="admin"):
        require_admin(acme, "DeleteAdapter")


def test_keys_new_cli_prints_key_once_and_stanza(capsys, tmp_path):
    import argparse

    import tomllib

    parser = argparse.ArgumentParser(prog="qlora-serve")
    add_keys_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "new", "--tenant", "acme", "--role", "admin"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    stanza = out[out.index("[[keys]]"):]
    entry = tomllib.loads(stanza)["keys"][0]
    plaintext = next(w for w in out.split() if w.startswith("qls_"))
    assert out.count(plaintext) == 1
    assert entry == {"tenant": "acme", "role": "admin", "sha256": hash_key(plaintext)}
    (tmp_path / "k.toml").write_text(stanza)
    auth = Authenticator.from_file(tmp_path / "k.toml")
    assert auth.authenticate([("x-api-key", plaintext)]) == Principal("acme", "admin")
