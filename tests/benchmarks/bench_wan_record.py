"""Recording on Wan video: KSampler (Record Attention) vs plain sampling on a full-width Wan 2.1 1.3B
block (dim 1536, 12 heads of 128, FFN 8960, umT5 context 512 x 4096 with 20 real tokens), random
weights, CPU, PyTorch attention, cfg 1. Default 480 x 832, 33 frames: latent 9 x 60 x 104, 14040
video tokens. Plain and recording runs alternate; medians of wall time and of the sampling
thread's CPU time; peak memory is the largest RSS rise over a run (bench_magedit.PeakMemory).
"""
import statistics
import time

import torch

from bench_magedit import PeakMemory
from common import interleaved, pack_module, report
from ae_testlib import wan_host

record = pack_module("samplers.record")
common = pack_module("samplers.common")

OWN_MODEL = True  # run.py: this benchmark builds its own model
REAL_TOKENS = 20


def _conditioning(seed):
    generator = torch.Generator().manual_seed(seed)
    cond = torch.zeros(1, wan_host.TEXT_LEN, 4096)
    cond[:, :REAL_TOKENS] = torch.randn(1, REAL_TOKENS, 4096, generator=generator)  # padding zeroed, as umT5's
    return [[cond, {}]]


def run(args, model=None):
    from comfy.ldm.modules import attention
    from comfy.ldm.wan import model as wan_model

    wan_model.optimized_attention = attention.attention_pytorch  # bound at import, as setup() does globally
    start = time.perf_counter()
    model = model or wan_host.build("wan21", size="full")
    print(f"built one full-width Wan 1.3B block in {time.perf_counter() - start:.1f} s")
    positive, negative = _conditioning(1), _conditioning(2)
    height, width, frames = (int(v) for v in args.wan_size.split("x"))
    latent = {"samples": torch.zeros(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)}
    steps = args.dit_steps
    sigmas = common.schedule(model, steps, "euler", "simple", 1.0)
    peaks, cpu = {}, {}

    def measured(name, function):
        def go():
            begin = time.thread_time()
            with PeakMemory(torch.device("cpu")) as memory:
                function()
            cpu.setdefault(name, []).append(time.thread_time() - begin)
            peaks[name] = max(peaks.get(name, 0), memory.peak)
        return go

    def plain():
        with torch.inference_mode():
            common.ksample(model, 0, steps, 1.0, "euler", "simple", positive, negative, latent, sigmas)

    def recording():
        with torch.inference_mode():
            record.sample_recording(model, 0, steps, 1.0, "euler", "simple", positive, negative, latent)

    variants = {"plain sampling": measured("plain sampling", plain),
                "recording (text keys)": measured("recording (text keys)", recording)}
    medians, runs = interleaved(variants, args.repeats)
    title = f"Wan recording, one full-width 1.3B block, {height}x{width}, {frames} frames, {steps} step(s), cfg 1"
    report(title, medians, "plain sampling", target=1.05)
    for name, values in runs.items():
        print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")
    report("same runs, CPU time of the sampling thread", {n: statistics.median(v) for n, v in cpu.items()},
           "plain sampling", target=1.05)
    base = peaks["plain sampling"]
    print("  peak RSS rise: " + ", ".join(f"{n} {p / 2 ** 20:.0f} MiB" for n, p in peaks.items())
          + "; extra over plain: " + ", ".join(f"{n} {(p - base) / max(base, 1):+.1%}"
                                                for n, p in peaks.items() if n != "plain sampling"))
