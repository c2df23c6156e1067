"""Per-tenant quotas with an injected clock (no sleeping)."""

from __future__ import annotations

import threading

import pytest

from qlora_serve.server.auth import KeyFileError
from qlora_serve.errors import ResourceExhausted
from qlora_serve.server.quotas import QuotaBook, QuotaExceeded, TenantLimits, load_limits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_concurrency_limit_and_release():
    book = QuotaBook(TenantLimits(max_concurrent=2))
    a, b = book.acquire("acme"), book.acquire("acme")
    with pytest.raises(ResourceExhausted) as ei:
        book.acquire("acme")
    msg = str(ei.value)
    assert "max_concurrent=2" in msg and "'acme'" in msg and "retry in 1 s" in msg
    assert ei.value.limit_name == "max_concurrent" and ei.value.retry_after_s == 1
    book.acquire("beta").release()  # other tenants are unaffected
    a.release()
    a.release()  # idempotent: must not free a second slot
    with book.acquire("acme"):
        assert book.in_flight("acme") == 2
        with pytest.raises(QuotaExceeded):
            book.acquire("acme")
    assert book.in_flight("acme") == 1
    b.release()
    assert book.in_flight("acme") == 0


def test_token_bucket_refills_continuously():
    clock = Clock()
    book = QuotaBook(TenantLimits(tokens_per_minute=600), clock=clock)  # 10 tokens/s
    with book.acquire("acme", est_tokens=500) as lease:
        lease.charge(500)
    assert book.tokens_available("acme") == pytest.approx(100)
    with pytest.raises(QuotaExceeded) as ei:
        book.acquire("acme", est_tokens=300)
    msg = str(ei.value)
    # 200 missing tokens at 10 tokens/s -> 20 s
    assert "tokens_per_minute=600" in msg and "'acme'" in msg and "retry in 20 s" in msg
    assert ei.value.retry_after_s == 20
    clock.t += 19.0
    with pytest.raises(QuotaExceeded):
        book.acquire("acme", est_tokens=300)
    clock.t += 1.0
    book.acquire("acme", est_tokens=300).release()  # now fits (reservation refunded: nothing charged)
    clock.t += 3600.0
    assert book.tokens_available("acme") == pytest.approx(600)  # capped at one minute's worth


def test_reservation_then_actual_charge():
    clock = Clock()
    book = QuotaBook(TenantLimits(tokens_per_minute=1000), clock=clock)
    lease = book.acquire("acme", est_tokens=400)
    assert book.tokens_available("acme") == pytest.approx(600)  # reserved while running
    lease.charge(100)
    assert book.tokens_available("acme") == pytest.approx(600)  # within the reservation
    lease.charge(450)  # actual exceeded the estimate
    assert book.tokens_available("acme") == pytest.approx(450)
    lease.release()
    assert book.tokens_available("acme") == pytest.approx(450)  # no refund: all used
    lease2 = book.acquire("acme", est_tokens=300)
    lease2.charge(50)
    lease2.release()
    assert book.tokens_available("acme") == pytest.approx(400)  # unused 250 refunded
    lease2.charge(10)  # late count after release still debits
    assert book.tokens_available("acme") == pytest.approx(390)


def test_large_request_needs_full_bucket_and_debt_blocks():
    clock = Clock()
    book = QuotaBook(TenantLimits(tokens_per_minute=60), clock=clock)  # 1 token/s
    with book.acquire("acme", est_tokens=600) as lease:  # larger than the bucket: admitted when full
        lease.charge(600)
    assert book.tokens_available("acme") == pytest.approx(-540)
    with pytest.raises(QuotaExceeded, match="retry in 541 s"):
        book.acquire("acme", est_tokens=1)


def test_per_tenant_limits_and_unlimited_default():
    book = QuotaBook(per_tenant={"acme": TenantLimits(max_concurrent=1)})
    book.acquire("acme")
    with pytest.raises(QuotaExceeded):
        book.acquire("acme")
    leases = [book.acquire("beta", est_tokens=10**9) for _ in range(50)]
    assert book.in_flight("beta") == 50 and book.tokens_available("beta") is None
    for lease in leases:
        lease.release()


def test_thread_safe_concurrency_count():
    book = QuotaBook(TenantLimits(max_concurrent=5))
    admitted, refused = [], []
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        for _ in range(200):
            try:
                lease = book.acquire("acme")
            except QuotaExceeded:
                refused.append(1)
                continue
            assert book.in_flight("acme") <= 5
            admitted.append(1)
            lease.release()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) + len(refused) == 1600
    assert book.in_flight("acme") == 0


def test_limits_from_key_file(tmp_path):
    p = tmp_path / "keys.toml"
    p.write_text(
        "[default_limits]\nmax_concurrent = 8\ntokens_per_minute = 100000\n"
        "[tenants.acme]\nmax_concurrent = 4\ntokens_per_minute = 20000\n"
        '[tenants.big]\ntokens_per_minute = "unlimited"\n'
    )
    default, per = load_limits(p)
    assert default == TenantLimits(8, 100000)
    assert per["acme"] == TenantLimits(4, 20000)
    assert per["big"] == TenantLimits(8, None)  # inherits max_concurrent
    book = QuotaBook.from_file(p)
    assert book.limits_for("other") == default


@pytest.mark.parametrize(
    "body, fragment",
    [
        ("[tenants.acme]\nmax_concurrent = 0\n", "[tenants.acme]: max_concurrent must be a positive"),
        ("[tenants.acme]\nmax_concurent = 4\n", "unknown field(s) ['max_concurent']"),
        ('[default_limits]\ntokens_per_minute = "lots"\n', "[default_limits]: tokens_per_minute"),
    ],
)
def test_bad_limits_name_the_table(tmp_path, body, fragment):
    p = tmp_path / "keys.toml"
    p.write_text(body)
    with pytest.raises(KeyFileError) as ei:
        load_limits(p)
    assert fragment in str(ei.value)


def test_tenant_limits_validation():
    with pytest.raises(ValueError, match="tokens_per_minute"):
        TenantLimits(tokens_per_minute=-5)
    with pytest.raises(ValueError, match="max_concurrent"):
        TenantLimits(max_concurrent=True)
