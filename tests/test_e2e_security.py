"""Security and data defects found by black-box testing (issue 9, defects 1-7),
through REAL servers on loopback with authentication on, real safetensors, no mocks.

1. another tenant's private adapter is PERMISSION_DENIED whatever follows its name
   (`name@99`, `name@nosuch`): NOT_FOUND would list its versions and aliases;
2. a second server on a busy gRPC or metrics port fails at start-up naming the port;
3. adapters whose scaled delta (alpha/r x B x A) overflows are refused at registration;
4. configs that contradict their tensors (r, target_modules, integer weights, aLoRA)
   are refused naming the field; a negative lora_alpha is served as PEFT serves it;
5. prompts are bounded in bytes before tokenizing, and a client gone while its
   prompt was tokenized queues nothing;
6. error messages that echo caller input stay short (no "metadata size exceeds");
7. /metrics binds to 127.0.0.1 unless --metrics-address opens it.
"""

from __future__ import annotations

import json
import sys
import threading

import grpc
import pytest
import torch

from adapter_files import make_variant
from conftest import status_of, wait_until
from e2e_keys import write_key_file
from qlora_serve.errors import InvalidArgument
from qlora_serve.server.engine.loader import disable_cpu_bf16_repack  # why: see its docstring
from qlora_serve.server.client import Client
from qlora_serve.v1 import registry_pb2

ROLES = {"alpha": "client", "bravo": "client", "ops": "admin"}
MAX_PROMPT_TOKENS = 64  # so the derived --max-prompt-bytes is 16 x 64 = 1024
HUGE = 10 * 1024  # characters of echoed input: past gRPC's 8 KiB metadata soft limit




@pytest.fixture(scope="module")
def sec(start_server, demo, tmp_path_factory):
    """(server, {tenant: Client}): alpha owns `a-priv` (versions 1 and 2, alias prod -> 2)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_key_file(key_file, ROLES)
    server = start_server(key_file=key_file, engine={"default_max_new_tokens": 4},
                          limits={"max_prompt_tokens": MAX_PROMPT_TOKENS})
    # float32 matmuls, before the first forward, for the comparison with plain PEFT (see its docstring).
    disable_cpu_bf16_repack(server.runtime.engine.base.model)
    clients = {t: Client(f"127.0.0.1:{server.port}", api_key=k, timeout=60) for t, k in keys.items()}
    root = tmp_path_factory.mktemp("priv")
    alpha = clients["alpha"]
    alpha.upload("a-priv", demo.adapters["poet"])
    alpha.upload("a-priv", make_variant(demo.adapters["poet"], root / "v2", scale=0.5))
    alpha.set_alias("a-priv", "prod", 2)
    yield server, clients
    for c in clients.values():
        c.close()


# ------------------------------------------------------------ 1. cross-tenant leak
def test_another_tenants_adapter_is_denied_before_its_versions_or_aliases_are_revealed(sec):
    _, clients = sec
    bravo = clients["bravo"]
    for ref in ("a-priv@99", "a-priv@nosuch", "a-priv@1", "a-priv@prod", "a-priv@latest", "a-priv"):
        for rpc, fn in {
            "Generate": lambda: bravo.generate("hello", adapter=ref, max_new_tokens=2),
            "GenerateStream": lambda: bravo.stream("hello", adapter=ref, max_new_tokens=2),
            "GetAdapter": lambda: bravo.get_adapter(ref),
            "LoadAdapter": lambda: bravo.load(ref),
            "UnloadAdapter": lambda: bravo.unload(ref),
        }.items():
            code, details = status_of(fn)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (ref, rpc, code, details)
            for secret in ("versions", "aliases", "prod", "alpha"):
                assert secret not in details, (ref, rpc, details)
    # The owner still gets the precise NOT_FOUND, and an unknown name is NOT_FOUND for all.
    code, details = status_of(clients["alpha"].get_adapter, "a-priv@99")
    assert code == grpc.StatusCode.NOT_FOUND and "versions: 1, 2" in details, details
    assert status_of(bravo.get_adapter, "nobody@3")[0] == grpc.StatusCode.NOT_FOUND


# --------------------------------------------------------------- 2. busy ports
def test_a_second_server_on_a_busy_port_fails_naming_the_port(start_server, tmp_path):
    from qlora_serve.server.cli import build_parser

    first = start_server(load=False)
    with pytest.raises(OSError) as err:
        start_server(load=False, port=first.port)
    assert str(first.port) in str(err.value) and "--port" in str(err.value), err.value
    with pytest.raises(OSError) as err:
        start_server(load=False, metrics_port=first.metrics_port)
    message = str(err.value)
    assert str(first.metrics_port) in message and "--metrics-port" in message and "--no-metrics" in message
    # The CLI: exit 2 with that one line, before loading anything.
    args = build_parser().parse_args(["serve", "--port", str(first.port), "--metrics-port", "0",
                                      "--data-dir", str(tmp_path / "data")])
    assert args.func(args) == 2


# ------------------------------------------------------------- 3. overflow
def _fill(value: float):
    return lambda state: {k: torch.full_like(v, value) for k, v in state.items()}


def _scale(a: float, b: float):
    return lambda state: {k: v * (a if "lora_A" in k else b) for k, v in state.items()}


@pytest.fixture(scope="module")
def overflowing(demo, tmp_path_factory):
    """Adapters whose scaled delta overflows float32 and bfloat16."""
    root, poet = tmp_path_factory.mktemp("overflow"), demo.adapters["poet"]
    return {
        "alpha-1e38": make_variant(poet, root / "alpha", config={"lora_alpha": 1e38}),
        "weights-1e30": make_variant(poet, root / "w30", tensors=_fill(1e30)),
        # A and B each small enough for bfloat16; only their product overflows.
        "product": make_variant(poet, root / "prod", tensors=_scale(1e16, 1e16)),
    }


def test_adapters_whose_scaled_delta_overflows_are_refused_at_registration(sec, overflowing):
    server, clients = sec
    ops = clients["ops"]
    for name, path in overflowing.items():
        code, details = status_of(ops.upload, name, path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert "module 'model.layers." in details and "lora_alpha/r x lora_B x lora_A" in details, details
        assert not ops.list_adapters(name)
    # On load too (a record written before this check): the engine's read refuses it.
    from qlora_serve.server.engine.request import AdapterHandle

    with pytest.raises(InvalidArgument, match="lora_B x lora_A"):
        server.runtime.engine.read_adapter(AdapterHandle("old", 1, "k", str(overflowing["product"])))
    assert ops.generate("hello", adapter="poet", max_new_tokens=2).completion_tokens == 2


def test_an_overflowing_adapter_given_at_startup_is_refused(start_server, overflowing):
    server = start_server(adapters=[("huge", str(overflowing["alpha-1e38"]))], load=False)
    with pytest.raises(InvalidArgument, match="module 'model.layers.*lora_B x lora_A"):
        server.load()


# ----------------------------------------------------- 4. config vs tensors
def _int32(state):
    return {k: (v * 100).to(torch.int32) for k, v in state.items()}


def test_configs_that_contradict_their_tensors_are_refused_naming_the_field(sec, demo, tmp_path):
    _, clients = sec
    poet = demo.adapters["poet"]  # rank 4, q/k/v/o_proj
    cases = {
        "r-huge": (make_variant(poet, tmp_path / "r9", config={"r": 1_000_000_000}), "'r'"),
        "r-8": (make_variant(poet, tmp_path / "r8", config={"r": 8}), "'r' says 8"),
        "rank-pattern": (make_variant(poet, tmp_path / "rp", config={"rank_pattern": {"q_proj": 2}}), "rank_pattern"),
        "targets-absent": (make_variant(poet, tmp_path / "ta", config={"target_modules": ["nosuch_proj"]}),
                           "'target_modules'"),
        "targets-missing-one": (make_variant(poet, tmp_path / "tm", config={"target_modules": ["q_proj", "v_proj"]}),
                                "'target_modules'"),
        "int32": (make_variant(poet, tmp_path / "i32", tensors=_int32), "int32"),
        "alora": (make_variant(poet, tmp_path / "alora", config={"alora_invocation_tokens": [5, 6]}),
                  "alora_invocation_tokens"),
    }
    for case, (path, needle) in cases.items():
        code, details = status_of(clients["ops"].upload, f"bad-{case}", path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (case, code, details)
        assert needle in details, (case, details)


def test_negative_lora_alpha_is_accepted_and_served_as_peft_serves_it(sec, demo, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    _, clients = sec
    path = make_variant(demo.adapters["poet"], tmp_path / "neg", config={"lora_alpha": -8}, scale=4.0)
    info = clients["ops"].upload("negative", path)
    assert info.alpha == -8
    got = clients["ops"].generate("hello world", adapter="negative", max_new_tokens=8).token_ids

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(demo.base, quantization_config=quant, device_map="cpu",
                                                dtype=torch.float32)
    disable_cpu_bf16_repack(base)
    model = PeftModel.from_pretrained(base, str(path)).eval()
    tok = AutoTokenizer.from_pretrained(demo.base)
    ids = tok("hello world", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                             pad_token_id=tok.pad_token_id)
    assert list(got) == out[0, ids.shape[1]:].tolist()[:len(got)]


# ------------------------------------------------------------- 5. huge prompts
def test_prompt_bytes_are_bounded_before_tokenizing(sec):
    server, clients = sec
    for stream in (False, True):
        call = clients["alpha"].stream if stream else clients["alpha"].generate
        code, details = status_of(call, "ab " * 400, max_new_tokens=2)  # 1200 bytes
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "1200 bytes" in details, details
        assert "--max-prompt-bytes" in details, details
    assert clients["alpha"].generate("ab " * 10, max_new_tokens=2).completion_tokens == 2
    # The default is derived from --max-prompt-tokens; the flag sets it.
    from qlora_serve.server.cli import build_parser
    from qlora_serve.server.requests import PROMPT_BYTES_PER_TOKEN, RequestLimits

    assert server.runtime.limits.max_prompt_bytes == PROMPT_BYTES_PER_TOKEN * MAX_PROMPT_TOKENS
    assert RequestLimits(max_prompt_bytes=5).max_prompt_bytes == 5
    assert build_parser().parse_args(["serve", "--max-prompt-bytes", "4096"]).max_prompt_bytes == 4096


class HeldTokenizer:
    """Wraps the server's real tokenizer: each call waits for `release()` first, as a
    large prompt's tokenization takes time, so the client can leave meanwhile."""

    def __init__(self, base) -> None:
        self.base, self.real = base, base.tokenizer
        self.entered, self._go = threading.Event(), threading.Event()
        base.tokenizer = self

    def __call__(self, *args, **kw):
        # The handler's gRPC context, found up the stack: the test waits until the server
        # itself has seen the cancel (it crosses the network) before releasing the call.
        frame = sys._getframe(1)
        while frame is not None and not hasattr(frame.f_locals.get("context"), "is_active"):
            frame = frame.f_back
        self.context = frame.f_locals["context"] if frame is not None else None
        self.entered.set()
        assert self._go.wait(60), "HeldTokenizer was never released"
        return self.real(*args, **kw)

    def __getattr__(self, name):
        return getattr(self.real, name)

    def restore(self) -> None:
        self._go.set()
        self.base.tokenizer = self.real


def test_a_client_gone_while_its_prompt_was_tokenized_queues_nothing(sec, engine_gate):
    server, clients = sec
    gate = engine_gate(server)  # counts forward passes
    held = HeldTokenizer(server.runtime.engine.base)
    cancelled = lambda: server.metrics.registry.get_sample_value(  # noqa: E731
        "qlora_requests_total", {"method": "Generate", "adapter": "", "tenant": "alpha", "code": "CANCELLED"}) or 0
    before, forwards = cancelled(), gate.forwards
    try:
        future = clients["alpha"].inference.Generate.future(clients["alpha"].request("hello", max_new_tokens=4),
                                                            metadata=clients["alpha"]._metadata, timeout=60)
        assert held.entered.wait(30)
        future.cancel()
        wait_until(lambda: future.done(), what="the client call ended")
        wait_until(lambda: not held.context.is_active(), what="the server saw the cancel")
    finally:
        held.restore()
    wait_until(lambda: cancelled() == before + 1, what="the handler finished as CANCELLED")
    assert gate.forwards == forwards, "a request whose client had gone was prefilled"
    assert server.runtime.quotas.in_flight("alpha") == 0


# ---------------------------------------------------------- 6. echoed input
def test_errors_echoing_huge_input_are_short_and_keep_their_status(sec):
    _, clients = sec
    ops = clients["ops"]
    big = "x" * HUGE

    def upload_named_file():
        header = registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(name="fine"))
        chunk = registry_pb2.UploadAdapterRequest(chunk=registry_pb2.FileChunk(filename=big, data=b"{}"))
        return ops.registry.UploadAdapter(iter([header, chunk]), metadata=ops._metadata, timeout=60)

    cases = {
        "adapter name": (lambda: ops.generate("hi", adapter=big), grpc.StatusCode.INVALID_ARGUMENT),
        "adapter ref": (lambda: ops.get_adapter(f"poet@{big}"), grpc.StatusCode.INVALID_ARGUMENT),
        "alias": (lambda: ops.set_alias("poet", big, 1), grpc.StatusCode.INVALID_ARGUMENT),
        "job id": (lambda: ops.get_job(big), grpc.StatusCode.NOT_FOUND),
        "filename": (upload_named_file, grpc.StatusCode.INVALID_ARGUMENT),
        "server path": (lambda: ops.register_path("fine", "/a/../" + big), grpc.StatusCode.PERMISSION_DENIED),
        "jsonl key": (lambda: ops.submit_job("fine", json.dumps({big: 1}).encode() + b"\n"),
                      grpc.StatusCode.INVALID_ARGUMENT),
    }
    for what, (fn, expected) in cases.items():
        code, details = status_of(fn)
        assert code == expected, (what, code, details[:300])
        assert len(details) < 1000 and "more characters" in details, (what, len(details), details[:300])


def test_errors_echoing_a_huge_owner_or_label_are_short(sec, demo):
    _, clients = sec
    for kw in ({"owner": "o" * HUGE}, {"labels": {"k" * HUGE: "v"}}):
        code, details = status_of(clients["ops"].upload, "fine", demo.adapters["poet"], **kw)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (kw.keys(), code, details[:300])
        assert len(details) < 1000, len(details)


# ---------------------------------------------------------- 7. metrics address
def test_metrics_bind_to_localhost_unless_an_address_is_given(start_server):
    from qlora_serve.server.cli import build_parser

    server = start_server(load=False, host="0.0.0.0")
    assert server._metrics_http.server_address[0] == "127.0.0.1"
    opened = start_server(load=False, metrics_address="0.0.0.0")
    assert opened._metrics_http.server_address[0] == "0.0.0.0"
    assert build_parser().parse_args(["serve"]).metrics_address == "127.0.0.1"
