"""adapter_config.json parsed once into a typed, frozen AdapterConfig (no model needed)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from qlora_serve.adapters.layout import CONFIG_FILE, FINGERPRINT_KEY
from qlora_serve.adapters.peft_format import AdapterConfig, read_adapter_config
from qlora_serve.errors import InvalidArgument

WHERE = Path("/x") / CONFIG_FILE
BASE = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def test_fields_are_typed_and_frozen(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(json.dumps({
        **BASE, "use_rslora": True, "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 2},
        FINGERPRINT_KEY: "abc", "task_type": "CAUSAL_LM"}))
    cfg = read_adapter_config(tmp_path)
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.use_rslora) == (8, 16.0, ("q_proj", "v_proj"), True)
    assert cfg.base_fingerprint == "abc" and cfg.raw["task_type"] == "CAUSAL_LM"
    assert cfg.rank_of("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_of("model.layers.0.self_attn.v_proj") == 8
    assert cfg.scaling("model.layers.0.self_attn.v_proj", 8) == pytest.approx(2 / math.sqrt(8))
    assert cfg.scaling("model.layers.0.self_attn.q_proj", 4) == pytest.approx(16 / 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4


def test_defaults_follow_peft():
    cfg = AdapterConfig.parse({"peft_type": "lora", "r": 4}, WHERE)
    assert (cfg.lora_alpha, cfg.target_modules, cfg.use_rslora, cfg.base_fingerprint) == (4.0, None, False, None)
    assert cfg.scaling("a.q_proj", 4) == 1.0
    assert AdapterConfig.parse({**BASE, "target_modules": ".*proj"}, WHERE).target_modules == ".*proj"


@pytest.mark.parametrize("change, field", [
    ({"peft_type": "IA3"}, "peft_type"),
    ({"r": 0}, "'r'"),
    ({"lora_alpha": "x"}, "lora_alpha"),
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "all"}, "bias"),
    ({"target_modules": [1]}, "target_modules"),
    ({"rank_pattern": {"q_proj": "4"}}, "rank_pattern"),
    ({"alpha_pattern": ["v_proj"]}, "alpha_pattern"),
])
def test_bad_fields_are_invalid_argument_naming_file_and_field(change, field):
    with pytest.raises(InvalidArgument, match=f"{CONFIG_FILE}.*{field}"):
        AdapterConfig.parse({**BASE, **change}, WHERE)
    with pytest.raises(InvalidArgument, match="JSON object"):
        AdapterConfig.parse([BASE], WHERE)
