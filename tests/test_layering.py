"""The dependency rule between folders, checked by reading every import.

Lower layers never import higher ones:
- `adapters/` imports neither `qlora_serve.server` nor `qlora_serve.training`;
- `training/` does not import the gRPC server (servicers, interceptors, app, CLI);
- the engine (`server/engine/`) imports no grpc, no generated stubs and nothing of
  `qlora_serve.server` outside the engine.
Shared pieces (domain errors, config options) live in the root package `qlora_serve`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The gRPC server: what `training/` must not reach.
GRPC_SERVER = ("qlora_serve.server.app", "qlora_serve.server.cli", "qlora_serve.server.interceptors",
               "qlora_serve.server.status", "qlora_serve.server.runtime", "qlora_serve.server.inference_service",
               "qlora_serve.server.registry_service", "qlora_serve.server.training_service",
               "qlora_serve.server.job_manager")

RULES = {
    "adapters": ("qlora_serve.server", "qlora_serve.training", "grpc"),
    "training": GRPC_SERVER,
    "server/engine": ("grpc", "qlora_serve.v1", "qlora_serve.training", "qlora_serve.server"),
}
ALLOWED = {"server/engine": ("qlora_serve.server.engine",)}


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return "qlora_serve." + ".".join(rel.parts[:-1])


def imports_of(path: Path) -> list[str]:
    """Absolute module names imported by one source file (relative imports resolved)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(path).split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]  # `from qlora_serve import server`
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imports_of(path):
            if any(_within(name, a) for a in ALLOWED.get(folder, ())):
                continue
            if any(_within(name, banned) for banned in RULES[folder]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(RULES))
def test_lower_layers_never_import_higher_ones(folder):
    assert _violations(folder) == []


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a planted upward import is reported."""
    fake_root = tmp_path
    (fake_root / "adapters").mkdir()
    (fake_root / "adapters" / "bad.py").write_text("from qlora_serve.server.app import QloraServer\nimport grpc\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    found = _violations("adapters")
    assert found == ["adapters/bad.py imports qlora_serve.server.app", "adapters/bad.py imports qlora_serve.server.app.QloraServer",
                     "adapters/bad.py imports grpc"]


def test_the_request_core_and_the_http_front_end_load_without_grpc():
    """Transport-neutral means importable without grpc or the generated stubs at all."""
    import subprocess
    import sys

    code = ("import sys, qlora_serve.server.requests, qlora_serve.server.http_api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'grpc' or m.startswith('qlora_serve.v1')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
