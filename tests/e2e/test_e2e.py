"""Every shipped workflow on a real ComfyUI server and its real web frontend (headless Chromium).

A fresh server (`main.py --cpu`, own base folder, the pack linked into custom_nodes/) gets
random-weight checkpoints of the full real architectures under the names the workflows use. Each
workflow is loaded as the template browser loads it, checked for dialogs, console errors and
layout, converted with the frontend's graphToPrompt, and run through POST /prompt with fewer
steps and a small image (in the API prompt only). Workflows whose models this machine cannot hold
(DiT text encoders) are posted with empty placeholder model files of the names they use: the
server's own validation accepts them, and execution stops at the first loader.
"""
import io
import json
import tempfile
import time

import pytest

from ae_testlib import host

host.module_requires("server")

from e2e import server as e2e_server  # noqa: E402
from ae_testlib import registry  # noqa: E402
from ae_testlib.pack import PACK_ROOT  # noqa: E402
from e2e import browser, models, prompt as cheap_prompt, report  # noqa: E402

COMFYUI, _ = e2e_server.upstream_host()
PACK = e2e_server.PACK_FOLDER
WORKFLOWS = {path.stem: json.loads(path.read_text()) for path in sorted((PACK_ROOT / "workflows").glob("*.json"))}
NAMES = list(WORKFLOWS)
RUN_TIMEOUT = 300  # s per workflow on the 2-core CI machine
PACK_MARKERS = ("attention-edit", "attention_edit", "AttentionEdit")
# the pack's NODE_CLASS_MAPPINGS keys, read before Playwright's event loop runs (the loader awaits)
PACK_CLASSES = sorted(registry.pack_nodes()[0])


@pytest.fixture(scope="module")
def comfy():
    base = tempfile.TemporaryDirectory(prefix="attention-edit-e2e-")
    server = e2e_server.Server(COMFYUI, base.name)
    try:
        models.check_known(WORKFLOWS)
        names = set().union(*(models.files_named(w) for w in WORKFLOWS.values() if not models.not_runnable(w)))
        models.install(names, base.name, log=report.NOTES.append)
        named = set().union(*(models.files_named(w) for w in WORKFLOWS.values() if models.not_runnable(w)))
        models.install(named & set(models.BUILDERS), base.name, log=report.NOTES.append)  # input images
        models.install_placeholders(named - set(models.BUILDERS), base.name)
        start = time.perf_counter()
        server.start()
        report.NOTES.append(f"server started in {time.perf_counter() - start:.1f} s")
        yield server
    finally:
        server.stop()
        base.cleanup()


@pytest.fixture(scope="module")
def frontend(comfy):
    try:
        browser.require_browser()
    except RuntimeError as error:  # the upstream host must have the browser: fail, never skip
        pytest.fail(str(error))
    with browser.Frontend(comfy.url) as page:
        page.startup_errors = list(page.console_errors)
        report.NOTES.append(f"frontend startup console errors (fresh profile): {len(page.startup_errors)}: "
                            + "; ".join(sorted(set(page.startup_errors)))[:800])
        yield page


def _pack_lines(lines):
    return [line for line in lines if any(marker in line for marker in PACK_MARKERS)]


def _tracebacks(log):
    """The traceback blocks of a server log (each up to the blank line after it)."""
    return [part.split("\n\n")[0] for part in log.split("Traceback (most recent call last):")[1:]]


def test_server_starts_with_the_pack(comfy, frontend):
    # the host's own optional modules may fail to import (torchaudio is left out); the pack's may not
    startup = comfy.log()
    ours = [block for block in _tracebacks(startup) if _pack_lines(block.splitlines())]
    assert not ours, f"the pack raised while the server started:\n{ours[0]}"
    assert f"custom_nodes/{PACK}" in startup
    assert not any("IMPORT FAILED" in line for line in _pack_lines(startup.splitlines()))
    info = comfy.get_json("/api/object_info")
    ours = sorted(k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK}")
    assert ours == PACK_CLASSES, "the server did not register the pack's NODE_CLASS_MAPPINGS"
    missing = set(ours) - set(frontend.node_types())
    assert not missing, f"the frontend did not register {sorted(missing)}"
    assert not _pack_lines(frontend.startup_errors), frontend.startup_errors


def test_templates_list_every_workflow(comfy):
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get(PACK, [])) == sorted(NAMES), templates


def _require_host_for(name):
    """Skip, with the host reason, a workflow whose nodes this host lacks (Flux.2's on 0.3.64)."""
    reason = host.workflow_missing_reason(name)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("name", NAMES)
def test_thumbnail_is_served(comfy, name):
    # the template browser asks for <workflow>.<mediaSubtype> beside the workflow (jpg by default)
    thumbnail = PACK_ROOT / "workflows" / f"{name}.jpg"
    assert thumbnail.is_file(), f"workflows/{name}.jpg is missing: run python tests/e2e/make_thumbnails.py"
    status, body = comfy.request(f"/api/workflow_templates/{PACK}/{name}.jpg")
    assert status == 200 and body == thumbnail.read_bytes(), f"{name}.jpg: HTTP {status}"


def _overlaps(boxes):
    pairs = []
    for i, (a_name, (ax, ay, aw, ah)) in enumerate(boxes):
        for b_name, (bx, by, bw, bh) in boxes[i + 1:]:
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                pairs.append(f"{a_name} / {b_name}")
    return pairs


def _inside(box, outer):
    x, y, w, h = box
    ox, oy, ow, oh = outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlap_and_every_node_in_a_group(frontend, name):
    _require_host_for(name)
    layout = frontend.load_template(PACK, name)
    boxes = [(f"{n['id']} {n['title']}", n["box"]) for n in layout["nodes"]]
    assert not _overlaps(boxes), f"{name}: nodes overlap as the frontend renders them: {_overlaps(boxes)}"
    groups = layout["groups"]
    assert groups and all(g["title"] for g in groups), f"{name}: needs titled groups"
    outside = [label for label, box in boxes if not any(_inside(box, g["box"]) for g in groups)]
    assert not outside, f"{name}: nodes outside every group: {outside}"
    assert not _overlaps([(g["title"], g["box"]) for g in groups]), f"{name}: groups overlap"


# outputs that are not one image of the input's size: FoI's keyword masks lie side by side, one
# per sub-instruction (foi_multi has three); InstDiffEdit's mask_steps strip has one latent-size
# frame per step it ran (2 steps at strength 0.5: one)
LATENT = cheap_prompt.SIZE // 8
OUTPUT_SIZES = {("foi_multi", "8"): (3 * cheap_prompt.SIZE, cheap_prompt.SIZE),
                ("instdiffedit", "7"): (LATENT, LATENT), ("instdiffedit_controlnet", "16"): (LATENT, LATENT),
                # MAG-Edit's attention panels: before | 4 px | after
                ("mag_edit", "12"): (2 * cheap_prompt.SIZE + 4, cheap_prompt.SIZE)}


def _check_images(comfy, entry, name):
    from PIL import Image
    import numpy as np

    images = [(node_id, image) for node_id, output in entry["outputs"].items() for image in output.get("images", [])]
    assert images, f"{name}: the prompt produced no image"
    for node_id, image in images:
        picture = Image.open(io.BytesIO(comfy.view(image)))
        picture.load()
        pixels = np.asarray(picture, dtype=np.float32)
        assert np.isfinite(pixels).all()
        expected = OUTPUT_SIZES.get((name, node_id), (cheap_prompt.SIZE, cheap_prompt.SIZE))
        assert picture.size == expected, \
            f"{name}: output of node {node_id} ({image['filename']}) is {picture.size}"
    return len(images)


# the nodes a placeholder (empty) model file stops: a not-runnable workflow gets that far
PLACEHOLDER_LOADERS = {"UNETLoader", "CLIPLoader", "DualCLIPLoader", "VAELoader", "CheckpointLoaderSimple"}


def _execution_error_node(entry):
    """The node type a finished prompt failed at (None when it did not fail)."""
    for kind, data in entry["status"].get("messages", []):
        if kind == "execution_error":
            return data.get("node_type")
    return None


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_converts_and_runs(comfy, frontend, name):
    _require_host_for(name)
    times = report.TIMES.setdefault(name, {})
    errors_before = len(frontend.console_errors)
    start = time.perf_counter()
    layout = frontend.load_template(PACK, name)
    times["load"] = time.perf_counter() - start
    assert len(layout["nodes"]) == len(WORKFLOWS[name]["nodes"])
    assert not frontend.dialogs(), f"{name}: the frontend shows {frontend.dialogs()}"

    start = time.perf_counter()
    converted = frontend.graph_to_prompt()
    times["convert"] = time.perf_counter() - start
    new_errors = frontend.console_errors[errors_before:]
    assert not new_errors, f"{name}: console errors while loading and converting: {new_errors}"
    api_prompt = converted["output"]
    expected = {str(n["id"]) for n in WORKFLOWS[name]["nodes"]
                if n["type"] not in ("Note", "MarkdownNote")}
    assert set(api_prompt) == expected, f"{name}: graphToPrompt gave nodes {sorted(api_prompt)}"

    why_not = models.not_runnable(WORKFLOWS[name])
    if why_not:  # its nodes run on tiny models in the pytest suite; here the server validates it
        entry, times["validate"] = comfy.run_prompt(api_prompt, RUN_TIMEOUT)
        stopped_at = _execution_error_node(entry)
        assert stopped_at in PLACEHOLDER_LOADERS, \
            f"{name}: accepted by POST /prompt, then failed at {stopped_at} instead of loading a placeholder: " \
            f"{json.dumps(entry['status'])[:4000]}"
        times["result"] = (f"loaded + converted + accepted by POST /prompt (placeholder model files, "
                           f"execution stopped at {stopped_at}); not run here: {why_not}")
        return
    log_start = len(comfy.log())
    try:
        entry, times["run"] = comfy.run_prompt(cheap_prompt.cheap(api_prompt), RUN_TIMEOUT)
        log = comfy.log()[log_start:]
        status = entry["status"]
        assert status.get("status_str") == "success", f"{name}: {json.dumps(status)[:4000]}\n{log[-4000:]}"
        assert "Traceback" not in log, f"{name}: the server log shows a traceback:\n{log[-4000:]}"
        # NaN/inf pixels make numpy warn when SaveImage/PreviewImage cast them to uint8
        assert "invalid value encountered" not in log, f"{name}: non-finite image values:\n{log[-4000:]}"
        times["images"] = _check_images(comfy, entry, name)
        times["result"] = "success"
    finally:
        later = NAMES[NAMES.index(name) + 1:]
        if not later or models.files_named(WORKFLOWS[later[0]]) != models.files_named(WORKFLOWS[name]):
            comfy.free()  # keep one workflow's models in memory; the next one loads its own


# Help pages (served from the pack's WEB_DIRECTORY, written separately). The frontend fetches
# /extensions/<pack folder>/docs/<NodeClass>.md for nodes of custom_nodes.<pack folder>.
def test_every_node_has_a_help_page(comfy):
    missing = []
    for node_class in PACK_CLASSES:
        try:
            status, body = comfy.request(f"/extensions/{PACK}/docs/{node_class}.md")
        except OSError as error:
            missing.append(f"{node_class}: {error}")
            continue
        if status != 200 or not body.strip():
            missing.append(f"{node_class}: HTTP {status}, {len(body)} bytes")
    assert not missing, f"help pages missing: {missing}"
