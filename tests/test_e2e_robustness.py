"""Engine robustness through a REAL gRPC server on loopback (no mocks; faults are
real: adapter files with extreme weights, forward hooks on the in-process
server's model, a loader that is held mid-read).

Each test pins one failure mode found in review: a fault that belongs to one
request must end only that request (with a status naming it), never the rows
beside it, never the engine loop; adapter loads never stall the engine thread.
"""

from __future__ import annotations

import shutil
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import wait_until
from qlora_serve.server.client import Client
from qlora_serve.v1 import common_pb2, registry_pb2

LONG_PROMPT = "hello world"  # greedy with pirate: no EOS within hundreds of tokens (see test_e2e_batching)


def _loads(server, result: str = "ok") -> float:
    return server.metrics.registry.get_sample_value("qlora_adapter_loads_total", {"result": result}) or 0.0


def _idle(server) -> None:
    engine = server.runtime.engine
    wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["queued"] == 0, what="engine idle")


class Slow:
    """A forward-pre-hook that makes every forward pass take at least `seconds`, so a
    long row is still running while a test lines up other requests."""

    def __init__(self, model, seconds: float = 0.01) -> None:
        self._handle = model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))

    def remove(self) -> None:
        self._handle.remove()


class HeldReader:
    """Wraps the server's real adapter reader: the read runs, then waits for `release()`
    before handing its result back (as a slow disk would). Counts the reads."""

    def __init__(self, engine) -> None:
        self.engine, self.real = engine, engine.adapter_reader
        self.reads = 0
        self.entered = threading.Event()
        self._go = threading.Event()
        engine.adapter_reader = self._load

    def _load(self, handle):
        adapter = self.real(handle)
        self.reads += 1
        self.entered.set()
        if not self._go.wait(60):
            raise RuntimeError("HeldReader was never released")
        return adapter

    def release(self) -> None:
        self._go.set()

    def restore(self) -> None:
        self.release()
        self.engine.adapter_reader = self.real


def _in_thread(fn):
    """Run fn() in a thread; returns a dict that gets 'value' or 'error', and the thread."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return out, t


# ------------------------------------------------- 1. weights that overflow the compute dtype
@pytest.fixture(scope="module")
def huge_adapter(demo, tmp_path_factory):
    """pirate with one weight of 3.4e38: finite in fp32, inf in bfloat16; lora_A scaled
    by 1e-30 so the scaled delta (scaling x B x A) stays small: only the dtype overflows."""
    out = tmp_path_factory.mktemp("huge") / "huge"
    shutil.copytree(demo.adapters["pirate"], out)
    path = out / "adapter_model.safetensors"
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = 3.4e38
    tensors = {k: v * 1e-30 if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, str(path))
    return out


@pytest.fixture(scope="module")
def bf16_server(start_server):
    return start_server(compute_dtype="bfloat16")


def test_adapter_overflowing_the_compute_dtype_is_invalid_argument_and_costs_no_other_row(
        bf16_server, huge_adapter):
    server = bf16_server
    with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
        running = client.stream(LONG_PROMPT, adapter="pirate", max_new_tokens=60)
        assert next(running).token_ids
        with pytest.raises(grpc.RpcError) as e:
            client.upload("huge", huge_adapter)  # refused at registration, where the registry knows the dtype
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert "bfloat16" in e.value.details() and "--compute-dtype float32" in e.value.details()
        assert not client.list_adapters("huge")
        chunks = list(running)  # the row beside it is untouched
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert client.generate("hello", adapter="poet", max_new_tokens=3).completion_tokens == 3


def test_adapter_the_slot_refuses_at_install_fails_only_its_request(bf16_server, huge_adapter, demo, tmp_path):
    """Defence in depth: a loader that lets such weights through (as the old one did)
    must cost only that request at admission, not loop the engine. The registry
    refuses the weights, so a benign copy is registered and the loader reads the bad files."""
    from adapter_files import make_variant
    from qlora_serve.adapters.peft_format import check_fits_base, load_lora_adapter

    server = bf16_server
    engine = server.runtime.engine
    real = engine.adapter_reader

    def permissive(handle):  # no dtype check
        adapter = load_lora_adapter(huge_adapter if handle.name == "huge2" else handle.path)
        check_fits_base(adapter, engine.lora.linear_shapes)
        return adapter

    engine.adapter_reader = permissive
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=30) as client:
            client.upload("huge2", make_variant(demo.adapters["pirate"], tmp_path / "huge2", scale=0.5))
            running = client.stream(LONG_PROMPT, adapter="poet", max_new_tokens=60)
            assert next(running).token_ids
            with pytest.raises(grpc.RpcError) as e:
                client.generate("hello", adapter="huge2", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert list(running)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert client.generate("hello", max_new_tokens=3).completion_tokens == 3
    finally:
        engine.adapter_reader = real
    _idle(server)


# The tests below share conftest's module-scoped `server` / `client` (demo + extra adapters).

# ------------------------------------------------------------ 2. sampling faults
def test_tiny_positive_temperature_is_greedy(server, client):
    greedy = client.generate("The quick brown fox", adapter="pirate", max_new_tokens=8)
    tiny = client.generate("The quick brown fox", adapter="pirate", max_new_tokens=8, temperature=1.4e-45)
    assert list(tiny.token_ids) == list(greedy.token_ids)


class NanLogits:
    """A forward hook on the output head that turns one step's logits into NaN."""

    def __init__(self, head) -> None:
        self.armed, self.fired = threading.Event(), threading.Event()
        self._handle = head.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.armed.is_set() and not self.fired.is_set():
            self.fired.set()
            return torch.full_like(output, float("nan"))
        return None

    def remove(self) -> None:
        self._handle.remove()


def test_sampling_failure_fails_only_that_row(server, client, engine_gate):
    engine = server.runtime.engine
    gate = engine_gate(server)
    nan = NanLogits(engine.base.model.get_output_embeddings())
    try:
        sampled = client.stream(LONG_PROMPT, adapter="pirate", max_new_tokens=40, temperature=1.0, seed=1,
                                 request_id="sampled-row")
        greedy = client.stream(LONG_PROMPT, max_new_tokens=40, request_id="greedy-row")
        assert next(sampled).token_ids and next(greedy).token_ids
        gate.close()
        gate.wait_parked()  # both rows are in the next decode
        nan.armed.set()
        gate.release()
        with pytest.raises(grpc.RpcError) as e:
            list(sampled)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "sampled-row" in e.value.details() and "keeps serving" in e.value.details()
        chunks = list(greedy)  # NaN logits still have an argmax: the greedy row goes on
        assert chunks[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        assert nan.fired.is_set()
    finally:
        nan.remove()
    _idle(server)


# ------------------------------------------------------------- 3. prefill faults
class FailPrefill:
    """A forward-pre-hook that raises on the next prefill (a forward over more than
    one position) after `arm()`; decode steps pass."""

    def __init__(self, model) -> None:
        self.armed, self.fired = threading.Event(), threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids")
        if self.armed.is_set() and not self.fired.is_set() and ids is not None and ids.shape[1] > 1:
            self.fired.set()
            raise RuntimeError("injected fault: simulated device error in a prefill")

    def remove(self) -> None:
        self._handle.remove()


def test_prefill_fault_answers_the_new_rows_releases_their_pins_and_spares_running_rows(server, client):
    engine = server.runtime.engine
    slow = Slow(engine.base.model)
    fault = FailPrefill(engine.base.model)
    try:
        running = client.stream(LONG_PROMPT, max_new_tokens=80, request_id="already-running")
        assert next(running).token_ids
        fault.armed.set()
        with Client(f"127.0.0.1:{server.port}", timeout=20) as short:
            with pytest.raises(grpc.RpcError) as e:
                short.generate("The quick brown fox", adapter="extra-r8", max_new_tokens=3, request_id="new-row")
        assert e.value.code() == grpc.StatusCode.INTERNAL, e.value.details()
        assert "new-row" in e.value.details()
        assert fault.fired.is_set()
        assert list(running)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    finally:
        fault.remove()
        slow.remove()
    _idle(server)
    digest = server.runtime.registry.get("extra-r8").digest
    assert engine.residency.pins(digest) == 0  # the failed row's pin was released
    client.unload("extra-r8")  # idle: leaves the device now
    assert client.get_adapter("extra-r8").residency != registry_pb2.RESIDENCY_DEVICE
    assert client.generate("hello", adapter="extra-r8", max_new_tokens=3).completion_tokens == 3


# ------------------------------------------ 4. adapters that do not fit the host cache
def test_adapter_larger_than_the_host_cache_is_served_after_one_read(start_server):
    server = start_server(engine={"host_cache_bytes": 0})
    with Client(f"127.0.0.1:{server.port}", timeout=20) as client:
        assert client.generate("hello", adapter="pirate", max_new_tokens=3).completion_tokens == 3
        assert client.generate("hello", adapter="pirate", max_new_tokens=3).completion_tokens == 3
    assert _loads(server) == 1


# ---------------------------------------- 5. a request waiting for a slot blocks nobody
def test_request_waiting_for_a_pinned_slot_does_not_block_requests_behind_it(start_server):
    server = start_server(engine={"max_resident_adapters": 1})
    engine = server.runtime.engine
    slow = Slow(engine.base.model)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=60) as client:
            long_stream = client.stream(LONG_PROMPT, adapter="pirate", max_new_tokens=400)
            assert next(long_stream).token_ids  # pirate pins the only slot
            long_done = threading.Event()
            long_out, _ = _in_thread(lambda: (list(long_stream), long_done.set()))
            reads = _loads(server)
            poet_out, poet_thread = _in_thread(lambda: client.generate("hi", adapter="poet", max_new_tokens=3))
            wait_until(lambda: _loads(server) == reads + 1, what="poet read and queued behind the pinned slot")
            base = client.generate("hello", max_new_tokens=3)
            resident = client.generate("hello", adapter="pirate", max_new_tokens=3)
            assert base.completion_tokens == 3 and resident.completion_tokens == 3
            assert not long_done.is_set(), "the base and pirate requests had to wait for the long row"
            assert "value" not in poet_out  # poet still waits for the slot
            poet_thread.join(60)
            assert poet_out["value"].completion_tokens == 3
            assert long_done.is_set() and "error" not in long_out
    finally:
        slow.remove()


# ---------------------------------------------- 6. LoadAdapter off the engine thread
def test_load_adapter_reads_off_the_engine_thread_and_shares_an_in_flight_read(server, client):
    engine = server.runtime.engine
    held = HeldReader(engine)
    reads = _loads(server)
    try:
        load_out, load_thread = _in_thread(lambda: client.load("extra-r16"))
        assert held.entered.wait(30)
        gen_out, gen_thread = _in_thread(lambda: client.generate("hello", adapter="extra-r16", max_new_tokens=3))
        # The read is held: streams and base requests go on meanwhile.
        with Client(f"127.0.0.1:{server.port}", timeout=15) as quick:
            assert quick.generate("hello", max_new_tokens=3).completion_tokens == 3
            assert quick.generate("hello", adapter="pirate", max_new_tokens=3).completion_tokens == 3
        held.release()
        load_thread.join(30)
        gen_thread.join(30)
        assert load_out["value"].residency == registry_pb2.RESIDENCY_DEVICE, load_out
        assert gen_out["value"].completion_tokens == 3, gen_out
        assert held.reads == 1 and _loads(server) == reads + 1  # one read served both
    finally:
        held.restore()


def test_load_adapter_cancels_a_pending_unload(server, client):
    engine = server.runtime.engine
    slow = Slow(engine.base.model)
    try:
        stream = client.stream(LONG_PROMPT, adapter="pirate", max_new_tokens=80)
        assert next(stream).token_ids
        client.unload("pirate")  # pinned: leaves when the row ends...
        assert client.get_adapter("pirate").residency == registry_pb2.RESIDENCY_DEVICE
        client.load("pirate")  # ...unless loaded again meanwhile
        assert list(stream)[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    finally:
        slow.remove()
    _idle(server)
    assert client.get_adapter("pirate").residency == registry_pb2.RESIDENCY_DEVICE


# ------------------------------------------- 7. registry calls and a busy or stopped engine
def test_delete_returns_while_the_engine_is_busy(server, client, engine_gate, extra_adapters):
    gate = engine_gate(server)
    client.upload("doomed", extra_adapters["extra-r4"])
    stream = client.stream(LONG_PROMPT, max_new_tokens=40)
    assert next(stream).token_ids
    gate.close()
    gate.wait_parked()  # the engine is inside a step
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=5) as quick:
            deleted = quick.delete("doomed")
        assert [d.name for d in deleted] == ["doomed"]
    finally:
        gate.release()
    list(stream)
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hello", adapter="doomed", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_load_adapter_on_a_stopped_engine_is_unavailable(start_server):
    server = start_server()
    server.runtime.engine.shutdown(0)
    with Client(f"127.0.0.1:{server.port}", timeout=10) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.load("pirate")
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()


# --------------------------------------------------- 8. a cancelled read in the inbox
def test_cancelled_adapter_read_fails_its_requests_and_the_engine_keeps_serving(start_server):
    server = start_server()
    engine = server.runtime.engine
    held = HeldReader(engine)
    try:
        with Client(f"127.0.0.1:{server.port}", timeout=20) as client:
            first_out, first = _in_thread(lambda: client.generate("hi", adapter="pirate", max_new_tokens=2))
            assert held.entered.wait(30)  # pirate's read holds the reader thread
            second_out, second = _in_thread(lambda: client.generate("hi", adapter="poet", max_new_tokens=2))
            misses = lambda: server.metrics.registry.get_sample_value(  # noqa: E731
                "qlora_adapter_host_cache_total", {"result": "miss"}) or 0.0
            wait_until(lambda: misses() == 2, what="poet's read queued behind pirate's")
            engine.adapters.shutdown()  # the reader pool cancels poet's read, as at shutdown
            second.join(20)
            assert second_out["error"].code() == grpc.StatusCode.UNAVAILABLE, second_out
            held.release()
            first.join(20)
            assert first_out["value"].completion_tokens == 2, first_out
            assert client.generate("hello", max_new_tokens=3).completion_tokens == 3  # the loop is alive
    finally:
        held.restore()


# ------------------------------------------ 9. a read in flight when its adapter is deleted
def test_adapter_deleted_during_its_read_is_not_found_and_not_cached(server, client, demo, tmp_path):
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    engine = server.runtime.engine
    files = build_random_adapter(demo.base, tmp_path / "ephemeral", DemoAdapterSpec(name="ephemeral", r=4, alpha=8, seed=4242))
    digest = client.upload("ephemeral", files).digest  # files no other version shares
    held = HeldReader(engine)
    try:
        out, t = _in_thread(lambda: client.generate("hello", adapter="ephemeral", max_new_tokens=2))
        assert held.entered.wait(30)  # its files were read; the result is not handed back yet
        client.delete("ephemeral")
        held.release()
        t.join(30)
        assert out["error"].code() == grpc.StatusCode.NOT_FOUND, out
        assert "ephemeral" in out["error"].details()
    finally:
        held.restore()
    _idle(server)
    assert not engine.residency.in_host(digest) and engine.residency.slot_of(digest) is None  # not re-cached
