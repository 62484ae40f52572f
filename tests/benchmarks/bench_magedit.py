"""MAG-Edit: the cost of one latent-optimisation iteration vs one full UNet forward + backward.

    python tests/benchmarks/run.py --only magedit [--repeats 3]

Full-size SD1.5 at 256 px (latent 32x32), batch 1, step 0 of the official 50-step schedule
(cross- and self-attention injection both active, as in every optimised step). Variants, timed
interleaved inside one MAG-Edit sampling run (model loaded, conds processed):

- "full forward+backward": the UNet's whole forward with autograd and a backward from its output
  (the baseline the target is stated against);
- "official iteration": what the official code does per iteration: a full reconstruction forward
  (no grad), a full editing forward with autograd, backward from the loss;
- "MAG-Edit iteration": ours: the editing forward stopped after the last loss layer, backward from
  the loss, plus 1/15 of the step's one early-stopped reconstruction pass (timed separately as
  "reconstruction pass" and added). Target <= 0.7x the full forward+backward.

Peak memory is the largest increase over the variant's start: torch.cuda.max_memory_allocated on
a GPU, otherwise the process RSS sampled every millisecond (CPU allocations are not tracked by
torch). For RSS to fall when tensors are freed, glibc is told to serve large allocations with
mmap at a fixed threshold and to trim its heap before each measurement; without that, memory
freed by one variant is reused silently by the next and its increase reads as zero.
"""
import ctypes
import gc
import statistics
import threading
import time

import torch

from common import pack_module, random_conditioning, report

inversion_mod = pack_module("samplers.inversion")
magedit = pack_module("samplers.magedit")
grad_mod = pack_module("samplers.grad")

SIZE = 256
SOURCE, TARGET = "a photo of a cat sitting on a sofa", "a photo of a cat sitting on a red sofa"


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees go back to the OS
        return libc
    except (OSError, AttributeError):  # not glibc: RSS deltas may read low after the first variant
        return None


class PeakMemory:
    """Peak extra memory (bytes) while the block runs (`peak`), and the absolute peak (`total`:
    everything allocated on the GPU, weights included, or the process RSS)."""

    libc = None

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.peak = self.total = 0
        if not self.cuda and PeakMemory.libc is None:
            PeakMemory.libc = _glibc() or False

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        if PeakMemory.libc:
            PeakMemory.libc.malloc_trim(0)
        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.high = self.start
        self.running = True

        def poll():
            while self.running:
                self.high = max(self.high, self.process.memory_info().rss)
                time.sleep(0.001)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.total = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.total = max(self.high, self.process.memory_info().rss)
        self.peak = self.total - self.start
        return False


def _synthetic_inversion(model, source, negative, steps, size=SIZE):
    """An INVERSION of random latents for this model (timing needs no real image)."""
    timesteps, sigmas = inversion_mod.ddim_schedule(model.get_model_object("model_sampling"), steps)
    generator = torch.Generator().manual_seed(0)
    trajectory = torch.stack([torch.randn(1, 4, size // 8, size // 8, generator=generator) * (1 + s)
                              for s in sigmas])
    return inversion_mod.Inversion(trajectory=trajectory, timesteps=timesteps, sigmas=sigmas, null_embeddings=None,
                                   positive=source, negative=negative, cfg=7.5,
                                   fingerprint=inversion_mod.model_fingerprint(model))


def inputs(model, size=SIZE, steps=None):
    """(source, target, negative, mask, inversion) for MAG-Edit on `model` at `size` px: random
    annotated prompts and a synthetic inversion of `steps` steps (default: the official 50)."""
    context_dim = model.model.model_config.unet_config["context_dim"]
    source = random_conditioning(SOURCE, dim=context_dim, seed=1)
    target = random_conditioning(TARGET, dim=context_dim, seed=2)
    negative = random_conditioning(dim=context_dim, seed=3)
    inversion = _synthetic_inversion(model, source, negative, steps or magedit.MagEditConfig().steps, size)
    mask = torch.zeros(1, size, size)
    mask[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    return source, target, negative, mask, inversion


def measure(model, size=SIZE, repeats=3, step=0):
    """Time (medians) and peak memory of each variant at step `step`, interleaved in one MAG-Edit
    sampling run (also tests/device/run.py). Returns {"medians", "peaks" (extra bytes), "totals"
    (absolute bytes), "losses", "device" (its type), "iteration" (seconds of one of our iterations, the reconstruction
    pass's share included), "iterations"}."""
    source, target, negative, mask, inversion = inputs(model, size)
    config = magedit.MagEditConfig()
    found = {}

    def body(editor):
        import comfy.samplers

        x = editor.inversion.noise.to(editor.run.x)
        device = x.device
        target_conds = editor.run.conds["target"]

        def full_forward_backward():
            editor.controller.configure("off")
            leaf = grad_mod.leaf(x, requires_grad=True)
            grad_mod.loss_and_grad(lambda: comfy.samplers.calc_cond_batch(
                editor.run.model, [target_conds], leaf, editor.sigma(step, 1), editor.run.model_options)[0].sum(),
                [leaf])

        def official_iteration():
            editor.record_reconstruction(step, x, early_stop=False)
            return editor.loss_and_grad(step, x, early_stop=False)[0]

        def reconstruction_pass():
            editor.record_reconstruction(step, x)

        def ours():
            return editor.loss_and_grad(step, x, early_stop=True)[0]

        variants = {"full forward+backward": full_forward_backward, "official iteration": official_iteration,
                    "reconstruction pass": reconstruction_pass, "MAG-Edit iteration": ours}
        times = {name: [] for name in variants}
        peaks = {name: 0 for name in variants}
        totals = {name: 0 for name in variants}
        losses = {}
        with torch.inference_mode(False), torch.enable_grad():
            editor.record_reconstruction(step, x, early_stop=False)
            ours()  # warm-up (and the old-host in-place check of samplers/grad.py)
            for _ in range(repeats):
                for name, fn in variants.items():
                    if name == "MAG-Edit iteration":
                        editor.record_reconstruction(step, x)  # what the iteration reads (not timed)
                    with PeakMemory(device) as memory:
                        start = time.perf_counter()
                        result = fn()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - start)
                    peaks[name] = max(peaks[name], memory.peak)
                    totals[name] = max(totals[name], memory.total)
                    if result is not None:
                        losses[name] = float(result.sum())
        medians = {name: statistics.median(values) for name, values in times.items()}
        found.update(device=device.type, medians=medians, peaks=peaks, totals=totals, losses=losses,
                     iterations=config.iterations,
                     iteration=medians["MAG-Edit iteration"] + medians["reconstruction pass"] / config.iterations)
        return torch.cat([x, x])

    with torch.inference_mode():
        magedit.with_editor(model, inversion, source, target, negative, mask, "red", config, body)
    return found


def run(args, model):
    step, iterations = 0, magedit.MagEditConfig().iterations
    found = measure(model, SIZE, args.repeats, step)
    medians, losses, peaks = found["medians"], found["losses"], found["peaks"]
    shown = {"full forward+backward": medians["full forward+backward"], "MAG-Edit iteration": found["iteration"]}
    report(f"MAG-Edit optimisation iteration, SD1.5 {SIZE} px, batch 1, step {step} of "
           f"{magedit.MagEditConfig().steps}", shown, "full forward+backward", target=0.7)
    base = medians["full forward+backward"]
    print(f"  (MAG-Edit iteration = early-stopped editing forward + backward "
          f"{medians['MAG-Edit iteration']:.2f} s + 1/{iterations} of the reconstruction pass "
          f"{medians['reconstruction pass']:.2f} s)")
    print(f"  official iteration (full rec. forward + full editing forward + backward): "
          f"{medians['official iteration']:.2f} s   {medians['official iteration'] / base:5.3f}x")
    print(f"  loss: official {losses.get('official iteration'):.6f}, ours {losses.get('MAG-Edit iteration'):.6f}")
    official_step = iterations * medians["official iteration"]
    our_step = medians["reconstruction pass"] + iterations * medians["MAG-Edit iteration"]
    print(f"  one optimised step ({iterations} iterations): official {official_step:.1f} s, "
          f"ours {our_step:.1f} s ({our_step / official_step:.3f}x)")
    unit = "CUDA allocated" if found["device"] == "cuda" else "RSS"
    print(f"\n## peak extra memory ({unit}), largest over repeats")
    for name, peak in peaks.items():
        print(f"  {name:<28} {peak / 2 ** 20:9.1f} MiB")
