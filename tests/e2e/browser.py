"""The real ComfyUI frontend in headless Chromium (Debian's package) driven by Playwright.

Workflows are loaded the way the template browser loads them: fetch the JSON the server serves
under /api/workflow_templates/<pack>/<name>.json and hand it to `app.loadGraphData`.
"""
import os
import pathlib
import shutil
import tempfile

CHROMIUM = os.environ.get("ATTENTION_EDIT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
APP = "window.comfyAPI.app.app"

# Reads the loaded graph as the frontend has laid it out: boxes include the title bar.
MEASURE_JS = """() => {
  const app = %s;
  app.canvas.draw(true, true);  // one frame: the frontend computes node bounds while drawing
  const nodes = app.graph.nodes.map((n) => ({id: n.id, type: n.type, title: n.title,
      box: Array.from(n.boundingRect), pos: Array.from(n.pos), size: Array.from(n.size)}));
  const groups = app.graph.groups.map((g) => ({title: g.title, box: Array.from(g.boundingRect)}));
  return {nodes, groups};
}""" % APP


def require_browser():
    """Playwright's sync API and the Chromium binary, or an error saying what to install."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        raise RuntimeError(f"the e2e tests need Playwright from PyPI (pip install playwright): {error}") from None
    if not pathlib.Path(CHROMIUM).is_file():
        raise RuntimeError(f"the e2e tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium; "
                           "or set ATTENTION_EDIT_CHROMIUM); Playwright's own browser download cannot be used")
    return sync_playwright


class Frontend:
    """One browser page on the server's frontend; console errors and page errors are collected."""

    def __init__(self, url, viewport=(1600, 1000)):
        self.url = url
        self.viewport = viewport
        self.console_errors = []  # errors of the page and of requests to the server
        self.external_errors = []  # failed requests to other hosts (the frontend's own internet calls)

    def __enter__(self):
        sync_playwright = require_browser()
        self.profile = tempfile.mkdtemp(prefix="attention-edit-chromium-")
        self.playwright = sync_playwright().start()
        try:
            self.context = self.playwright.chromium.launch_persistent_context(
                self.profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": self.viewport[0], "height": self.viewport[1]})
            self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
            self.page.on("console", self._console)
            self.page.on("pageerror", lambda e: self.console_errors.append(f"page error: {e}"))
            self.page.goto(self.url)
            # ready once the node definitions from /object_info are registered
            self.page.wait_for_function(f"() => {APP} && {APP}.graph && {APP}.canvas && window.LiteGraph && "
                                        "Object.keys(window.LiteGraph.registered_node_types).length",
                                        timeout=120_000)
            self.page.wait_for_load_state("networkidle")  # startup requests settled before any test
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *_):
        if hasattr(self, "context"):
            self.context.close()
        self.playwright.stop()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _console(self, message):
        if message.type != "error":
            return
        url = message.location.get("url") or ""
        external = url.startswith("http") and not url.startswith(self.url)
        (self.external_errors if external else self.console_errors).append(f"{message.text} ({url})")

    def node_types(self):
        return self.page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")

    def load_template(self, pack, name):
        """Load workflows/<name>.json as the template browser does; returns the loaded graph's layout."""
        self.page.evaluate("""async ([pack, name]) => {
          const app = %s;
          const response = await fetch(`/api/workflow_templates/${pack}/${name}.json`, {cache: 'no-store'});
          if (!response.ok) throw new Error(`template ${name}: HTTP ${response.status}`);
          await app.loadGraphData(await response.json(), true, true, name);
        }""" % APP, [pack, name])
        # let the frontend size the widgets and draw a few frames
        self.page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        return self.measure()

    def measure(self):
        return self.page.evaluate(MEASURE_JS)

    def dialogs(self):
        """Texts of the dialogs and error toasts shown now (missing nodes, errors, ...)."""
        return self.page.evaluate("""() => Array.from(document.querySelectorAll(
            '.p-dialog, .p-toast-message-error, .p-toast-message-warn'))
            .filter((e) => e.offsetParent !== null || e.getClientRects().length)
            .map((e) => e.innerText.trim().slice(0, 400))""")

    def command(self, command_id):
        """Run a frontend command (menu entry) by its id, e.g. Comfy.BrowseTemplates."""
        self.page.evaluate(f"async (id) => await {APP}.extensionManager.command.execute(id)", command_id)

    def graph_bounds(self):
        """[x, y, width, height] around every node and group, in graph coordinates."""
        return self.page.evaluate("""() => {
          const app = %s;
          const boxes = [...app.graph.nodes, ...app.graph.groups].map((item) => item.boundingRect);
          const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
          const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
          return [x0, y0, x1 - x0, y1 - y0];
        }""" % APP)

    def fit_view(self, zoom=0.95):
        """Fit the canvas view to all groups and nodes (as Fit View does for nodes); returns the
        graph's box on the page, [x, y, width, height] in CSS pixels."""
        box = self.page.evaluate("""(zoom) => {
          const app = %s;
          const boxes = [...app.graph.nodes, ...app.graph.groups].map((item) => item.boundingRect);
          const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
          const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
          const ds = app.canvas.ds;
          ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom});
          app.canvas.setDirty(true, true);
          const rect = app.canvas.canvas.getBoundingClientRect();
          return [rect.left + (x0 + ds.offset[0]) * ds.scale, rect.top + (y0 + ds.offset[1]) * ds.scale,
                  (x1 - x0) * ds.scale, (y1 - y0) * ds.scale];
        }""" % APP, zoom)
        self.page.evaluate("() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))")
        return box

    def graph_to_prompt(self):
        """The frontend's own conversion: {'output': API prompt, 'workflow': UI workflow}."""
        return self.page.evaluate(f"async () => JSON.parse(JSON.stringify(await {APP}.graphToPrompt()))")
