"""The suite's one way to skip (ae_testlib.host.requires) and the rule that nothing else skips."""
import subprocess
import sys

import pytest

from ae_testlib import host
from ae_testlib.pack import PACK_ROOT

CONFTEST = '''
import importlib.util
spec = importlib.util.spec_from_file_location("suite_conftest", {path!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
globals().update({{name: value for name, value in vars(suite).items() if name.startswith("pytest_")}})
'''
PROBE = '''
import pytest
from ae_testlib import host

def test_plain_skip():
    pytest.skip("no data here")

@pytest.mark.skipif(True, reason="a file is missing")
def test_skipif():
    pass

@host.requires("server")
def test_needs_server():
    assert host.has("server")
'''
MODULE_SKIP = '''
import pytest
pytest.skip("no data here", allow_module_level=True)

def test_never_collected():
    pass
'''
MODULE_NEEDS_SERVER = '''
from ae_testlib import host
host.module_requires("server")
import comfyui_frontend_package  # noqa: E402  (only importable where the feature exists)

def test_server_module():
    assert comfyui_frontend_package.__path__
'''


def test_only_a_too_old_host_may_skip(tmp_path):
    # A throwaway test folder whose conftest is the suite's own, run in a fresh pytest.
    (tmp_path / "conftest.py").write_text(CONFTEST.format(path=str(PACK_ROOT / "tests" / "conftest.py")))
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "test_probe_module.py").write_text(MODULE_SKIP)
    (tmp_path / "test_probe_server_module.py").write_text(MODULE_NEEDS_SERVER)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                           "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = done.stdout
    assert done.returncode == 1, out
    assert "FAILED test_probe.py::test_plain_skip" in out, out
    assert "ERROR test_probe.py::test_skipif" in out, out  # a skip at setup fails the setup
    assert "ERROR test_probe_module.py" in out, out  # a module-level skip fails collection
    assert "the only allowed skip is a test needing a newer host" in out, out
    if host.has("server"):
        assert "PASSED test_probe.py::test_needs_server" in out, out
        assert "PASSED test_probe_server_module.py::test_server_module" in out, out
    else:
        assert "2 skipped" in out and host.missing_reason(["server"]) in out, out


def test_skip_reasons_and_the_newest_host():
    for name, (what, _) in host.FEATURES.items():
        reason = host.missing_reason([name])
        if host.has(name):
            assert reason is None
        else:
            assert what in reason and host.NEWER_HOST in reason and host.import_host() in reason
    # On the newest host nothing may skip: a feature spec with a typo would skip its tests forever.
    if host.import_host().startswith("upstream ComfyUI 0.19.3 "):
        assert [name for name in host.FEATURES if not host.has(name)] == []


def test_unknown_feature_is_an_error():
    with pytest.raises(ValueError, match="unknown feature"):
        host.requires("no_such_feature")
    with pytest.raises(ValueError, match="unknown feature"):
        host.requires()
