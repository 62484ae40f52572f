"""Node help pages (web/docs/<NodeClass>.md): one per node, true to the node's inputs and outputs."""
import pathlib
import re

import pytest

from ae_testlib import host, registry
from ae_testlib.pack import PACK_ROOT

DOCS = PACK_ROOT / "web" / "docs"
SECTIONS = ("## Inputs", "## Outputs", "## Recipe", "## Reference")


def table_rows(page, heading):
    """{first cell without backticks: [cells]} of the table under `heading`."""
    section = page.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    return rows


def shown_default(value):
    """A default as the pages write it (and as the frontend shows it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def pack_classes():
    return registry.pack_nodes()[0]


def test_every_node_has_a_page_and_every_page_a_node(comfy_host):
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert pages == set(pack_classes()), "web/docs/ must hold exactly one <NodeClass>.md per node"


@pytest.mark.parametrize("key", sorted(p.stem for p in DOCS.glob("*.md")))
def test_page_matches_the_node(comfy_host, key):
    node = pack_classes()[key]
    page = (DOCS / f"{key}.md").read_text()
    for heading in SECTIONS:
        assert f"\n{heading}\n" in page, f"{key}.md lacks a '{heading}' section"
    inputs = {}
    for group in node.INPUT_TYPES().values():
        inputs.update(group)
    rows = table_rows(page, "## Inputs")
    assert list(rows) == list(inputs), f"{key}.md: input table != the node's inputs, in order"
    for name, spec in inputs.items():
        _, kind, default = rows[name][:3]
        assert kind == (spec[0] if isinstance(spec[0], str) else "COMBO"), f"{key}.md: type of {name}"
        options = spec[1] if len(spec) > 1 else {}
        if "default" in options:
            assert default == shown_default(options["default"]), f"{key}.md: default of {name}"
    names = getattr(node, "RETURN_NAMES", None) or node.RETURN_TYPES
    rows = table_rows(page, "## Outputs")
    assert list(rows) == list(names), f"{key}.md: output table != the node's outputs, in order"
    for name, kind in zip(names, node.RETURN_TYPES):
        assert rows[name][1] == kind, f"{key}.md: type of output {name}"


@host.requires("server")
def test_server_and_frontend_find_the_pages(comfy_host):
    # ComfyUI serves WEB_DIRECTORY under /extensions/<folder>; the frontend asks for
    # /extensions/<folder>/docs/<node class>.md (after <node class>/<locale>.md).
    import nodes

    pack_classes()  # loaded the way ComfyUI loads a custom-node folder
    assert pathlib.Path(nodes.EXTENSION_WEB_DIRS[PACK_ROOT.name]).resolve() == PACK_ROOT / "web"
    assert not list((PACK_ROOT / "web").rglob("*.js")), "web/ would load as frontend extensions"
    import comfyui_frontend_package

    assets = pathlib.Path(next(iter(comfyui_frontend_package.__path__))) / "static" / "assets"
    bundle = "".join(path.read_text(errors="replace") for path in assets.glob("*.js"))
    assert re.search(r"/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md", bundle), \
        "the frontend no longer fetches /extensions/<pack>/docs/<NodeClass>.md"
