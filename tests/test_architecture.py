"""The layout the README describes, checked on the code: stages import shared leaves, not each
other; functions stay short enough to read; derive has one narrow door."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[1] / "service"
STAGES = ("scp", "assemble", "intake", "preprocess", "inference", "assess", "derive", "deliver")
#: Arrows between stages that are allowed, and why.
ALLOWED = {
    # segment_lesion runs the model card's preprocessing profile, then the network, then maps
    # back to the native grid: inference drives preprocess (forward, never back up).
    ("inference", "preprocess"),
}
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(SERVICE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "service" and len(parts) > 1 and parts[1] in STAGES else None


def _sources() -> list[Path]:
    return sorted(SERVICE.rglob("*.py"))


def test_stages_do_not_import_each_other() -> None:
    arrows = []
    for path in _sources():
        source = _stage(_module_name(path))
        if source is None:
            continue
        for imported in _imports(path):
            target = _stage(imported)
            if target is not None and target != source and (source, target) not in ALLOWED:
                arrows.append(f"{path.relative_to(SERVICE.parent)} imports {imported}")
    assert arrows == []


def test_named_rules_of_the_architecture_issue() -> None:
    """intake does not import the database, preprocess not intake, the worker pipeline not scp."""
    def imports_under(folder: str) -> set[str]:
        return set().union(*(_imports(p) for p in (SERVICE / folder).rglob("*.py")))

    assert not {m for m in imports_under("intake") if m.startswith("service.db")}
    assert not {m for m in imports_under("preprocess") if m.startswith("service.intake")}
    assert not {m for m in _imports(SERVICE / "pipeline.py") if m.startswith("service.scp")}


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SERVICE.parent)}:{node.lineno} {node.name} ({lines})")
    assert long == []


def test_derive_has_one_narrow_door() -> None:
    from service.derive import write_results

    assert len(inspect.signature(write_results).parameters) <= 6
    init = SERVICE / "derive" / "__init__.py"
    definitions = [n for n in ast.parse(init.read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert definitions == [], "service/derive/__init__.py only re-exports"


def test_one_logger_naming_scheme() -> None:
    """Every module logs as ``log = logging.getLogger(__name__)`` (the cli, run as __main__,
    names itself), so one ``service`` logger configures them all."""
    odd = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "attr", "") == "getLogger"
                    and isinstance(node.targets[0], ast.Name)):
                name = node.targets[0].id
                arg = node.value.args[0] if node.value.args else None
                by_name = isinstance(arg, ast.Name) and arg.id == "__name__"
                cli = isinstance(arg, ast.Constant) and arg.value == _module_name(path)
                if name != "log" or not (by_name or cli):
                    odd.append(f"{path.relative_to(SERVICE.parent)}:{node.lineno} {ast.unparse(node)}")
    assert odd == []
