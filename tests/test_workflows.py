"""Every example workflow loads: node types exist (pack or core), links connect matching types,
and widget values fit each node's INPUT_TYPES in order (as the ComfyUI frontend stores them)."""
import json
import numbers
import re

import pytest

from ae_testlib import dit_host, host, registry
from ae_testlib.pack import PACK_ROOT

WORKFLOWS = sorted((PACK_ROOT / "workflows").glob("*.json"))
# workflows for DiT models use loader nodes (and options) that only hosts with DiT models have
DIT_WORKFLOWS = {"flux_record_attention.json", "qwen_image_record_attention.json", "instdiffedit_flux.json",
                 "foi_flux_kontext.json", "foi_qwen_image_edit.json", "flux2_record_attention.json",
                 "wan_record_attention.json", "instdiffedit_wan22.json", "wan_vace_word_mask_inpaint.json"}
DIT_WORKFLOWS |= {"hunyuan_image_record_attention.json", "foi_qwen_image_edit_2511.json"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROL = {"fixed", "increment", "decrement", "randomize"}
# model / image file names: the test host has no model files, so a workflow's placeholder file
# name need not be in the host's (empty) list
FILE_NAME = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|sft|gguf|png|jpe?g|webp)$", re.IGNORECASE)


# upstream VAELoader lists "pixel_space" (no VAE) beside its files
NON_FILE_CHOICES = {"pixel_space"}
# Widgets a newer ComfyUI appended to a core node. Workflows are saved with them (the newest
# frontend wants every widget value); an older frontend ignores the trailing value, so on an older
# host it may be left over, and only these may. Each: (node type, the widgets in the order added).
NEWER_WIDGETS = {"ImageScaleToTotalPixels": ["resolution_steps"]}  # 0.19.3 (not in 0.3.64)


def is_file_list(choices):
    files = [choice for choice in choices if choice not in NON_FILE_CHOICES]
    return all(isinstance(choice, str) and FILE_NAME.search(choice) for choice in files)


def node_classes():
    pack, _ = registry.pack_nodes()
    return {**registry.core_nodes(), **pack}


def input_specs(node_class):
    spec = node_class.INPUT_TYPES()
    return [(name, value) for section in ("required", "optional") for name, value in spec.get(section, {}).items()]


def is_widget(value):
    kind = value[0]
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def check_widget(node_type, name, value, widget):
    kind, options = widget[0], (widget[1] if len(widget) > 1 else {})
    where = f"{node_type}.{name} = {value!r}"
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if isinstance(kind, (list, tuple)) else options.get("options", [])
        # file lists (checkpoints, images) are empty on the test host: any name is fine there
        file_name = isinstance(value, str) and FILE_NAME.search(value) and is_file_list(choices)
        assert not choices or value in choices or file_name, f"{where} is not one of {choices[:8]}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "FLOAT":
        assert isinstance(value, numbers.Real) and not isinstance(value, bool), where
        assert options.get("min", value) <= value <= options.get("max", value), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


def check_widgets(node, node_class):
    values = list(node.get("widgets_values") or [])
    for name, widget in input_specs(node_class):
        if not is_widget(widget):
            continue
        assert values, f"{node['type']} (node {node['id']}) has no widget value for '{name}'"
        check_widget(node["type"], name, values.pop(0), widget)
        options = widget[1] if len(widget) > 1 else {}
        seed_like = options.get("control_after_generate") or name in ("seed", "noise_seed")
        if widget[0] == "INT" and seed_like and values and values[0] in SEED_CONTROL:
            values.pop(0)
    host_widgets = {name for name, widget in input_specs(node_class) if is_widget(widget)}
    newer = [name for name in NEWER_WIDGETS.get(node["type"], []) if name not in host_widgets]
    assert len(values) <= len(newer), f"{node['type']} (node {node['id']}) has extra widget values {values}"


def types_match(a, b):
    split = lambda t: set(str(t).split(","))  # noqa: E731
    return a == "*" or b == "*" or bool(split(a) & split(b))


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_is_valid(path, comfy_host):
    if path.name in DIT_WORKFLOWS or host.workflow_missing_reason(path.name):
        dit_host.require_dit_host()
    newer = host.workflow_missing_reason(path.name)  # Flux.2, Z-Image: newer hosts only
    if newer:
        pytest.skip(newer)
    workflow = json.loads(path.read_text())
    classes = node_classes()
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert any(node["type"].startswith("AttentionEdit") for node in nodes.values()), "uses no pack node"
    for node in nodes.values():
        if node["type"] in registry.FRONTEND_ONLY:
            continue
        assert node["type"] in classes, f"unknown node type {node['type']} in {path.name}"
        check_widgets(node, classes[node["type"]])
    for link_id, source, source_slot, target, target_slot, link_type in workflow["links"]:
        assert source in nodes and target in nodes, f"link {link_id} points at a missing node"
        source_node, target_node = nodes[source], nodes[target]
        if source_node["type"] in classes:
            produced = classes[source_node["type"]].RETURN_TYPES[source_slot]
            assert types_match(produced, link_type), f"link {link_id}: {produced} vs {link_type}"
        slot = target_node["inputs"][target_slot]
        assert slot["link"] == link_id and types_match(slot["type"], link_type), f"link {link_id} target slot"
        if target_node["type"] in classes:
            expected = dict(input_specs(classes[target_node["type"]]))
            assert slot["name"] in expected, f"{target_node['type']} has no input {slot['name']}"
            kind = expected[slot["name"]][0]
            kind = "COMBO" if isinstance(kind, (list, tuple)) else kind
            assert types_match(kind, link_type), f"link {link_id}: {kind} input fed {link_type}"
    for node in nodes.values():  # every required non-widget input is connected
        if node["type"] not in classes:
            continue
        required = classes[node["type"]].INPUT_TYPES().get("required", {})
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        for name, spec in required.items():
            if not is_widget(spec):
                assert name in linked, f"{node['type']} (node {node['id']}) input '{name}' is not connected"


def test_there_are_workflows():
    assert WORKFLOWS, "workflows/ holds no example workflow"
