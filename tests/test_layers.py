"""docs/ARCHITECTURE.md's layer table is true to the imports: every module of src/lowbit is in
it once, and every import (also those inside functions) points to its own layer or below."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "lowbit"


def layers() -> dict[str, int]:
    """module (``lowbit.x.y``) -> layer index, 0 = top, from the table's second column."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n\n")[2]
    out: dict[str, int] = {}
    for i, line in enumerate(table.splitlines()[2:]):
        for path in re.findall(r"`([a-z0-9_/]+\.py)`", line.split("|")[2]):
            mod = "lowbit." + path.removesuffix(".py").replace("/", ".")
            mod = mod.removesuffix(".__init__")
            assert mod not in out, f"{path} is listed twice"
            out[mod] = i
    return out


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def name_of(path: Path) -> str:
    return ".".join(("lowbit", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(
        ".__init__")


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowbit"):
            if node.module != "lowbit":  # ``from lowbit import data`` imports lowbit.data only
                out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lowbit")}
    return out


def test_every_module_is_in_the_table_once():
    table = layers()
    found = {name_of(p) for p in modules()}
    assert found - set(table) == set(), "modules missing from docs/ARCHITECTURE.md"
    assert set(table) - found == set(), "the table lists modules that do not exist"


def test_imports_point_down():
    table = layers()
    bad = []
    for p in modules():
        me = name_of(p)
        for imp in imports(p):
            target = imp if imp in table else imp.rsplit(".", 1)[0]
            if target == "lowbit" or target not in table:
                if target == "lowbit" and table[me] != 0:  # ``import lowbit`` = the api layer
                    bad.append(f"{me} imports lowbit")
                continue
            if table[target] < table[me]:
                bad.append(f"{me} (layer {table[me]}) imports {target} (layer {table[target]})")
    assert not bad, "\n".join(bad)
