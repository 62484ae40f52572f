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
            yield node.level, node.module or ""
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name


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
    for level, module in imports_of(path):
        if level == 0:
            assert not (layer == "masks" and module.split(".")[0] == "comfy"), f"{path} imports ComfyUI"
            continue
        target = layer if level == 1 else module.split(".")[0]
        assert target in ALLOWED[layer], f"{path.relative_to(PACK_ROOT)} imports {'.' * level}{module}"


def test_the_comfyui_versions_audit_names_tests_that_exist():
    """docs/comfyui_versions.md names a covering test in every row: each must exist."""
    doc = (PACK_ROOT / "docs" / "comfyui_versions.md").read_text()
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| interface")]
    assert rows and all("tests/" in row for row in rows), [row[:80] for row in rows if "tests/" not in row]
    missing = [f"{path}::{name}" for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)", doc)
               if not (PACK_ROOT / path).is_file()
               or not re.search(rf"^def {name}\(", (PACK_ROOT / path).read_text(), re.M)]
    assert not missing, missing
