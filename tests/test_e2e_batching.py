"""Continuous batching through a REAL gRPC server (issue 5): requests join a running
batch, cancelled / expired rows leave it, the waiting queue is bounded, and every
row keeps its own sampling parameters and stop strings.

Ordering is made deterministic with `EngineGate` (conftest.py): it parks the engine
thread at the start of a forward pass so a test can line requests up, and counts
forward passes, which tells "the row was freed" apart from "it ran to the end".
"""

from __future__ import annotations

import logging
import re
import threading
import time
import urllib.request

import grpc
import pytest

from conftest import run_in_one_step, wait_until
from qlora_serve.server.client import Client
from qlora_serve.v1 import common_pb2

LONG = 400  # the long request's max_new_tokens: hundreds of decode steps
LONG_PROMPT, LONG_ADAPTER = "hello world", "pirate"  # greedy: no EOS within LONG tokens (asserted)


def tokens_of(chunks) -> list[int]:
    return [t for ch in chunks for t in ch.token_ids]


def _metric(server, name: str, **labels) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def single_row(start_server):
    """max_running=1, max_waiting=1: the next request can only run once a row is freed."""
    return start_server(engine={"max_running": 1, "max_waiting": 1})


@pytest.fixture(scope="module")
def single_client(single_row):
    with Client(f"127.0.0.1:{single_row.port}", timeout=60) as c:
        yield c


@pytest.fixture(autouse=True)
def _single_row_idle(request):
    """Tests on the single-row server start with it idle (no row left from a previous test)."""
    yield
    if "single_row" in request.fixturenames:
        engine = request.getfixturevalue("single_row").runtime.engine
        wait_until(lambda: engine.stats()["running"] == 0 and engine.stats()["queued"] == 0, what="engine idle")


# ------------------------------------------------------------------ join
def test_request_arriving_mid_generation_gets_first_token_before_long_one_finishes(server, client, engine_gate):
    gate = engine_gate(server)
    engine = server.runtime.engine
    log: list[str] = []
    lock = threading.Lock()
    long_final: list = []

    def note(what):
        with lock:
            log.append(what)

    long_stream = client.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG)
    first = next(long_stream)
    assert first.token_ids
    gate.close()  # hold the long row at its next decode while the short one queues
    gate.wait_parked()

    def drain_long():
        for ch in long_stream:
            if ch.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                long_final.append(ch)
        note("long finished")

    def short():
        for i, ch in enumerate(client.stream("one two three", adapter="poet", max_new_tokens=4)):
            if i == 0:
                note("short first token")
        note("short finished")

    threads = [threading.Thread(target=drain_long), threading.Thread(target=short)]
    for t in threads:
        t.start()
    wait_until(lambda: engine.stats()["queued"] == 1, what="short request queued")
    gate.release()
    for t in threads:
        t.join(60)
    assert long_final and long_final[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert long_final[0].completion_tokens == LONG
    # The short one joined the running batch and also left it before the long one ended.
    assert log == ["short first token", "short finished", "long finished"], log
    assert 2 in gate.batch_sizes  # decoded together


# ---------------------------------------------------------- cancel / deadline
def test_client_cancel_frees_the_row(single_row, single_client, engine_gate):
    gate = engine_gate(single_row)
    cancelled_before = _metric(single_row, "qlora_requests_total", method="GenerateStream", code="CANCELLED")
    stream = single_client.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG)
    assert next(stream).token_ids
    gate.close()
    gate.wait_parked()
    stream.cancel()  # the client goes away mid-generation
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    # The server noticed (counted as CANCELLED) while the engine was still parked.
    wait_until(lambda: _metric(single_row, "qlora_requests_total", method="GenerateStream", code="CANCELLED")
               == cancelled_before + 1, what="server-side CANCELLED")
    nxt = single_client.inference.Generate.future(single_client.request("hello", adapter="poet", max_new_tokens=8))
    wait_until(lambda: single_row.runtime.engine.stats()["queued"] == 1, what="next request queued")
    forwards = gate.forwards
    gate.release()
    resp = nxt.result(60)
    assert resp.completion_tokens >= 1
    # With one row, the next request ran only after the cancelled row left: the
    # parked decode + the next request's passes, not the ~LONG steps left.
    assert gate.forwards - forwards <= 1 + 8 + 2, gate.batch_sizes


def test_client_deadline_yields_deadline_exceeded_and_frees_the_row(single_row, single_client, engine_gate):
    gate = engine_gate(single_row)
    call = single_client.inference.GenerateStream(
        single_client.request(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG), timeout=1.0)
    assert next(call).token_ids
    gate.close()  # the engine cannot finish before the deadline: it is parked
    gate.wait_parked()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    nxt = single_client.inference.Generate.future(single_client.request("hello", adapter="poet", max_new_tokens=8))
    wait_until(lambda: single_row.runtime.engine.stats()["queued"] == 1, what="next request queued")
    forwards = gate.forwards
    gate.release()
    assert nxt.result(60).completion_tokens >= 1
    assert gate.forwards - forwards <= 1 + 8 + 2, gate.batch_sizes


class AccessLog(logging.Handler):
    """The in-process server's access-log records (logger qlora_serve.requests), by request id."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, logging.LogRecord] = {}
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records[getattr(record, "request_id", "")] = record
            self._cond.notify_all()

    def wait(self, request_id: str, timeout: float = 60) -> logging.LogRecord:
        """The line of that call, once the server has written it (it is the call's last act)."""
        with self._cond:
            assert self._cond.wait_for(lambda: request_id in self.records, timeout), f"no log line for {request_id}"
            return self.records[request_id]


@pytest.fixture
def access_log():
    logger = logging.getLogger("qlora_serve.requests")
    handler, level = AccessLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_tokens_streamed_before_a_cancel_are_counted_once_for_metrics_log_and_quota(
        single_row, single_client, engine_gate, access_log):
    """A stream the client cancels generated tokens: qlora_generated_tokens_total and the
    log line's completion_tokens count them, the same number the quota charged."""
    gate = engine_gate(single_row)
    before = {m: _metric(single_row, m, adapter=LONG_ADAPTER) for m in ("qlora_generated_tokens_total",
                                                                        "qlora_prompt_tokens_total")}
    stream = single_client.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG, request_id="cancel-count")
    received = sum(len(next(stream).token_ids) for _ in range(3))
    gate.close()
    gate.wait_parked()  # no more tokens until the cancel is seen
    stream.cancel()
    line = access_log.wait("cancel-count")
    gate.release()
    generated = _metric(single_row, "qlora_generated_tokens_total", adapter=LONG_ADAPTER) - before[
        "qlora_generated_tokens_total"]
    prompt = _metric(single_row, "qlora_prompt_tokens_total", adapter=LONG_ADAPTER) - before["qlora_prompt_tokens_total"]
    assert line.code == "CANCELLED"
    assert line.completion_tokens >= received >= 3, (line.completion_tokens, received)
    assert generated == line.completion_tokens and prompt == line.prompt_tokens > 0


def test_a_passed_client_deadline_is_reported_as_deadline_exceeded(single_row, single_client, engine_gate,
                                                                   access_log):
    """Whoever notices first (the waiting handler, the engine, gRPC dropping the stream), a
    call whose client deadline passed is DEADLINE_EXCEEDED in the log and the metrics,
    never CANCELLED: here a running stream and a queued unary call, the engine parked."""
    gate = engine_gate(single_row)

    def count(method, code):
        return _metric(single_row, "qlora_requests_total", method=method, code=code)

    before = {(m, c): count(m, c) for m in ("Generate", "GenerateStream") for c in ("CANCELLED", "DEADLINE_EXCEEDED")}
    stream = single_client.inference.GenerateStream(single_client.request(
        LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG, request_id="dl-stream"), timeout=2.0)
    assert next(stream).token_ids
    gate.close()
    gate.wait_parked()
    unary = single_client.inference.Generate.future(
        single_client.request("hello", max_new_tokens=4, request_id="dl-unary"), timeout=1.0)
    for call in (unary.result, lambda: list(stream)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    lines = [access_log.wait("dl-unary"), access_log.wait("dl-stream")]
    gate.release()
    assert [r.code for r in lines] == ["DEADLINE_EXCEEDED"] * 2
    for m in ("Generate", "GenerateStream"):
        assert count(m, "CANCELLED") == before[(m, "CANCELLED")]
        assert count(m, "DEADLINE_EXCEEDED") == before[(m, "DEADLINE_EXCEEDED")] + 1


def test_server_request_timeout_yields_deadline_exceeded(start_server, engine_gate):
    """The server's own deadline (--request-timeout-s), no client deadline: the engine
    expires the row and the client gets DEADLINE_EXCEEDED from the server."""
    server = start_server(engine={"max_running": 1}, limits={"request_timeout_s": 0.5})
    gate = engine_gate(server)
    with Client(f"127.0.0.1:{server.port}") as c:
        stream = c.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG)
        assert next(stream).token_ids
        gate.close()
        gate.wait_parked()
        started = time.monotonic()
        wait_until(lambda: time.monotonic() > started + 0.6, what="the server deadline to pass")
        gate.release()
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in err.value.details()
        assert gate.forwards < 50  # expired at the next step, not run to the end


# ----------------------------------------------------------------- queue
def test_full_waiting_queue_answers_resource_exhausted_at_once(single_row, single_client, engine_gate):
    gate = engine_gate(single_row)
    engine = single_row.runtime.engine
    running = single_client.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG)
    assert next(running).token_ids
    gate.close()
    gate.wait_parked()
    waiting = single_client.inference.Generate.future(single_client.request("hello", max_new_tokens=4))
    wait_until(lambda: engine.stats()["queued"] == 1, what="one request waiting")
    for call in (lambda: single_client.generate("hi", max_new_tokens=4),
                 lambda: list(single_client.stream("hi", max_new_tokens=4))):
        with pytest.raises(grpc.RpcError) as err:
            call()  # answered while the engine is parked: no waiting involved
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "waiting queue is full (1 requests" in err.value.details()
        assert "--max-waiting" in err.value.details()
    running.cancel()
    gate.release()
    assert waiting.result(60).completion_tokens == 4  # the queued one still runs
    assert single_client.generate("hi", max_new_tokens=4).completion_tokens == 4  # and the queue has room again


def test_a_burst_of_max_running_plus_max_waiting_on_an_idle_server_is_all_accepted(start_server):
    """An idle server has max_running free rows and max_waiting queue places: a burst of
    exactly that many is accepted in full, the next one is refused. The engine thread is
    held in a command (Engine.call) while the burst arrives, so every request of it is
    submitted before any is admitted: the burst is exactly at the bound, whatever the timing."""
    running, waiting = 2, 3
    server = start_server(engine={"max_running": running, "max_waiting": waiting})
    engine, hold = server.runtime.engine, threading.Event()
    held = engine.call(hold.wait)
    outcomes: list = []
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        def one():
            try:
                outcomes.append(c.generate("hello", max_new_tokens=2).completion_tokens)
            except grpc.RpcError as exc:
                outcomes.append(exc.code())
        try:
            threads = [threading.Thread(target=one) for _ in range(running + waiting)]
            for t in threads:
                t.start()
            wait_until(lambda: engine.stats()["queued"] + len(outcomes) == running + waiting, what="the burst submitted")
            assert outcomes == [], f"refused from a burst of max_running + max_waiting: {outcomes}"
            with pytest.raises(grpc.RpcError) as err:  # one more is beyond the bound
                c.generate("hello", max_new_tokens=2)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-waiting" in err.value.details()
        finally:
            hold.set()
        held.result(30)
        for t in threads:
            t.join(60)
        assert outcomes == [2] * (running + waiting)
        assert engine.stats()["queued"] == 0
        assert c.generate("hello", max_new_tokens=2).completion_tokens == 2  # nothing leaked


# -------------------------------------------------------- per-row sampling


def test_per_row_sampling_parameters_are_honoured_within_one_batch(server, client, engine_gate):
    for name in ("pirate", "poet"):
        client.load(name)
    sampled = dict(adapter="poet", max_new_tokens=12, temperature=1.3, seed=1234)
    nucleus = dict(adapter="pirate", max_new_tokens=12, temperature=0.9, top_p=0.8, top_k=40, seed=7)
    greedy_a = dict(adapter="pirate", max_new_tokens=12)
    greedy_b = dict(adapter="poet", max_new_tokens=12)
    top1 = dict(adapter="pirate", max_new_tokens=12, temperature=2.0, top_k=1, seed=99)
    alone = {k: list(client.generate("one two three", **kw).token_ids)
             for k, kw in (("sampled", sampled), ("nucleus", nucleus), ("greedy_a", greedy_a), ("greedy_b", greedy_b))}
    # Sanity: sampling really samples (temperature > 0 leaves greedy), and the seed matters.
    assert alone["sampled"] != list(client.generate("one two three", **greedy_b).token_ids)
    assert alone["sampled"] != list(client.generate("one two three", **{**sampled, "seed": 4321}).token_ids)
    assert alone["sampled"] == list(client.generate("one two three", **sampled).token_ids)  # same seed, same tokens

    gate = engine_gate(server)
    calls = [("one two three", kw) for kw in (greedy_a, sampled, greedy_b, nucleus, top1)]
    r_greedy_a, r_sampled, r_greedy_b, r_nucleus, r_top1 = run_in_one_step(server, client, gate, calls)
    assert list(r_sampled.token_ids) == alone["sampled"]
    assert list(r_nucleus.token_ids) == alone["nucleus"]
    assert list(r_greedy_a.token_ids) == alone["greedy_a"]
    assert list(r_greedy_b.token_ids) == alone["greedy_b"]
    assert list(r_top1.token_ids) == alone["greedy_a"]  # top_k=1 is greedy whatever the temperature


def test_running_rows_are_grouped_by_adapter_slot(server, client, engine_gate):
    """Rows arriving interleaved (pirate, base, poet, ...) join a running base row and
    run sorted by LoRA segment (class, then adapter), so multi-LoRA sees each adapter's
    rows as one contiguous segment."""
    for name in ("pirate", "poet"):
        client.load(name)
    engine = server.runtime.engine
    orders: list[list[tuple]] = []  # segment keys of the running rows at each forward pass (engine thread)
    hook = engine.base.model.register_forward_pre_hook(
        lambda m, a, k: orders.append([engine.scheduler.segment_order(r) for r in engine.scheduler.running]),
        with_kwargs=True)
    try:
        gate = engine_gate(server)
        calls = [("one two", dict(adapter=a, max_new_tokens=8)) for a in ("pirate", "", "poet", "pirate", "poet", "")]
        run_in_one_step(server, client, gate, calls)
    finally:
        hook.remove()
    assert any(len(set(o)) >= 3 for o in orders), orders  # base, pirate and poet rows ran together
    assert all(o == sorted(o) for o in orders), orders


def test_per_row_max_new_tokens_in_one_batch(server, client, engine_gate):
    gate = engine_gate(server)
    lengths = [3, 9, 1, 5]
    calls = [("The quick brown fox", dict(adapter="pirate", max_new_tokens=n)) for n in lengths]
    full = list(client.generate("The quick brown fox", adapter="pirate", max_new_tokens=9).token_ids)
    assert len(full) == 9
    for n, resp in zip(lengths, run_in_one_step(server, client, gate, calls)):
        assert list(resp.token_ids) == full[:n]
        assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH


# ------------------------------------------------------------------ stop
def _pick_stop(text: str) -> tuple[str, str]:
    """A stop string from the middle of `text` (printable, first occurrence) and the text before it."""
    for i in range(2, len(text) - 2):
        stop = text[i:i + 2]
        if stop.isascii() and stop.isprintable() and not stop.isspace() and text.find(stop) == i:
            return stop, text[:i]
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("adapter", ["", "pirate"])
def test_stop_string_ends_generation_with_finish_reason_stop(server, client, adapter):
    full = client.generate(LONG_PROMPT, adapter=adapter, max_new_tokens=40)
    assert full.finish_reason == common_pb2.FINISH_REASON_LENGTH
    stop, before = _pick_stop(full.text)
    kw = dict(adapter=adapter, max_new_tokens=40, stop=[stop, "never-generated-zz"])
    resp = client.generate(LONG_PROMPT, **kw)
    assert resp.finish_reason == common_pb2.FINISH_REASON_STOP
    assert resp.text == before
    assert stop not in resp.text
    # Generation really ended there: the token that completed the stop string is the last one.
    assert list(resp.token_ids) == list(full.token_ids[:len(resp.token_ids)])
    assert len(resp.token_ids) < len(full.token_ids)
    chunks = list(client.stream(LONG_PROMPT, **kw))
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert "".join(ch.text for ch in chunks) == before
    assert tokens_of(chunks) == list(resp.token_ids)


def test_stop_strings_are_per_row_in_one_batch(server, client, engine_gate):
    full = client.generate(LONG_PROMPT, adapter="pirate", max_new_tokens=40)
    stop, before = _pick_stop(full.text)
    gate = engine_gate(server)
    with_stop, without = run_in_one_step(server, client, gate, [
        (LONG_PROMPT, dict(adapter="pirate", max_new_tokens=40, stop=[stop])),
        (LONG_PROMPT, dict(adapter="pirate", max_new_tokens=40)),
    ])
    assert with_stop.finish_reason == common_pb2.FINISH_REASON_STOP and with_stop.text == before
    assert without.finish_reason == common_pb2.FINISH_REASON_LENGTH and without.text == full.text


def test_cancel_of_one_request_spares_another_with_the_same_request_id(server, client, engine_gate):
    """request_id is client-chosen and need not be unique (retries, two clients):
    cancelling one call must not cancel another call that reuses its id."""
    gate = engine_gate(server)
    engine = server.runtime.engine
    before = _metric(server, "qlora_requests_total", method="GenerateStream", code="CANCELLED")
    first = client.stream(LONG_PROMPT, adapter=LONG_ADAPTER, max_new_tokens=LONG, request_id="dup")
    assert next(first).token_ids
    gate.close()
    gate.wait_parked()
    other = client.inference.Generate.future(client.request("hello", max_new_tokens=8, request_id="dup"))
    wait_until(lambda: engine.stats()["queued"] == 1, what="second request queued")
    first.cancel()
    wait_until(lambda: _metric(server, "qlora_requests_total", method="GenerateStream", code="CANCELLED")
               == before + 1, what="server-side CANCELLED")
    gate.release()
    resp = other.result(60)
    assert resp.request_id == "dup" and resp.completion_tokens >= 1


# --------------------------------------------------------------- KV budget
def test_kv_budget_full_queues_the_request_instead_of_over_committing(start_server, engine_gate):
    """max_kv_tokens=60 holds one request of prompt + 40 tokens but not two (2 x 42 > 60
    with the demo's 2-token prompt): the second waits for the first to leave, then
    runs; nothing fails."""
    server = start_server(engine={"max_kv_tokens": 60})
    gate = engine_gate(server)
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        alone = c.generate("hello world", adapter="poet", max_new_tokens=40)
        first = c.inference.Generate.future(c.request("hello world", adapter="pirate", max_new_tokens=40))
        second = c.inference.Generate.future(c.request("hello world", adapter="poet", max_new_tokens=40))
        a, b = first.result(60), second.result(60)
        # Beyond the budget even alone: refused at once, naming the flag.
        with pytest.raises(grpc.RpcError) as err:
            c.generate("hello world", max_new_tokens=61 - alone.prompt_tokens)
    assert a.completion_tokens == b.completion_tokens == 40
    assert list(b.token_ids) == list(alone.token_ids)  # queued, not truncated or mixed up
    assert max(gate.batch_sizes) == 1, gate.batch_sizes  # never two rows in the cache at once
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-kv-tokens" in err.value.details()
