"""The module arrows of docs/architecture.md, read from the source: models/ (inference) never imports the tooling,
the pipeline or the CLI; nothing imports the CLI; the tooling is reached only through the CLI hook and training /
evaluation; the stages share one configuration module and one executor interface."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cd_sfm"


def imports_of(path: Path) -> set[str]:
    """Absolute names of the cd_sfm modules a file imports (anywhere in it, lazily or not)."""
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cd_sfm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("cd_sfm"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def modules(sub: str = "") -> dict[str, set[str]]:
    root = PKG / sub if sub else PKG
    return {str(p.relative_to(PKG.parent).with_suffix("")).replace("/", "."): imports_of(p)
            for p in sorted(root.rglob("*.py"))}


def test_inference_models_know_only_themselves_io_and_config():
    allowed = ("cd_sfm.models", "cd_sfm.io", "cd_sfm.config", "cd_sfm.blas", "cd_sfm.native_stderr")
    for mod, imps in modules("models").items():
        bad = [i for i in imps if not i.startswith(allowed)]
        assert not bad, f"{mod} imports {bad}"


def test_nothing_imports_the_cli_and_only_hooks_reach_the_tooling():
    users = {"cd_sfm.cli", "cd_sfm.modeltools", "cd_sfm.train", "cd_sfm.evaluation"}
    for mod, imps in modules().items():
        assert not any(i == "cd_sfm.cli" or i.startswith("cd_sfm.cli.") for i in imps) or mod == "cd_sfm.cli", mod
        if any(i.startswith("cd_sfm.modeltools") for i in imps):
            assert any(mod == u or mod.startswith(u + ".") for u in users), f"{mod} imports the model tooling"


def test_no_import_cycle_between_packages():
    """Between the subpackages (and top-level modules) the import graph has no cycle."""
    def unit(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2])

    graph: dict[str, set[str]] = {}
    for mod, imps in modules().items():
        graph.setdefault(unit(mod), set()).update(unit(i) for i in imps if unit(i) != unit(mod))
    allowed_pairs = {  # stage <-> pipeline hooks through lazy imports that do not form a real cycle are listed here
    }
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            cycle = stack[stack.index(n):] + [n]
            assert tuple(cycle) in allowed_pairs, f"import cycle: {' -> '.join(cycle)}"
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            visit(m)
        stack.pop()

    for n in sorted(graph):
        visit(n)


def test_a_broken_command_says_why_instead_of_vanishing(monkeypatch, capsys):
    from cd_sfm import cli

    monkeypatch.setattr(cli, "EXTRA_COMMANDS", [("eval", "cd_sfm.no_such_module_for_test"),
                                                ("report", "cd_sfm.report")])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cd_sfm.no_such_module_for_test" else real(name, *a))
    assert cli.main(["eval", "pairs", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cd-sfm: error: eval: this command could not be loaded")
    assert "ModuleNotFoundError" in err[0]


@pytest.mark.parametrize("command", ["models", "train", "eval", "match-pair", "export", "report"])
def test_every_hooked_command_loads(command):
    p = subprocess.run([sys.executable, "-m", "cd_sfm.cli", command, "--help"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "unavailable" not in p.stdout, p.stdout + p.stderr
