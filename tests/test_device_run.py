"""tests/device/run.py --cpu-smoke: the GPU device run's own code on the suite's tiny models on the
CPU, so the script cannot rot while no GPU is at hand (the GPU run: README, "Device check").

It runs as a subprocess, as a user runs it: it picks ComfyUI's device itself (CPU mode here), and
its sampling must not share state with the rest of the suite."""
import json
import math
import os
import pathlib
import re
import subprocess
import sys

RUN = pathlib.Path(__file__).resolve().parent / "device" / "run.py"
# The summary figures (and SDXL's recording), each a computed, finite number.
UNET_FIGURES = ("record_sd15", "record_sdxl", "instdiffedit", "foi", "mag_iter", "mag_peak_gb")
DIT_FIGURES = ("record_flux", "foi_dit")
PER_COMPARISON = ("", "_s", "_base_s", "_peak_gb", "_base_peak_gb")  # ratio, medians, peaks


def test_cpu_smoke_run(tmp_path):
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(RUN), "--cpu-smoke", "--out", str(out)], capture_output=True,
                            text=True, timeout=600, env=dict(os.environ), cwd=tmp_path)
    tail = result.stdout[-6000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail

    summary = result.stdout.strip().splitlines()[-1]
    pattern = " ".join(rf"{name}=\d+\.\d+" for name in ("record_sd15", "record_sdxl", "record_flux", "instdiffedit",
                                                          "foi", "foi_dit", "mag_iter", "mag_peak_gb"))
    assert re.fullmatch(pattern + " parity=ok", summary), summary

    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["parity"] == "ok" and not report["errors"], report["errors"]
    figures = report["figures"]
    wanted = [name + suffix for name in UNET_FIGURES + DIT_FIGURES
              if name not in ("mag_iter", "mag_peak_gb") for suffix in PER_COMPARISON]
    wanted += ["mag_iter", "mag_iter_s", "mag_iter_base_s", "mag_peak_gb", "mag_iter_peak_gb"]
    wanted += [f"record_{family}" for family in ("chroma", "sd3", "qwen")]
    missing = [name for name in wanted if name not in figures]
    assert not missing, f"figures missing from the JSON: {missing}"
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in figures.values()), figures
    assert all(figures[name] > 0 for name in wanted), figures

    checks = report["checks"]
    assert checks and all(check["ok"] for check in checks.values()), checks
    expected_checks = ["node_record", "node_instdiffedit", "node_foi", "node_inversion", "node_mag_edit",
                       "no_nan_float16", "no_nan_bfloat16", "pure_tensor", "record_identical_tiny",
                       "record_sd15_identical", "record_sdxl_identical", "real_sd15", "real_sdxl", "detected_sd15",
                       "detected_sdxl", "same_weights", "node_record_flux", "node_instdiffedit_flux", "node_foi_dit",
                       "record_flux_identical_tiny", "record_flux_identical", "real_flux", "real_qwen"]
    assert not [name for name in expected_checks if name not in checks], sorted(checks)
    # one printed line per figure and per check
    for name in figures:
        assert f"figure {name} = " in result.stdout
    for name in checks:
        assert f"check {name}: ok" in result.stdout
