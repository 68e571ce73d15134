"""Each folder of the library imports only what its docstring allows (README, Layout)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "amusd_mq"
SHARED = {"config", "models", "sampling", "sequence", "tasks", "validate"}
SERVING = {"wire", "coordinator", "workers", "runtime", "text", "frontend"}
MAY_IMPORT = {
    "wire": {"config"},
    "text": {"models"},
    "runtime": SHARED | {"text", "wire"},
    "coordinator": SHARED | {"wire", "text"},
    "workers": SHARED | {"wire", "runtime"},
    "frontend": SHARED | {"wire"},
    "shared": SHARED | {"wire"},
}


def part(path: Path) -> str:
    rel = path.relative_to(PKG)
    if len(rel.parts) > 1:
        return rel.parts[0]
    return "entry" if rel.name in ("__init__.py", "__main__.py") else "shared"  # the entry points may import anything


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of amusd_mq that a module imports, relative or absolute, at any depth."""
    depth = len(path.relative_to(PKG).parts) - 1  # folders below amusd_mq
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(path.relative_to(PKG).parts[:-1])[:depth - node.level + 1]
                names = (base + node.module.split(".")) if node.module else base
                targets = [names] if node.module or base else [[a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "amusd_mq":
                names = node.module.split(".")[1:]
                targets = [names] if names else [[a.name] for a in node.names]
            else:
                continue
            found |= {t[0] for t in targets if t}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("amusd_mq.")}
    return {p.removesuffix(".py") for p in found}


def test_each_part_imports_only_what_it_may():
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        own = part(path)
        if own not in MAY_IMPORT:
            continue  # cli and bench may import anything
        wrong += [f"{path.relative_to(PKG)} imports {other}" for other in imported_parts(path) - MAY_IMPORT[own] - {own}]
    assert not wrong


def test_imports_are_found_relative_and_absolute():
    assert imported_parts(PKG / "coordinator" / "core.py") >= {"wire", "text", "config", "sequence"}
    assert imported_parts(PKG / "cli" / "main.py") >= {"frontend", "bench", "workers"}  # inside functions too


def test_the_rules_cover_every_serving_part():
    assert SERVING <= set(MAY_IMPORT)
    assert all("bench" not in MAY_IMPORT[p] for p in MAY_IMPORT)
