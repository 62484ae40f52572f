import pathlib
import sys

import pytest

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
        lines = [f"ComfyUI host: {host.import_host()}"]
    except Exception as error:  # the pure-tensor tests still run; host tests will fail loudly
        return f"ComfyUI host: not importable ({error})"
    missing = [name for name in host.FEATURES if not host.has(name)]
    lines.append("host features missing (tests needing them skip): " + (", ".join(missing) or "none"))
    return lines


def pytest_configure(config):
    config.addinivalue_line("markers", "host_requires(*features): needs these ae_testlib.host.FEATURES; "
                                       "use ae_testlib.host.requires(...)")


def pytest_runtest_setup(item):
    from ae_testlib import host

    for marker in item.iter_markers("host_requires"):
        reason = host.missing_reason(marker.args)
        if reason:
            pytest.skip(reason)


# The only allowed skip is a too-old host (ae_testlib.host.requires / module_requires): any other
# skip fails, so a missing file, device or package cannot quietly turn a check off.
ONLY_HOST_SKIPS = ("the only allowed skip is a test needing a newer host (ae_testlib.host.requires); "
                   "make the check run here or fail")


def _fail_other_skips(report):
    from ae_testlib import host

    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not host.is_host_skip(reason):
        report.outcome = "failed"
        report.longrepr = f"skipped ({reason}), but {ONLY_HOST_SKIPS}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _fail_other_skips((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _fail_other_skips((yield).get_result())


def pytest_sessionfinish(session, exitstatus):
    # Free the cached models while ComfyUI's modules are alive: upstream's ModelPatcher.__del__
    # fails noisily when it runs during interpreter shutdown.
    import gc

    from ae_testlib import fixtures

    fixtures.model.cache_clear()
    fixtures.clip.cache_clear()
    gc.collect()
