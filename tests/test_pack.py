"""The repository loads as a ComfyUI custom-node folder, carries registry metadata, and keeps its
layering (nodes -> samplers -> attention / masks; masks/ imports no ComfyUI)."""
import ast
import re
import tomllib

import pytest

from ae_testlib import registry
from ae_testlib.pack import PACK_ROOT

PACKAGES = ("nodes", "samplers", "attention", "masks")
# which of the pack's packages each layer may import
ALLOWED = {"nodes": {"nodes", "samplers", "attention", "masks"}, "samplers": {"samplers", "attention", "masks"},
           "attention": {"attention", "masks"}, "masks": {"masks"}}


def pack_sources():
    return sorted(p for package in PACKAGES for p in (PACK_ROOT / package).rglob("*.py")) + [PACK_ROOT / "__init__.py"]


def imports_of(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            yield node.level, node.module or "", [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name, []


def module_of(path):
    """('attention', 'text_encoders', 'clip') for attention/text_encoders/clip.py."""
    parts = path.relative_to(PACK_ROOT).with_suffix("").parts
    return parts[:-1] if parts[-1] == "__init__" else parts


def pack_imports(path):
    """The pack modules a file imports (relative imports resolved; function-level ones included)."""
    package = module_of(path) if path.name == "__init__.py" else module_of(path)[:-1]
    for level, module, names in imports_of(path):
        if level == 0:
            continue
        base = package[:len(package) - (level - 1)] + tuple(filter(None, module.split(".")))
        known = {module_of(p) for p in pack_sources()}
        found = [base + (name,) for name in names if base + (name,) in known]
        yield from found or [base]


def test_loads_as_a_custom_node(comfy_host):
    classes, display = registry.pack_nodes()
    assert classes, "the pack registered no nodes"
    for key, node in classes.items():
        assert key.startswith("AttentionEdit") and key in display
        inputs = node.INPUT_TYPES()
        assert "required" in inputs
        assert isinstance(node.RETURN_TYPES, tuple) and callable(getattr(node, node.FUNCTION))
        assert node.CATEGORY.startswith("attention_edit")


def test_registry_metadata():
    meta = tomllib.loads((PACK_ROOT / "pyproject.toml").read_text())
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["project"]["version"])
    assert meta["project"]["urls"]["Repository"].startswith("https://")
    assert {"PublisherId", "DisplayName", "Icon"} <= set(meta["tool"]["comfy"])
    assert not any(d.split("=")[0].split("<")[0].strip().lower() == "torch" for d in meta["project"]["dependencies"])


@pytest.mark.parametrize("path", pack_sources(), ids=lambda p: str(p.relative_to(PACK_ROOT)))
def test_no_eval_exec_and_layering(path):
    tree = ast.parse(path.read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"eval", "exec"}, f"{path.name} calls eval/exec"
    layer = path.relative_to(PACK_ROOT).parts[0]
    if layer not in ALLOWED:
        return
    for level, module, _ in imports_of(path):
        if level == 0:
            assert not (layer == "masks" and module.split(".")[0] == "comfy"), f"{path} imports ComfyUI"
    for target in pack_imports(path):
        assert target[0] in ALLOWED[layer], f"{path.relative_to(PACK_ROOT)} imports {'.'.join(target)}"


def test_no_import_circle():
    """No module of the pack imports, through any chain (late imports inside functions included),
    a module that imports it back."""
    graph = {module_of(p): set(pack_imports(p)) for p in pack_sources()}
    for start in graph:
        stack, seen = list(graph[start]), set()
        while stack:
            module = stack.pop()
            assert module != start, f"{'.'.join(start)} imports itself back through {sorted('.'.join(m) for m in seen)}"
            if module not in seen:
                seen.add(module)
                stack.extend(graph.get(module, ()) - {module[:-1]})


def test_the_comfyui_versions_audit_names_tests_that_exist():
    """docs/comfyui_versions.md names a covering test in every row: each must exist."""
    doc = (PACK_ROOT / "docs" / "comfyui_versions.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| interface")]
    assert rows and all("tests/" in row for row in rows), [row[:80] for row in rows if "tests/" not in row]
    missing = [f"{path}::{name}" for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)", doc)
               if not (PACK_ROOT / path).is_file()
               or not re.search(rf"^def {name}\(", (PACK_ROOT / path).read_text(), re.M)]
    assert not missing, missing
