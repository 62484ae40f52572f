"""Shared benchmark plumbing: CPU setup, interleaved timing with medians, printing."""
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import torch  # noqa: E402

from ae_testlib import host  # noqa: E402
from ae_testlib.pack import pack_module  # noqa: E402,F401  (re-exported for bench modules)


def setup():
    """One thread (stable timings on a shared machine) and PyTorch SDPA attention, as a GPU
    user effectively gets; ComfyUI's CPU default (sub-quadratic) is ~5x slower."""
    torch.set_num_threads(1)
    description = host.import_host()
    import comfy.ldm.modules.attention as attention

    attention.optimized_attention = attention.attention_pytorch
    attention.optimized_attention_masked = attention.attention_pytorch
    return description


def random_conditioning(tokens_text=None, family="sd15", dim=768, seed=0):
    """[[cond, {...}]] with a random full-width text embedding; annotated with the words of
    tokens_text (tokenised by the real tokenizer) when given."""
    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, 77, dim, generator=generator)
    options = {"pooled_output": torch.randn(1, dim, generator=generator)}
    conditioning = [[cond, options]]
    if tokens_text is not None:
        tokens = pack_module("attention.tokens")
        conditioning = tokens.annotate(conditioning, pack_module("attention.text_encoders").prompt_tokens(host.build_clip(family), tokens_text))
    return conditioning


def interleaved(variants, repeats):
    """Run each variant `repeats` times, interleaved with the order reversed every other round
    (A B, B A, ...) so neither always runs second; return ({name: median seconds}, all times)."""
    times = {name: [] for name in variants}
    order = list(variants.items())
    for round_index in range(repeats):
        for name, run in (order if round_index % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            with torch.inference_mode():
                run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, times


def cpu_timed(variants):
    """{name: run} -> (the same runs, each also adding its sampling thread's CPU seconds to
    cpu[name]; cpu). torch runs on that one thread: on a shared machine its CPU time is steadier
    than wall time."""
    cpu = {name: [] for name in variants}

    def timed(name, run):
        def go():
            start = time.thread_time()
            run()
            cpu[name].append(time.thread_time() - start)
        return go

    return {name: timed(name, run) for name, run in variants.items()}, cpu


def report(title, medians, baseline, target=None):
    base = medians[baseline]
    print(f"\n## {title}")
    for name, seconds in medians.items():
        ratio = seconds / base
        flag = "" if target is None or name == baseline else (" OK" if ratio <= target else f" ABOVE {target}x")
        print(f"  {name:<28} {seconds:8.2f} s   {ratio:5.3f}x{flag}")
    sys.stdout.flush()
