"""judges/ has no import circle, and imports without the `openai` package.

The graph counts every import of a judges module anywhere in a module's source (a lazy import
inside a function closes a circle as surely as one at the top), read from the source with `ast`.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import noisepo.judges

PACKAGE = "noisepo.judges"
FOLDER = Path(noisepo.judges.__file__).parent


def judges_imports() -> dict[str, set[str]]:
    """module -> the judges modules it imports (the package itself as 'noisepo.judges')."""
    modules = {f"{PACKAGE}.{p.stem}" if p.stem != "__init__" else PACKAGE: p for p in FOLDER.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_judges_has_no_import_circle():
    graph = judges_imports()
    assert f"{PACKAGE}.common" in graph[f"{PACKAGE}.local_lm"]  # the graph sees imports at all
    assert f"{PACKAGE}.reward_model" not in graph[f"{PACKAGE}.local_lm"]  # fingerprint lives in common
    assert graph[f"{PACKAGE}.common"] == set()  # the shared helpers depend on no judge
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_registry_names_classes_that_exist():
    import importlib

    from noisepo.judges.base import COMPARERS, SCORERS

    for table, method in ((SCORERS, "score"), (COMPARERS, "compare")):
        for name, path in table.items():
            module, _, attribute = path.partition(":")
            cls = getattr(importlib.import_module(module), attribute)
            assert callable(getattr(cls, method, None)) and callable(cls.from_config), name


def test_judges_import_and_build_local_scorers_without_openai():
    code = textwrap.dedent("""
        import sys
        sys.modules["openai"] = None  # `import openai` now raises ImportError
        import importlib, pkgutil
        import noisepo.judges
        for info in pkgutil.iter_modules(noisepo.judges.__path__):
            importlib.import_module(f"noisepo.judges.{info.name}")
        from noisepo.errors import ConfigError
        from noisepo.judges.base import make_comparer, make_scorer
        from noisepo.judges.config import ScorerOptions
        assert make_scorer(ScorerOptions(scorer="verifier", verifier="addition")).score([("1+1=", "2")]) == [1.0]
        for make in (make_scorer, make_comparer):
            try:
                make(ScorerOptions(scorer="openai"))
            except ConfigError as err:
                assert err.key == "scorer" and "pip install" in str(err), err
            else:
                raise AssertionError("built an openai judge without openai")
        assert "torch" not in sys.modules  # neither the package nor a verifier needs it
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
