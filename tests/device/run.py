"""Device run: the pack's speed, memory and parity on one CUDA GPU, where users run it.

    python tests/device/run.py --out figures.json              # one CUDA GPU, <= 8 minutes, no download
    python tests/device/run.py --cpu-smoke --out smoke.json    # tiny models on the CPU (the suite runs it)

On the GPU it builds random-weight models with the real architectures directly on the device, in
the dtype ComfyUI picks there (SD1.5 and its InstructPix2Pix variant, SDXL, Flux.1 [dev] 12B, which
is also Kontext's network; then Chroma, SD3.5 Large and Qwen-Image while the time budget lasts),
and measures, variants interleaved in one process (medians; ratios are what count):
- KSampler (Record Attention) vs KSampler: SD1.5 512 px, SDXL 1024 px, Flux 1024 px;
- InstDiffEdit vs img2img KSampler (SD1.5 512 px), FoI Sampler vs DualCFGGuider (SD1.5-IP2P
  512 px), FoI on Kontext vs its plain two-branch guidance (Flux 1024 px, a 1024 px reference);
- MAG-Edit's optimisation iteration vs a full forward + backward, and the peak memory of a
  MAG-Edit run at 512 px;
- the peak memory (torch.cuda.max_memory_allocated, weights included) of each run;
and checks parity: the pure-tensor mask chain and losses bit-exact to the CPU's
(check_cuda.py); every method node on the suite's tiny models gives the CPU's results within
TOLERANCE; the nodes in float16 and bfloat16 give no NaN; the sampled latent is bit-identical
with and without recording, on the tiny and the full-size models.

--cpu-smoke runs the same code on the suite's tiny models on the CPU (~30 s of CPU time; the "device" is
then the CPU, so parity must be exact), and checks that the GPU run's architectures have the real
models' parameter counts (built on the meta device), so this script cannot rot while no GPU is at
hand. Wan is left out: the pack does not support it yet.

Prints one line per figure ("figure NAME = VALUE  (what)"), one per check, and last one summary
line; writes every figure to --out as JSON. Exit status 0 when no section failed and every check
passed (1 otherwise, 2 without a CUDA device).
"""
import argparse
import contextlib
import gc
import json
import math
import pathlib
import sys
import time
import traceback

TESTS = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS), str(TESTS / "benchmarks"), str(TESTS / "device")]

import torch  # noqa: E402

from ae_testlib import host  # noqa: E402

# The summary line's figures, in order (record_sdxl too, beside the list).
SUMMARY = ("record_sd15", "record_sdxl", "record_flux", "instdiffedit", "foi", "foi_dit", "mag_iter",
           "mag_peak_gb")
# Parity tolerance of a GPU result against the CPU's on the same tiny float32 model: max |gpu - cpu|
# over max |cpu| per output tensor; binary masks: the fraction of pixels that differ. On the CPU
# (--cpu-smoke) both runs take the same path: exact.
TOLERANCE = {"relative": 1e-3, "mask_pixels": 0.01}
# The real models' parameter counts (their checkpoints): the GPU run's architectures must match.
REAL_PARAMS = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "flux": 11_901_408_320, "chroma": 8_899_983_424,
               "sd3": 8_056_627_520, "qwen": 20_430_401_088}
EXTRA_DIT = ("chroma", "sd3", "qwen")  # recorded after the figures, while the time budget lasts
EXTRA_DIT_S = 90  # what one of them takes on the GPU (build + 8 sampling runs at 1024 px), a guess
GB = 2 ** 30


def settings(smoke):
    """Sizes (px), steps and repeats: real models on the GPU, the suite's tiny ones in the smoke run."""
    if smoke:
        return dict(unet="tiny", dit="tiny", sd15_px=128, sdxl_px=128, dit_px=128, steps=1, dit_steps=1,
                    repeats=1, mag_px=128, mag_steps=2)
    return dict(unet="full", dit="real", sd15_px=512, sdxl_px=1024, dit_px=1024, steps=20, dit_steps=6,
                repeats=3, mag_px=512, mag_steps=6)


class Run:
    """Figures, checks and skips of one run, printed as they come."""

    def __init__(self, device, smoke, budget_s):
        self.device, self.smoke, self.budget_s = device, smoke, budget_s
        self.start = time.perf_counter()
        self.figures, self.checks, self.skipped, self.errors, self.models = {}, {}, {}, {}, {}
        self.section_s = {}  # wall seconds of each section, to size the next GPU run

    def figure(self, name, value, what):
        self.figures[name] = float(value)
        print(f"figure {name} = {value:.4g}  ({what})", flush=True)

    def check(self, name, ok, detail):
        self.checks[name] = {"ok": bool(ok), "detail": detail}
        print(f"check {name}: {'ok' if ok else 'FAIL'}  ({detail})", flush=True)

    def skip(self, name, reason):
        self.skipped[name] = reason
        print(f"skipped {name}: {reason}", flush=True)

    def elapsed(self):
        return time.perf_counter() - self.start

    def section(self, name, fn, *args):
        """Run one section; an error is recorded and the run goes on (a GPU window is short)."""
        print(f"\n## {name} (at {self.elapsed():.0f} s)", flush=True)
        start = self.elapsed()
        try:
            fn(self, *args)
        except Exception as error:  # noqa: BLE001 - reported in the JSON and the exit status
            traceback.print_exc()
            self.errors[name] = f"{type(error).__name__}: {error}"
            print(f"error in {name}: {self.errors[name]}", flush=True)
        finally:
            free()
            self.section_s[name] = round(self.elapsed() - start, 1)

    def parity(self):
        """"ok" when the parity section ran through and every check passed, else "FAIL:" and the
        failed checks (the error of a parity section that stopped: in the JSON's "errors")."""
        failed = sorted(name for name, check in self.checks.items() if not check["ok"])
        if "parity" in self.errors:
            failed.append("parity_section_error")
        if not failed and "parity" not in self.section_s:  # --only without it
            return "not_run"
        return "ok" if self.checks and not failed else "FAIL:" + ",".join(failed or ["no_checks_ran"])


def free():
    """Drop models between sections: one full-size model on the GPU at a time. ComfyUI keeps weak
    references only: once collected, nothing is left to unload (unloading a live 24 GB model would
    first copy it to the CPU)."""
    import comfy.model_management as mm

    gc.collect()
    mm.cleanup_models()
    mm.unload_all_models()  # anything still referenced: to its offload device
    mm.soft_empty_cache()
    if torch.cuda.is_available() and not host.CPU_ONLY:
        print(f"GPU memory allocated after freeing: {torch.cuda.memory_allocated() / GB:.2f} GB", flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()



def compare(run, name, variants, baseline, what, repeats):
    """Time `variants` ({label: fn -> result}) interleaved after one warm-up each on the GPU
    (kernels load, autotuning), with the device synchronised in each run and each run's peak
    memory. Records the ratio NAME, the medians NAME_s / NAME_base_s and peaks NAME_peak_gb /
    NAME_base_peak_gb; returns {label: last result} and {label: warm-up result} (None in the smoke
    run, which skips the warm-ups: seconds of CPU time, and nothing to warm up)."""
    from bench_magedit import PeakMemory
    from common import interleaved

    results, peaks = {}, {}

    def measured(label, fn):
        def go():
            with PeakMemory(run.device) as memory:
                results[label] = fn()
                sync(run.device)
            peaks[label] = max(peaks.get(label, 0), memory.total)
        return go

    timed = {label: measured(label, fn) for label, fn in variants.items()}
    warm = None
    if not run.smoke:
        warm = {}
        for label, go in timed.items():
            with torch.inference_mode():
                go()
            warm[label] = results[label]
    medians, _ = interleaved(timed, repeats)
    (method,) = [label for label in variants if label != baseline]
    run.figure(f"{name}_base_s", medians[baseline], f"{baseline}, median of {repeats}, s")
    run.figure(f"{name}_s", medians[method], f"{method}, median of {repeats}, s")
    run.figure(name, medians[method] / medians[baseline], f"{method} / {baseline}, {what}")
    run.figure(f"{name}_base_peak_gb", peaks[baseline] / GB, f"{baseline}: peak memory, GB")
    run.figure(f"{name}_peak_gb", peaks[method] / GB, f"{method}: peak memory, GB")
    return results, warm


def samples(result):
    return result["samples"] if isinstance(result, dict) else result


def check_record_identical(run, name, results, warm):
    """Recording must not change the sampled latent (bit for bit). Plain sampling is run twice to
    tell a nondeterministic kernel on this device from a change by the recorder."""
    plain, recorded = samples(results["KSampler"]), samples(results["KSampler (Record Attention)"])
    identical = torch.equal(plain, recorded)
    if warm is None:
        repeatable = "ran once"
    else:
        repeatable = "repeats bit-exactly" if torch.equal(plain, samples(warm["KSampler"])) else "differs between runs"
    detail = "latent bit-identical with and without recording" if identical else (
        f"max |diff| {float((plain.float() - recorded.float()).abs().max()):.3g}; plain sampling {repeatable} here")
    run.check(f"{name}_identical", identical, detail)


# --------------------------------------------------------------------------------------------
# Models and conditioning
# --------------------------------------------------------------------------------------------

def build_unet(run, family, ip2p=False):
    s = settings(run.smoke)
    start = time.perf_counter()
    model = host.build_model(family, ip2p=ip2p, size=s["unet"], on_device=True)
    note_model(run, f"{family}{'_ip2p' if ip2p else ''}", model, start, None if ip2p else family)
    return model


def build_dit(run, family):
    from ae_testlib import dit_host

    start = time.perf_counter()
    model = dit_host.build(family, size=settings(run.smoke)["dit"], on_device=True)
    note_model(run, family, model, start, family)
    return model


def note_model(run, name, model, start, real=None):
    """Print and keep what was built; on the GPU, check it is the real model's size."""
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    if real and not run.smoke:
        run.check(f"real_{real}", params == REAL_PARAMS[real], f"{params:,} parameters, the real model "
                                                                f"{REAL_PARAMS[real]:,}")
    dtype = str(model.model.get_dtype()).replace("torch.", "")
    cast = model.model.manual_cast_dtype
    run.models[name] = {"params": params, "dtype": dtype, "manual_cast": str(cast) if cast else None,
                        "build_s": round(time.perf_counter() - start, 2)}
    print(f"built {name}: {params / 1e6:.1f}M parameters, {dtype}"
          f"{f' (computed in {cast})' if cast else ''}, in {time.perf_counter() - start:.1f} s", flush=True)


def unet_conditioning(model, seed, text=None):
    """Random text embeddings of the UNet's context width (and SDXL's pooled width)."""
    from common import random_conditioning

    config = model.model.model_config.unet_config
    conditioning = random_conditioning(text, dim=config["context_dim"], seed=seed)
    adm = config.get("adm_in_channels")
    if adm:  # SDXL: pooled vector + 6 size embeddings of 256
        conditioning[0][1]["pooled_output"] = torch.randn(1, adm - 6 * 256,
                                                          generator=torch.Generator().manual_seed(seed))
    return conditioning


def in_width(module, *names):
    """in_features of the first of these submodules `module` has (None if it has none)."""
    for name in names:
        try:
            return module.get_submodule(name).in_features
        except AttributeError:
            continue
    return None


def dit_widths(diffusion_model):
    """(text embedding width, pooled width) a DiT takes, read from its input layers: detection
    leaves some widths to the model class's defaults (Qwen-Image's), so its config may not say.
    Flux takes CLIP-L's pooled vector, SD3 CLIP-L+G's; Chroma and Qwen-Image take none, but
    ComfyUI's Flux-based Chroma still reads one: they get 768 wide, unused."""
    text = in_width(diffusion_model, "txt_in", "context_embedder")
    return text, in_width(diffusion_model, "vector_in.in_layer", "y_embedder.mlp.0") or 768


def dit_conditioning(model, seed, n_tokens=256):
    """Random text embeddings of the DiT's widths (Flux's T5: 256 tokens) and a pooled vector."""
    width, pooled = dit_widths(model.model.diffusion_model)
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, n_tokens, width, generator=generator),
             {"pooled_output": torch.randn(1, pooled, generator=generator)}]]


def latent(channels, px, seed=None, frames=False):
    shape = (1, channels, 1, px // 8, px // 8) if frames else (1, channels, px // 8, px // 8)
    if seed is None:
        return torch.zeros(shape)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------

def record_section(run, model, key, px, steps, cfg, sampler, scheduler, positive, negative, channels=4,
                   frames=False):
    import bench_record

    variants = bench_record.variants(model, positive, negative, {"samples": latent(channels, px, frames=frames)},
                                     steps, cfg, sampler, scheduler)
    results, warm = compare(run, key, variants, "KSampler", f"{px} px, {steps} steps, cfg {cfg}",
                            settings(run.smoke)["repeats"])
    check_record_identical(run, key, results, warm)


def sd15_section(run):
    """SD1.5: recording, InstDiffEdit, MAG-Edit (one model for the three)."""
    import bench_instdiffedit
    import bench_magedit

    s = settings(run.smoke)
    model = build_unet(run, "sd15")
    positive, negative = unet_conditioning(model, 1), unet_conditioning(model, 2)
    record_section(run, model, "record_sd15", s["sd15_px"], s["steps"], 7.5, "euler", "normal", positive, negative)

    positive = unet_conditioning(model, 1, bench_instdiffedit.PROMPT)
    source = latent(4, s["sd15_px"], seed=0)
    steps = int(round(s["steps"] / bench_instdiffedit.STRENGTH))  # s["steps"] denoising steps
    variants, sigmas = bench_instdiffedit.variants(model, positive, negative, source, steps)
    compare(run, "instdiffedit", variants, "img2img KSampler",
            f"SD1.5 {s['sd15_px']} px, {len(sigmas) - 1} of {steps} steps, {bench_instdiffedit.COPIES} copies",
            s["repeats"])

    found = bench_magedit.measure(model, s["mag_px"], s["repeats"])
    run.figure("mag_iter_base_s", found["medians"]["full forward+backward"], "full forward + backward, s")
    run.figure("mag_iter_s", found["iteration"], "MAG-Edit iteration incl. its share of the reconstruction pass, s")
    run.figure("mag_iter", found["iteration"] / found["medians"]["full forward+backward"],
               f"MAG-Edit iteration / full forward + backward, SD1.5 {s['mag_px']} px")
    run.figure("mag_iter_official", found["medians"]["official iteration"] / found["medians"]["full forward+backward"],
               "the official code's iteration / full forward + backward")
    run.figure("mag_iter_peak_gb", found["totals"]["MAG-Edit iteration"] / GB, "MAG-Edit iteration: peak memory, GB")
    run.figure("mag_iter_base_peak_gb", found["totals"]["full forward+backward"] / GB,
               "full forward + backward: peak memory, GB")
    mag_run_peak(run, model, s)


def mag_run_peak(run, model, s):
    """Peak memory of a whole MAG-Edit run (reconstruction, optimised and blended steps) at
    mag_px: what a user needs; it does not grow with steps (a short schedule suffices)."""
    import bench_magedit
    from bench_magedit import PeakMemory

    magedit = bench_magedit.magedit
    steps = s["mag_steps"]
    source, target, negative, mask, inversion = bench_magedit.inputs(model, s["mag_px"], steps)
    config = magedit.MagEditConfig(steps=steps, optimized_steps=max(1, steps // 3), iterations=2,
                                   blend_steps=1)
    with PeakMemory(run.device) as memory, torch.inference_mode():
        start = time.perf_counter()
        result = magedit.mag_edit(model, inversion, source, target, negative, mask, "red", config)
        sync(run.device)
    run.figure("mag_run_s", time.perf_counter() - start, f"a {steps}-step MAG-Edit run, {s['mag_px']} px, s")
    run.figure("mag_peak_gb", memory.total / GB,
               f"MAG-Edit run at {s['mag_px']} px: peak memory, weights included, GB (goal <= 12 on a GPU)")
    run.check("mag_run_finite", bool(torch.isfinite(result.samples).all()), "MAG-Edit's edited latent is finite")


def foi_section(run):
    import bench_foi

    s = settings(run.smoke)
    model = build_unet(run, "sd15", ip2p=True)
    variants, sigmas = bench_foi.variants(model, latent(4, s["sd15_px"], seed=0), s["steps"])
    compare(run, "foi", variants, "IP2P DualCFGGuider",
            f"SD1.5-IP2P {s['sd15_px']} px, {len(sigmas) - 1} steps, 3 branches", s["repeats"])


def sdxl_section(run):
    s = settings(run.smoke)
    model = build_unet(run, "sdxl")
    positive, negative = unet_conditioning(model, 1), unet_conditioning(model, 2)
    record_section(run, model, "record_sdxl", s["sdxl_px"], s["steps"], 7.5, "euler", "normal", positive, negative)


def flux_section(run):
    """Flux.1 [dev]: recording at cfg 1, then FoI on Kontext (the same network, a reference latent)."""
    import bench_foi_dit

    s = settings(run.smoke)
    model = build_dit(run, "flux")
    n_tokens = 256 if not run.smoke else 16
    positive, negative = dit_conditioning(model, 1, n_tokens), dit_conditioning(model, 2, n_tokens)
    record_section(run, model, "record_flux", s["dit_px"], s["dit_steps"], 1.0, "euler", "simple", positive,
                   negative, channels=16)

    width, pooled = dit_widths(model.model.diffusion_model)
    ref = latent(16, s["dit_px"], seed=1)
    extra = {"guidance": 2.5, "pooled_output": torch.zeros(1, pooled)}
    positive, negative = bench_foi_dit._conds(width, n_tokens, n_tokens, ref, extra)
    steps = max(1, s["dit_steps"] // 2)  # two branches on twice the tokens: ~4x a Flux step
    variants, _ = bench_foi_dit.variants(model, positive, negative, s["dit_px"], steps, 1.5)
    compare(run, "foi_dit", variants, "same evaluations, no FoI",
            f"Flux Kontext {s['dit_px']} px + {s['dit_px']} px reference, {steps} steps, 2 branches", s["repeats"])


def extra_dit_section(run, family):
    """Recording on the other DiT families, at cfg > 1 (both branches, as users run them)."""
    s = settings(run.smoke)
    model = build_dit(run, family)
    n_tokens = {"sd3": 333, "qwen": 64}.get(family, 256) if not run.smoke else 16  # SD3: 77 + 256 T5
    positive, negative = dit_conditioning(model, 1, n_tokens), dit_conditioning(model, 2, n_tokens)
    record_section(run, model, f"record_{family}", s["dit_px"], max(1, s["dit_steps"] // 2), 3.5, "euler",
                   "simple", positive, negative, channels=16, frames=family == "qwen")


def real_architectures_section(run):
    """The GPU run's models must be the real ones: parameter counts of the real checkpoints (built on
    the meta device: no memory, no time)."""
    import comfy.model_detection

    from ae_testlib import dit_host

    counts = {}
    for family in ("sd15", "sdxl"):  # hand-written configs: also what ComfyUI detects from their weights
        model_config = host.unet_model_config(family, size="full")
        counts[family] = model_config.get_model({}, device="meta").diffusion_model
        prefix = "model.diffusion_model."
        detected = comfy.model_detection.detect_unet_config(
            {prefix + key: value for key, value in counts[family].state_dict().items()}, prefix)
        differs = {key: value for key, value in detected.items() if model_config.unet_config.get(key) != value}
        run.check(f"detected_{family}", not differs, "ComfyUI's detection reads this very config from the "
                  "weights" if not differs else f"detection differs: {differs}")
    if not host.missing_reason(dit_host.DIT_FEATURES):
        for family in dit_host.FAMILIES:
            counts[family] = dit_host.supported_config(family, "real").get_model({}, device="meta").diffusion_model
    for family, module in counts.items():
        params = sum(p.numel() for p in module.parameters())
        # the widths the GPU run's conditioning reads from these very models
        widths = "" if family in ("sd15", "sdxl") else " (text %d wide, pooled %d)" % dit_widths(module)
        run.check(f"real_{family}", params == REAL_PARAMS[family],
                  f"{params:,} parameters, the real model {REAL_PARAMS[family]:,}{widths}")


# --------------------------------------------------------------------------------------------
# Parity on the suite's tiny models
# --------------------------------------------------------------------------------------------

def tensors(value, path="out", depth=0):
    """(path, tensor) of every tensor in a node's output (dicts, lists, dataclasses)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif depth > 4 or isinstance(value, (str, bytes, int, float, torch.nn.Module)) or value is None:
        return
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensors(item, f"{path}[{index}]", depth + 1)
    elif hasattr(value, "__dict__") and not callable(value):
        yield from tensors(vars(value), path, depth + 1)


def tiny_models(device, dtype=None):
    """The suite's tiny models by kind, built afresh for sampling on `device` (ComfyUI moves the
    weights there when it loads them, as a user's checkpoint). Their seeded init gives the very
    weights the suite samples with (float32), or the same models computed in `dtype`."""
    import comfy.model_patcher

    from ae_testlib import dit_host

    models = {"sd15": host.build_model("sd15", dtype=dtype), "ip2p": host.build_model("sd15", ip2p=True, dtype=dtype)}
    if not host.missing_reason(dit_host.DIT_FEATURES):
        models["flux"] = dit_host.build("flux", dtype=dtype)
    return {kind: comfy.model_patcher.ModelPatcher(model.model, load_device=device, offload_device=torch.device("cpu"))
            for kind, model in models.items()}


def same_weights(first, second):
    """Whether two models by kind hold bit-identical weights."""
    def weights(model):
        return model.model.state_dict().values()

    return all(len(weights(first[kind])) == len(weights(second[kind]))
               and all(torch.equal(a, b) for a, b in zip(weights(first[kind]), weights(second[kind])))
               for kind in first)


def node_runs(models):
    """Run every method node once on `models`; {name: outputs}. The inputs are the suite's
    (tests/node_calls.py), the model swapped in."""
    import node_calls as nc

    from ae_testlib import dit_host, dit_text
    from ae_testlib.pack import pack_module

    outputs = {}
    for name, key, kind in (("record", "AttentionEditKSamplerRecord", "sd15"),
                            ("instdiffedit", "AttentionEditInstDiffEdit", "sd15"),
                            ("foi", "AttentionEditFoISampler", "ip2p"),
                            ("inversion", "AttentionEditInversion", "sd15")):
        outputs[name] = nc.call(key, **nc.inputs(key, model=models[kind]))
    outputs["ksampler"] = plain_ksampler(nc.record_inputs(model=models["sd15"]))
    outputs["mag_edit"] = nc.call("AttentionEditMAGEdit", **nc.inputs(
        "AttentionEditMAGEdit", model=models["sd15"], inversion=outputs["inversion"][0]))
    if "flux" in models:  # the DiT paths: joint-attention recording, InstDiffEdit, FoI on Kontext
        flux = models["flux"]
        tokens = pack_module("attention.text_encoders").prompt_tokens(dit_text.build_dit_clip("flux"), nc.TARGET)
        positive = dit_host.conditioning(tokens.n_tokens, 1, tokens=tokens)
        negative = dit_host.conditioning(tokens.n_tokens, 2)
        source = {"samples": torch.randn(1, 16, 12, 16, generator=torch.Generator().manual_seed(4))}
        record_flux = nc.record_inputs(model=flux, positive=positive, negative=negative, latent_image=source,
                                       cfg=1.0, scheduler="simple")
        outputs["record_flux"] = nc.call("AttentionEditKSamplerRecord", **record_flux)
        outputs["ksampler_flux"] = plain_ksampler(record_flux)
        outputs["instdiffedit_flux"] = nc.call("AttentionEditInstDiffEdit", **nc.inputs(
            "AttentionEditInstDiffEdit", model=flux, positive=positive, negative=negative, source=source, cfg=1.0,
            sampler_name="euler", scheduler="simple"))
        outputs["foi_dit"] = nc.call("AttentionEditFoIDiTSampler", **nc.inputs("AttentionEditFoIDiTSampler",
                                                                                model=flux))
    return outputs


def plain_ksampler(inputs):
    """KSampler on KSampler (Record Attention)'s inputs: the latent the recording must match."""
    from ae_testlib.pack import pack_module

    common = pack_module("samplers.common")
    i = inputs
    sigmas = common.schedule(i["model"], i["steps"], i["sampler_name"], i["scheduler"], i["denoise"])
    with torch.inference_mode():
        return common.ksample(i["model"], i["seed"], i["steps"], i["cfg"], i["sampler_name"], i["scheduler"],
                              i["positive"], i["negative"], i["latent_image"], sigmas, denoise=i["denoise"])


def deviation(reference, other):
    """How far `other` (a device result) is from `reference` (the CPU's): (kind, value), kind
    "relative" (max |diff| / max |cpu|) or, for a binary mask, "mask_pixels" (the share of pixels
    that differ: a threshold may flip a few); ("shape", inf) when they do not even match."""
    other = other.detach().cpu()
    if reference.shape != other.shape or reference.dtype != other.dtype:
        return "shape", math.inf
    if torch.equal(reference, other):
        return "relative", 0.0
    diff = (reference.double() - other.double()).abs()
    if reference.dtype.is_floating_point and set(reference.unique().tolist()) <= {0.0, 1.0}:
        return "mask_pixels", float((diff > 0.5).double().mean())
    return "relative", float(diff.max() / reference.double().abs().max().clamp(min=1e-12))


@contextlib.contextmanager
def strict_float32():
    """Float32 parity without TF32 (cuDNN's default for convolutions on Ampere and newer GPUs),
    which rounds to 10 mantissa bits: the check is about the pack's code on the device."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def parity_section(run):
    """Each node on the tiny models: the device against the CPU (float32), no NaN in half precision,
    recording leaves the latent bit-identical; the pure-tensor chain via check_cuda.py."""
    import check_cuda

    # on the CPU both runs take the same path: bit-exact; on a GPU within TOLERANCE
    tolerance = {kind: 0.0 for kind in TOLERANCE} if run.device.type == "cpu" else TOLERANCE
    reference, models = tiny_models(torch.device("cpu")), tiny_models(run.device)
    run.check("same_weights", same_weights(reference, models), "the tiny models on the CPU and on "
              f"{run.device.type} are built with bit-identical weights")
    with strict_float32():
        expected = node_runs(reference)  # the suite's results: these models on the CPU
        got = node_runs(models)
    worst = {kind: 0.0 for kind in TOLERANCE}
    for name in expected:
        pairs = list(zip(tensors(expected[name]), tensors(got[name])))
        problems = []
        for (path, a), (_, b) in pairs:
            kind, value = deviation(a, b)
            worst[kind] = max(worst.get(kind, 0.0), value)
            if value > tolerance.get(kind, 0.0):
                problems.append(f"{path}: {kind} {value:.3g}")
        if len(list(tensors(expected[name]))) != len(pairs) or len(list(tensors(got[name]))) != len(pairs):
            problems.append("different outputs")
        run.check(f"node_{name}", pairs and not problems, "; ".join(problems[:3]) or
                  f"{len(pairs)} tensors on {run.device.type} as on the CPU, within {json.dumps(tolerance)}")
    run.figure("parity_max_relative", worst["relative"], "largest relative deviation of a node output from the CPU's")
    run.figure("parity_max_mask_pixels", worst["mask_pixels"], "largest share of mask pixels that differ")
    for plain, recorded in (("ksampler", "record"), ("ksampler_flux", "record_flux")):
        if plain in got:
            same = torch.equal(samples(got[plain]), samples(got[recorded][0]))
            run.check(f"{recorded}_identical_tiny", same, f"{recorded}'s latent vs plain KSampler on "
                      f"{run.device.type}: {'bit-identical' if same else 'DIFFERENT'}")

    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        try:
            outputs = node_runs(tiny_models(run.device, dtype))
        except Exception as error:  # noqa: BLE001 - a node refusing NaN (check_finite) lands here
            run.check(f"no_nan_{name}", False, f"{type(error).__name__}: {error}")
            continue
        bad = [f"{node}{path}" for node, out in outputs.items() for path, t in tensors(out)
               if t.dtype.is_floating_point and not torch.isfinite(t).all()]
        run.check(f"no_nan_{name}", not bad, ", ".join(bad[:5]) or f"{len(outputs)} node runs in {name}, all finite")

    failures = check_cuda.check_instdiffedit(run.device) + check_cuda.check_magedit(run.device)
    run.check("pure_tensor", not failures, "; ".join(failures[:3]) or
              "InstDiffEdit mask chain bit-exact, MAG-Edit losses within 1e-12 (check_cuda.py)")


# --------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="device_figures.json", help="JSON file for every figure")
    parser.add_argument("--cpu-smoke", action="store_true", help="the suite's tiny models on the CPU (~30 s of CPU time)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget: the extra DiT families run only while it lasts")
    parser.add_argument("--only", default="", help="comma-separated sections: parity, sd15, foi, sdxl, "
                                                   "flux, extra; real (the smoke run's meta-device check)")
    args = parser.parse_args(argv)
    host.CPU_ONLY = args.cpu_smoke  # before ComfyUI's first import: it picks its device then
    description = host.import_host()
    if args.cpu_smoke:
        torch.set_num_threads(1)  # a shared machine: one thread times steadily (design.md)
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device here: run with --cpu-smoke, or on a machine with a GPU")
            return 2
        import comfy.model_management as mm

        device = mm.get_torch_device()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # one line per figure, no progress bars between them
    run = Run(device, args.cpu_smoke, args.budget_s)
    print(f"host: {description}; torch {torch.__version__}; device: "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (smoke run)'}", flush=True)

    from ae_testlib import dit_host

    dit_missing = host.missing_reason(dit_host.DIT_FEATURES)
    only = {name.strip() for name in args.only.split(",") if name.strip()}
    sections = [("parity", parity_section), ("sd15", sd15_section), ("foi", foi_section),
                ("sdxl", sdxl_section), ("flux", flux_section)]
    if run.smoke:
        sections.insert(0, ("real architectures", real_architectures_section))
    for name, fn in sections:
        if only and name.split()[0] not in only:
            continue
        if name == "flux" and dit_missing:
            run.skip("record_flux, foi_dit", dit_missing)
            continue
        run.section(name, fn)
    for family in EXTRA_DIT:
        if only and "extra" not in only:
            break
        if dit_missing:
            run.skip(f"record_{family}", dit_missing)
        elif run.elapsed() + EXTRA_DIT_S > run.budget_s:
            run.skip(f"record_{family}", f"time budget: {run.elapsed():.0f} of {run.budget_s:.0f} s used")
        else:
            run.section(f"record on {family}", extra_dit_section, family)

    parity = run.parity()
    wall = run.elapsed()
    report = {"mode": "cpu-smoke" if run.smoke else "gpu", "device": str(device), "host": description,
              "torch": torch.__version__, "wall_s": round(wall, 1), "budget_s": run.budget_s,
              "tolerance": TOLERANCE, "figures": run.figures, "checks": run.checks, "skipped": run.skipped,
              "errors": run.errors, "models": run.models, "section_s": run.section_s, "parity": parity}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1))
    shown = " ".join(f"{name}={run.figures[name]:.3f}" if name in run.figures else f"{name}=missing"
                     for name in SUMMARY)
    print(f"\nwrote {args.out} in {wall:.1f} s" + (f"; errors in: {', '.join(run.errors)}" if run.errors else ""))
    print(f"{shown} parity={parity}")
    return 0 if parity in ("ok", "not_run") and not run.errors else 1


if __name__ == "__main__":
    sys.exit(main())
