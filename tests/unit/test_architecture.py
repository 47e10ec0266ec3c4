"""The dependency rules of ``docs/architecture.md``, checked on the source itself.

Each rule lists who may not import whom; a rule that the tree breaks fails here with
the offending module and import, so a shortcut across layers cannot land unnoticed."""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WEB_FRAMEWORKS = ("quart", "quart_trio", "hypercorn", "werkzeug", "flask", "jinja2")

# package (a module path prefix) -> import prefixes it must never use
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "ledger": ("routecat", "owlrun"),
    "owlrun": ("routecat", "ledger"),
    "routecat.db": (
        "routecat.api",
        "routecat.web",
        "routecat.network",
        "routecat.money",
        "routecat.gateway",
        "routecat.server",
        "routecat.demo",
        "routecat.cli",
        "owlrun",
        *WEB_FRAMEWORKS,
    ),
    "routecat.network": (
        "routecat.api",
        "routecat.web",
        "routecat.money",
        "routecat.gateway",
        "routecat.server",
        "routecat.demo",
        "routecat.cli",
        *WEB_FRAMEWORKS,
    ),
    "routecat.money": (
        "routecat.api",
        "routecat.web",
        "routecat.gateway",
        "routecat.server",
        "routecat.demo",
        "routecat.cli",
        *WEB_FRAMEWORKS,
    ),
    "routecat.errors": ("routecat.",),
    "routecat.clock": ("routecat.",),
    "routecat.config": (
        "routecat.api",
        "routecat.web",
        "routecat.network",
        "routecat.money",
        "routecat.db",
    ),
    "routecat.api": ("routecat.server", "routecat.demo", "routecat.cli"),
    "routecat.web": ("routecat.server", "routecat.demo", "routecat.cli"),
}
SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX))\b",
    re.IGNORECASE | re.DOTALL,
)


def modules(package: str) -> list[tuple[str, Path]]:
    base = ROOT / package.split(".")[0]
    found = []
    for path in sorted(base.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found.append((name, path))
    return found


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append(node.module)
            out += [f"{node.module}.{alias.name}" for alias in node.names]
    return out


def violations(rules: dict[str, tuple[str, ...]]) -> list[str]:
    found = []
    for top in ("routecat", "owlrun", "ledger"):
        for name, path in modules(top):
            for package, banned in rules.items():
                if name != package and not name.startswith(package + "."):
                    continue
                for imported in imports(path):
                    if any(
                        imported == b.rstrip(".") or imported.startswith(b.rstrip(".") + ".")
                        for b in banned
                    ):
                        found.append(f"{name} imports {imported} (rule for {package})")
    return sorted(set(found))


def test_layers_import_only_downwards() -> None:
    assert violations(FORBIDDEN) == []


def test_the_rule_checker_sees_a_broken_rule() -> None:
    """The checker itself can fail: the API layer does import Quart."""
    broken = violations({"routecat.api": ("quart",)})
    assert "routecat.api.app imports quart (rule for routecat.api)" in broken


def sql_strings(path: Path) -> list[str]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [t.string for t in tokens if t.type == tokenize.STRING and SQL.search(t.string)]


@pytest.mark.parametrize("top", ["routecat"])
def test_sql_only_in_the_storage_layer(top: str) -> None:
    """Only ``routecat/db`` holds SQL (the ledger keeps its own, in ``ledger/``)."""
    outside = {
        name: sql_strings(path)
        for name, path in modules(top)
        if not name.startswith("routecat.db") and sql_strings(path)
    }
    assert outside == {}
    inside = [
        name for name, path in modules(top) if name.startswith("routecat.db") and sql_strings(path)
    ]
    assert "routecat.db.jobs" in inside  # the scanner does see SQL where it is
