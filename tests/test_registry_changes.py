"""The registry's change log (adapters/changes.py): what engine servers following a
`--role registry` server replay. Real SQLite registry, real adapter directories."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_serve.adapters.changes import ALIAS_DELETED, ALIAS_SET, DELETED, REGISTERED, ChangeLog
from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.registry import AdapterRegistry


@pytest.fixture(scope="module")
def args(demo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp = base_fingerprint(demo.base, json.loads((demo.base / "config.json").read_text()))
    return dict(base_fingerprint=fp, linear_shapes=shapes, max_rank=16)


def test_every_committed_change_is_logged_in_order(tmp_path, demo, args):
    with AdapterRegistry(tmp_path, **args) as reg:
        poet = reg.register_path("a", demo.adapters["poet"], trusted=True)
        reg.register_path("a", demo.adapters["poet"], trusted=True)  # the same files again: no change
        pirate = reg.register_path("a", demo.adapters["pirate"], trusted=True, set_default=True)
        reg.register_path("b", demo.adapters["poet"], trusted=True)  # shares poet's stored files
        reg.set_alias("a", "stable", 1)
        reg.delete_alias("a", "stable")
        reg.delete("a", 1)  # "b" still uses poet's digest
        reg.delete("b")
        got = [(c.sequence, c.kind, c.name, c.version, c.alias, c.digest[:8], c.digest_gone)
               for c in reg.changes.since(reg.changes.epoch, 0)]
    p, q = poet.digest[:8], pirate.digest[:8]
    assert got == [(1, REGISTERED, "a", 1, "", p, False), (2, REGISTERED, "a", 2, "", q, False),
                   (3, ALIAS_SET, "a", 2, "default", "", False), (4, REGISTERED, "b", 1, "", p, False),
                   (5, ALIAS_SET, "a", 1, "stable", "", False), (6, ALIAS_DELETED, "a", 0, "stable", "", False),
                   (7, DELETED, "a", 1, "", p, False), (8, DELETED, "b", 1, "", p, True)]


def test_replay_or_reset():
    log = ChangeLog(retained=3)
    assert log.since(log.epoch, 0) == [] and log.since("", 0) is None  # nothing yet; no epoch: reset
    for i in range(4):
        log.append(REGISTERED, f"n{i}", version=1)
    assert [c.name for c in log.since(log.epoch, 2)] == ["n2", "n3"]
    assert log.since(log.epoch, 4) == []
    assert log.since(log.epoch, 0) is None  # older than the retained tail
    assert log.since(log.epoch, 5) is None  # a sequence this log never reached
    assert log.since("another-epoch", 3) is None  # the registry restarted
    assert log.wait(4, timeout_s=0.01) == []
    assert [c.sequence for c in log.wait(3, timeout_s=0.01)] == [4]
