"""The layer rule (DESIGN.md §1), held by reading every import in the source tree."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optim", "protocols", "node", "sim")

# What each layer may not import: other project layers, and IO libraries for the lower ones.
FORBIDDEN = {
    "optim": {"byteswarm.protocols", "byteswarm.node", "byteswarm.sim", "hivemind", "asyncio",
              "socket", "threading", "time", "multiprocessing", "trio"},
    "protocols": {"byteswarm.node", "byteswarm.sim", "hivemind", "asyncio", "socket",
                  "threading", "trio"},
    "node": {"byteswarm.sim"},
    "sim": {"byteswarm.node", "hivemind"},
}


def imports_of(path: Path, package: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against byteswarm.<package>
                parts = ["byteswarm", package, *path.relative_to(ROOT / package).parts[:-1]]
                base = parts[: len(parts) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def violations(package: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, name in imports_of(path, package):
            for banned in FORBIDDEN[package]:
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{lineno} imports {name}")
        if package == "protocols" and "async def" in path.read_text():
            bad.append(f"{path.relative_to(ROOT)} has async code")
    return bad


@pytest.mark.parametrize("package", PACKAGES)
def test_layers_hold(package):
    assert violations(package) == []


def test_checker_catches_a_violation(tmp_path, monkeypatch):
    # The checker itself must be able to fail: plant a bad import and look for it.
    fake = tmp_path / "optim"
    fake.mkdir()
    (fake / "bad.py").write_text("import hivemind\nfrom ..sim import x\nfrom . import ok\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert violations("optim") == ["optim/bad.py:1 imports hivemind",
                                   "optim/bad.py:2 imports byteswarm.sim"]
