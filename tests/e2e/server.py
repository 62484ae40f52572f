"""A real ComfyUI server for the end-to-end tests: its own base folder, the pack linked in, a log.

The server is the upstream checkout named by COMFYUI_PATH (`main.py --cpu` on 127.0.0.1 and a
free port), run by the same Python as the tests. The PyPI host has no server or frontend.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from ae_testlib import host
from ae_testlib.pack import PACK_ROOT

PACK_FOLDER = "attention-edit"  # the name users clone the pack under; the server's module name
# fresh-profile settings: no first-run template dialog, no minimap over the graph
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


def upstream_host():
    """(ComfyUI folder, None) on a host that has the server and frontend, else (None, why not)."""
    why_not = host.missing_reason(("server",))
    return (None, why_not) if why_not else (host.host_root(), None)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, comfyui_path, base_directory, settings=None):
        self.comfyui_path = pathlib.Path(comfyui_path)
        self.base = pathlib.Path(base_directory)
        self.log_path = self.base / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.settings = {**SETTINGS, **(settings or {})}  # the frontend user's comfy.settings.json

    def prepare(self):
        custom_nodes = self.base / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link = custom_nodes / PACK_FOLDER
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(self.settings))
        # a fresh user has no saved node templates; the frontend asks for the file (404 otherwise)
        (settings.parent / "comfy.templates.json").write_text("[]")

    def environment(self):
        env = dict(os.environ)
        host.import_host()
        paths = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
        torchvision = sys.modules.get("torchvision")
        if torchvision is None or str(host.STUBS) in str(getattr(torchvision, "__file__", "")):
            paths.insert(0, str(host.STUBS))  # the host's torchvision does not import: the pack's stub
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["OMP_NUM_THREADS"] = "1"  # the machine's cores are shared (design.md)
        return env

    def start(self, timeout=180):
        self.prepare()
        command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                   "--base-directory", str(self.base),
                   # the default database sits in the (read-only) checkout
                   "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=self.comfyui_path, env=self.environment(),
                                        stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get_json("/api/system_stats", timeout=2)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log_file.close()

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, path, data=None, timeout=30):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:  # 4xx/5xx: the caller asserts on the status
            return error.code, error.read()

    def get_json(self, path, timeout=30):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path}: HTTP {status}")
        return json.loads(body)

    def run_prompt(self, prompt, timeout):
        """POST /prompt, then wait on /history: (history entry, seconds)."""
        start = time.perf_counter()
        status, body = self.request("/api/prompt", {"prompt": prompt, "client_id": "attention-edit-e2e"})
        if status != 200:  # validation errors come back as 400 with details
            raise AssertionError(f"POST /prompt refused the prompt (HTTP {status}): {body.decode()[:4000]}")
        prompt_id = json.loads(body)["prompt_id"]
        while time.perf_counter() - start < timeout:
            history = self.get_json(f"/api/history/{prompt_id}")
            if prompt_id in history:  # the server records a prompt there when it has finished
                return history[prompt_id], time.perf_counter() - start
            if self.process.poll() is not None:
                raise AssertionError(f"ComfyUI died while running the prompt:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout} s")

    def view(self, image):
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.request(f"/api/view?{query}")[1]

    def free(self):
        """Ask the server's model management to unload the models (one workflow's models at a time)."""
        self.request("/api/free", {"unload_models": True, "free_memory": True})
