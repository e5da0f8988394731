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


# A driver that asks which algorithm it holds is missing a method of the state contract
# (optim/sansio.py): outside optim/, no isinstance may name one.
ALGORITHM_CLASSES = {"SPSA", "NoLoCo", "DiLoCo"}


def algorithm_switches(root: Path, packages: tuple[str, ...]) -> list[str]:
    bad = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
                    names = {n.id if isinstance(n, ast.Name) else n.attr
                             for n in ast.walk(node.args[1])
                             if isinstance(n, (ast.Name, ast.Attribute))}
                    if names & ALGORITHM_CLASSES:
                        bad.append(f"{path.relative_to(root)}:{node.lineno}")
    return bad


def test_no_driver_asks_which_algorithm_it_holds():
    assert algorithm_switches(ROOT, ("protocols", "node", "sim", "scripts")) == []


def test_switch_checker_catches_one(tmp_path):
    (tmp_path / "node").mkdir()
    (tmp_path / "node" / "d.py").write_text(
        "ok = isinstance(x, dict)\nif isinstance(a, SPSA | algo.NoLoCo):\n    pass\n"
        "b = isinstance(a, (int, DiLoCo))\n")
    assert algorithm_switches(tmp_path, ("node",)) == ["node/d.py:2", "node/d.py:4"]
