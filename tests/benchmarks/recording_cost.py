"""The DiT recording benchmarks' shared run (bench_dit_record, bench_wan_record,
bench_z_image_record): plain sampling and KSampler (Record Attention) alternate (common.interleaved),
medians of wall time and of the sampling thread's CPU time (common.cpu_timed: torch runs on that
one thread, whose CPU time is steadier than wall time on a shared machine) are compared with the
≤ 1.05x target, and the peak memory rise over each run (bench_magedit.PeakMemory) with plain's.
"""
import statistics

import torch

from bench_magedit import PeakMemory
from common import cpu_timed, interleaved, pack_module, report

record = pack_module("samplers.record")
common = pack_module("samplers.common")

LABELS = {"text": "recording (text keys)", "joint": "recording (joint)"}


def compare(title, model, positive, negative, latent, steps, repeats, normalisations=("text",)):
    """Time plain sampling against recording with each of `normalisations` (cfg 1, euler, simple);
    prints the tables and returns ({name: wall median}, {name: CPU median}, {name: peak rise})."""
    sigmas = common.schedule(model, steps, "euler", "simple", 1.0)
    peaks = {}

    def peak_of(name, function):
        def go():
            with PeakMemory(torch.device("cpu")) as memory:
                function()
            peaks[name] = max(peaks.get(name, 0), memory.peak)
        return go

    def plain():
        common.ksample(model, 0, steps, 1.0, "euler", "simple", positive, negative, latent, sigmas)

    def recording(normalise):
        return lambda: record.sample_recording(model, 0, steps, 1.0, "euler", "simple", positive, negative,
                                               latent, normalise=normalise)

    runs = {"plain sampling": plain, **{LABELS[n]: recording(n) for n in normalisations}}
    variants, cpu = cpu_timed({name: peak_of(name, run) for name, run in runs.items()})
    medians, times = interleaved(variants, repeats)
    report(title, medians, "plain sampling", target=1.05)
    for name, values in times.items():
        print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")
    cpu_medians = {n: statistics.median(v) for n, v in cpu.items()}
    report("same runs, CPU time of the sampling thread", cpu_medians, "plain sampling", target=1.05)
    for name, values in cpu.items():
        print(f"  {name:<28} runs: {', '.join(f'{v:.2f}' for v in values)} s")
    base = peaks["plain sampling"]
    print("  peak RSS rise: " + ", ".join(f"{n} {p / 2 ** 20:.0f} MiB" for n, p in peaks.items())
          + "; extra over plain: " + ", ".join(f"{n} {(p - base) / max(base, 1):+.1%}"
                                                for n, p in peaks.items() if n != "plain sampling"))
    return medians, cpu_medians, peaks
