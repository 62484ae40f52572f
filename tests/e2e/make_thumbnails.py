"""Write workflows/<name>.jpg, the template browser's card image: the workflow's graph as the real
frontend renders it (no result image is made up).

Run on the upstream host from the repository root, after changing a workflow:

    COMFYUI_PATH=/path/to/ComfyUI python tests/e2e/make_thumbnails.py [NAME ...] [--browser-screenshot PNG]

It starts the same server and headless Chromium as the e2e tests (tests/e2e/test_e2e.py), loads
each workflow as a template, hides the menus (focus mode), fits the view to the graph and saves a
WIDTH px wide JPEG. --browser-screenshot also saves a picture of Workflow -> Browse Templates on
the pack's section.
"""
import argparse
import io
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/: ae_testlib, e2e

from ae_testlib.pack import PACK_ROOT, register_pack  # noqa: E402

register_pack()
from e2e import browser, models, server  # noqa: E402

WIDTH = 600
RENDER_WIDTH = 2400  # px of the browser window: the graph is drawn near 1:1, then scaled down
MARGIN = 16  # px of canvas kept around the graph
# the graph alone: no canvas info or zoom menu, and titles and widget text drawn at thumbnail zoom
SETTINGS = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 1}


def render(frontend, name):
    from PIL import Image

    frontend.load_template(server.PACK_FOLDER, name)
    _, _, width, height = frontend.graph_bounds()
    # a window of the graph's aspect with room for the focus-mode button in the corner
    frontend.page.set_viewport_size({"width": RENDER_WIDTH, "height": round(RENDER_WIDTH * height / width) + 120})
    x, y, w, h = frontend.fit_view()
    clip = {"x": x - MARGIN, "y": y - MARGIN, "width": w + 2 * MARGIN, "height": h + 2 * MARGIN}
    picture = Image.open(io.BytesIO(frontend.page.screenshot(clip=clip))).convert("RGB")
    picture = picture.resize((WIDTH, round(picture.height * WIDTH / picture.width)), Image.LANCZOS)
    out = PACK_ROOT / "workflows" / f"{name}.jpg"
    picture.save(out, quality=85, optimize=True)
    return out


def install_named_files(names, base):
    """The files the workflows name: input images for real, models as empty placeholders (newer
    frontends outline a loader whose model file the server lacks in red)."""
    import json

    named = set().union(*(models.files_named(json.loads((PACK_ROOT / "workflows" / f"{name}.json").read_text()))
                          for name in names))
    inputs = {name for name in named if models.BUILDERS.get(name, ("",))[0] == "input"}
    models.install(inputs, base)
    models.install_placeholders(named - inputs, base)


def screenshot_template_browser(frontend, path):
    frontend.command("Comfy.BrowseTemplates")
    frontend.page.get_by_text(server.PACK_FOLDER, exact=True).first.click()
    frontend.page.wait_for_function(
        "() => { const imgs = Array.from(document.querySelectorAll('.p-dialog img'));"
        " return imgs.length && imgs.every((i) => i.complete); }", timeout=30_000)
    frontend.page.wait_for_timeout(500)
    frontend.page.screenshot(path=str(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: all in workflows/)")
    parser.add_argument("--browser-screenshot", type=pathlib.Path, help="also save the template browser here")
    args = parser.parse_args()
    comfyui, why_not = server.upstream_host()
    if comfyui is None:
        sys.exit(why_not)
    names = args.names or sorted(p.stem for p in (PACK_ROOT / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="attention-edit-thumbnails-") as base:
        comfy = server.Server(comfyui, base, settings=SETTINGS)
        install_named_files(names, base)
        try:
            comfy.start()
            with browser.Frontend(comfy.url) as frontend:
                frontend.command("Workspace.ToggleFocusMode")
                for name in names:
                    out = render(frontend, name)
                    print(f"{out.relative_to(PACK_ROOT)}: {out.stat().st_size // 1024} KiB")
                if args.browser_screenshot:
                    frontend.page.set_viewport_size({"width": 1600, "height": 1400})  # both rows of cards
                    frontend.command("Workspace.ToggleFocusMode")
                    screenshot_template_browser(frontend, args.browser_screenshot)
                    print(f"template browser: {args.browser_screenshot}")
        finally:
            comfy.stop()


if __name__ == "__main__":
    main()
