import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from ae_testlib.pack import register_pack  # noqa: E402

register_pack()

try:  # switch ComfyUI to CPU mode before any test module imports pack code that imports comfy
    from ae_testlib import host

    host.import_host()
except ImportError:  # no ComfyUI: the pure-tensor tests still run, host tests fail loudly
    pass

pytest_plugins = ["ae_testlib.fixtures"]

import torch  # noqa: E402

# One thread: on the shared 2-core machine two threads were 4-30x slower at times (design.md).
torch.set_num_threads(1)


def pytest_report_header(config):
    from ae_testlib import host

    try:
        return f"ComfyUI host: {host.import_host()}"
    except Exception as error:  # the pure-tensor tests still run; host tests will fail loudly
        return f"ComfyUI host: not importable ({error})"


def pytest_sessionfinish(session, exitstatus):
    # Free the cached models while ComfyUI's modules are alive: upstream's ModelPatcher.__del__
    # fails noisily when it runs during interpreter shutdown.
    import gc

    from ae_testlib import fixtures

    fixtures.model.cache_clear()
    fixtures.clip.cache_clear()
    gc.collect()
