"""AdapterRouter: Ray Serve's request router for qlora-serve replicas (server/ray_app.py).

A request names its adapter in the `multiplexed_model_id` header. The router reads what
the replicas publish through `record_routing_stats` every ROUTING_STATS_PERIOD_S: the
engine's resident adapters (by name), its queue depth, its free adapter slots and
whether the runtime is serving. A replica's load is the requests it has in flight as
this router's Serve queue-length cache counts them (updated on every send and finish,
so a burst spreads instead of herding onto the replica that was idle at the last
report), else the engine's queued + running from the stats. Ranking, best first:

1. replicas whose engine holds the adapter resident, least loaded first;
2. a cold adapter's placement: the replica this router sent it to within the last
   PLACEMENT_TTL_S (the stats still say "cold" while the engine loads it, and the load
   counts its first requests: without this, the next request for it would go to the
   then less loaded replica and load it there too), else the least loaded serving
   replica with a free adapter slot (all serving replicas when none has one), ties
   broken by rendezvous hash of the name, so proxies with the same stats agree;
3. the other serving replicas by load, then replicas that are draining.

Without an adapter: serving replicas by load, then draining ones. Ray tries each rank in
turn and skips replicas whose queues are full (max_ongoing_requests).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTING_STATS_PERIOD_S = 1.0  # how often replicas report residency and queue depth
# A cold adapter's placement is remembered this long after the last request routed by it
# (sliding): longer than a stats period plus an adapter's load from disk.
PLACEMENT_TTL_S = 5.0


def _stats(r: RunningReplica) -> dict[str, Any]:
    return r.routing_stats or {}


def _load(r: RunningReplica, live: dict | None = None) -> int:
    """Requests in flight on the replica: `live` (replica id -> count, this router's
    up-to-date view) if it has the replica, else queued + running at its last report."""
    if live and r.replica_id in live:
        return int(live[r.replica_id])
    s = _stats(r)
    return int(s.get("queued", 0)) + int(s.get("running", 0))


def _serving(r: RunningReplica) -> bool:
    return bool(_stats(r).get("serving", True))  # no report yet: Serve says it is up


def _hash(name: str, r: RunningReplica) -> bytes:
    return hashlib.sha256(f"{name}/{r.replica_id.unique_id}".encode()).digest()


def _rendezvous(name: str, replicas: list[RunningReplica]) -> RunningReplica:
    """The replica `name` hashes highest with: stable while the replica set is."""
    return max(replicas, key=lambda r: _hash(name, r))


def cold_placement(name: str, replicas: list[RunningReplica], live: dict | None = None) -> RunningReplica:
    """Where a cold adapter goes: the least loaded replica with a free adapter slot
    (any replica when none has one), the rendezvous hash of `name` breaking ties."""
    free = [r for r in replicas if int(_stats(r).get("free_slots", 1)) > 0] or replicas
    return min(free, key=lambda r: (_load(r, live), [-b for b in _hash(name, r)]))


class Placements:
    """Cold adapters this router placed recently: name -> (replica id, expiry), sliding."""

    def __init__(self, ttl_s: float = PLACEMENT_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._placed: dict[str, tuple[Any, float]] = {}

    def recall(self, name: str, now: float):
        """The replica id `name` was placed on, if still fresh (else None)."""
        hit = self._placed.get(name)
        if hit is None or hit[1] < now:
            self._placed.pop(name, None)
            return None
        return hit[0]

    def remember(self, name: str, replica_id, now: float) -> None:
        self._placed[name] = (replica_id, now + self.ttl_s)
        if len(self._placed) > 4096:  # bounded: drop the expired ones
            self._placed = {k: v for k, v in self._placed.items() if v[1] >= now}


def rank(candidates: list[RunningReplica], ref: str, placements: Placements | None = None,
         now: float | None = None, live: dict | None = None) -> list[list[RunningReplica]]:
    """The ranks for a request for adapter `ref` ("" = none); see the module docstring.
    Records a cold adapter's placement in `placements` (now: time.monotonic() seconds).
    live: replica id -> requests in flight, where the caller knows it (else the stats)."""
    if not candidates:
        return []
    now = time.monotonic() if now is None else now
    serving = sorted((r for r in candidates if _serving(r)), key=lambda r: _load(r, live))
    draining = sorted((r for r in candidates if not _serving(r)), key=lambda r: _load(r, live))
    name = ref.partition("@")[0]
    if not name or not serving:
        return [[r] for r in serving + draining]
    holding = [r for r in serving if name in _stats(r).get("adapters", ())]
    first = holding
    if not holding:
        placed_id = placements.recall(name, now) if placements is not None else None
        placed = next((r for r in serving if r.replica_id == placed_id), None)
        first = [placed or cold_placement(name, serving, live)]
        if placements is not None:
            placements.remember(name, first[0].replica_id, now)
    return [[r] for r in first] + [[r] for r in serving + draining if r not in first]


class AdapterRouter(RequestRouter):
    """Serve request router: ranks replicas by the request's adapter (`rank`)."""

    def initialize_state(self, **kwargs) -> None:
        self._placements = Placements()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if getattr(self, "_placements", None) is None:
            self._placements = Placements()
        ref = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        cache = self.replica_queue_len_cache
        live = {r.replica_id: q for r in candidate_replicas if (q := cache.get(r.replica_id)) is not None}
        return rank(candidate_replicas, ref or "", self._placements, live=live)
