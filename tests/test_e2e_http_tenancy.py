"""The HTTP API with authentication on, through a REAL server on loopback: the same
key file, tenants and quotas as gRPC (`Authorization: Bearer`), OpenAI error objects
with 401/403/404/429 (+ Retry-After). No mocks."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import openai
import pytest

from e2e_keys import rejections, write_key_file
from qlora_serve.server.client import Client

ROLES = {"alpha": "client", "bravo": "client", "ops": "admin", "tiny-budget": "client"}
LIMITS = {"tiny-budget": {"tokens_per_minute": 20}}


@pytest.fixture(scope="module")
def tenancy(start_server, demo, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_key_file(key_file, ROLES, LIMITS)
    server = start_server(key_file=key_file, engine={"max_new_tokens": 64, "default_max_new_tokens": 4})
    with Client(f"127.0.0.1:{server.port}", api_key=keys["bravo"], timeout=60) as bravo:
        assert bravo.upload("bravo-secret", demo.adapters["poet"]).owner == "bravo"
    base = f"http://127.0.0.1:{server.http_port}"
    clients = {t: openai.OpenAI(base_url=base + "/v1", api_key=k, max_retries=0) for t, k in keys.items()}
    yield server, base, clients, keys


def post(base: str, path: str, body: dict, key: str | None = None, scheme: str = "Bearer"):
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"{scheme} {key}"
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def test_missing_or_unknown_key_is_401(tenancy):
    server, base, _, _ = tenancy
    before = rejections(server, "unauthenticated", "")
    for key, scheme in ((None, "Bearer"), ("qls_not-a-key", "Bearer"), ("whatever", "Basic")):
        status, _, body = post(base, "/v1/completions", {"model": "base", "prompt": "x"}, key, scheme)
        assert status == 401 and body["error"]["type"] == "authentication_error", body
        assert "qls_not-a-key" not in body["error"]["message"]
    assert rejections(server, "unauthenticated", "") == before + 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()


def test_tenants_see_only_their_adapters(tenancy):
    _, _, clients, _ = tenancy
    alpha = {m.id for m in clients["alpha"].models.list()}
    bravo = {m.id: m for m in clients["bravo"].models.list()}
    ops = {m.id for m in clients["ops"].models.list()}
    assert "pirate" in alpha and "poet@1" in alpha
    assert not any(i.startswith("bravo-secret") for i in alpha)
    assert "bravo-secret" in bravo and bravo["bravo-secret@1"].owned_by == "bravo"
    assert "bravo-secret" in ops  # an admin sees every adapter


def test_another_tenants_adapter_is_403_and_the_owner_may_use_it(tenancy):
    _, _, clients, _ = tenancy
    with pytest.raises(openai.PermissionDeniedError) as e:
        clients["alpha"].completions.create(model="bravo-secret", prompt="x", max_tokens=2)
    assert "bravo" not in str(e.value.message).replace("bravo-secret", "")  # never names the other tenant
    got = clients["bravo"].chat.completions.create(model="bravo-secret", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=2, temperature=0)
    assert got.usage.completion_tokens >= 1


def test_quota_is_429_with_retry_after(tenancy):
    server, base, _, keys = tenancy
    before = rejections(server, "quota", "tiny-budget")
    body = {"model": "base", "prompt": "spend", "max_tokens": 18, "temperature": 0}
    status, _, _ = post(base, "/v1/completions", body, keys["tiny-budget"])
    assert status == 200  # spends the bucket
    status, headers, err = post(base, "/v1/completions", body, keys["tiny-budget"])
    assert status == 429 and err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "quota"
    assert int(headers["retry-after"]) >= 1 and "tokens_per_minute" in err["error"]["message"]
    assert rejections(server, "quota", "tiny-budget") == before + 1


def get(base: str, path: str, key: str | None = None):
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_model_routes_need_a_key_and_respect_tenancy(tenancy):
    _, base, clients, keys = tenancy
    for path in ("/v1/model_info", "/v1/models/pirate"):
        status, body = get(base, path)
        assert status == 401 and body["error"]["type"] == "authentication_error", (path, body)
    status, info = get(base, "/v1/model_info", keys["alpha"])
    assert status == 200 and info["vocab_size"] > 0 and info["context_length"] > 0
    assert clients["bravo"].models.retrieve("bravo-secret@1").owned_by == "bravo"
    with pytest.raises(openai.PermissionDeniedError):
        clients["alpha"].models.retrieve("bravo-secret")
    assert clients["ops"].models.retrieve("bravo-secret").owned_by == "bravo"  # an admin sees every adapter
