"""InstDiffEdit on DiTs: which start map finds a planted word (docs/instdiffedit.md, "DiT models").

Tiny-width models at the released block counts (Flux 19 + 38, SD3 24, Qwen-Image 60, Z-Image 30, Flux.2
[dev] 8 + 48), weight
seeds 0..N-1, conditioning from ComfyUI's own tokenizers and text-encoder classes (tiny random
encoders, ae_testlib.dit_text; Flux.2: Mistral with mistral-common's tekken file), a 24 x 34 latent (12 x 17
tokens; Flux.2, patch 1: a 12 x 17 latent), batch 2 with a different
region per image, "cat" planted on it by a logit bias (`bias`, the attention-mask argument) or
by editing q and k (`qk`), +beta logits; `--noise` adds a fixed N(0, std) logit per (image token,
text token). Candidate "textmass": 1 - the text's share of the joint row. 3 copies, 4 of 8 euler steps, cfg 1. For each start-map
candidate: right object-word picks out of (seeds x 2 images) and the final mask's IoU with the
region at latent size (min / mean).

    python tests/benchmarks/measure_instdiffedit_dit.py --family sd3 --seeds 4 --betas 2,4,8
    python tests/benchmarks/measure_instdiffedit_dit.py --family flux --words 125 --candidates end
    python tests/benchmarks/measure_instdiffedit_dit.py --family zimage --candidates first,open,end,noword
    python tests/benchmarks/measure_instdiffedit_dit.py --family hunyuan_image --candidates end,noword
    python tests/benchmarks/measure_instdiffedit_dit.py --family flux2 --candidates start,end,system,noword

HunyuanImage 2.1 (20 + 40 blocks, patch 1) runs on a 12 x 17 latent: the same 12 x 17 token grid.
"""
import argparse
import dataclasses
import statistics

import torch

from common import pack_module, setup

PROMPT = "a photo of a cat on grass"
FILLER = "with some more words about the weather on a quiet day in the old town and"
HEIGHT, WIDTH, COPIES = 24, 34, 3


def long_prompt(words):
    """PROMPT followed by filler words up to `words` words (item 3 of issue 21: long prompts)."""
    filler = (FILLER.split() * (words // len(FILLER.split()) + 1))
    extra = max(0, words - len(PROMPT.split()))
    return " ".join(PROMPT.split() + filler[:extra])


def candidates(tokens):
    """Start-map candidates: token columns standing in for CLIP's start token."""
    worded = {p for word in tokens.words for p in word.positions}
    last = max(worded)
    first = min(worded)
    return {
        "start": [i for i, s in enumerate(tokens.token_strings) if s in ("<start>", "<s>")][:1],
        "end": [i for i in range(last + 1, tokens.n_tokens) if i not in worded],
        "system": [i for i in range(1, first)],  # Flux.2 [dev]: the system prompt's template tokens
        "noword": [i for i in range(tokens.n_tokens) if i not in worded],
        # a chat template's tokens before the prompt (Qwen3: "<|im_start|>", "user", "\n"): like
        # CLIP's start token a causal encoder gives them the same vectors whatever the prompt
        "open": list(range(first)),
        "first": [0] if 0 not in worded else [],
    }


def encoded(clip, text, tokens_mod, tokens):
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    extra = {"pooled_output": pooled}
    if tokens is not None:
        extra[tokens_mod.ANNOTATION_KEY] = tokens
    return [[cond, extra]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", default="sd3", choices=("flux", "sd3", "qwen", "zimage", "hunyuan_image", "flux2"))
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--betas", default="2,4,8")
    parser.add_argument("--modes", default="bias,qk")
    parser.add_argument("--candidates", default="start,end,noword")
    parser.add_argument("--words", type=int, default=0, help="lengthen the prompt to this many words")
    parser.add_argument("--noise", default="0", help="per-token logit noise std(s), dit_plant.plant")
    parser.add_argument("--shallow", action="store_true", help="2 blocks instead of the real count")
    args = parser.parse_args()
    setup()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    from ae_testlib import dit_host, dit_plant, dit_text

    ide = pack_module("samplers.instdiffedit")
    capture_mod = pack_module("samplers.instdiffedit_capture")
    tokens_mod = pack_module("attention.tokens")
    text_encoders = pack_module("attention.text_encoders")
    encoder = {"qwen": "qwen_image", "zimage": "z_image"}.get(args.family, args.family)
    clip = dit_text.build_dit_clip(encoder)
    text = long_prompt(args.words) if args.words else PROMPT
    tokens = text_encoders.prompt_tokens(clip, text)
    with torch.inference_mode():
        positive = encoded(clip, text, tokens_mod, tokens)
        negative = encoded(clip, "", tokens_mod, None)
    cat = [tokens_mod.normalise_word(w.text) for w in tokens.words].index("cat") + 1
    columns = candidates(tokens)
    print(f"{args.family}: {tokens.n_tokens} text tokens, {len(tokens.words)} words; start-map columns "
          + ", ".join(f"{name} {len(cols)}" for name, cols in columns.items()))
    patch = 1 if args.family in ("flux2", "hunyuan_image") else 2  # Flux.2, HunyuanImage: a token per latent cell
    lat_h, lat_w = (HEIGHT // 2, WIDTH // 2) if patch == 1 else (HEIGHT, WIDTH)  # the same token grid
    grid = ((lat_h + patch - 1) // patch, (lat_w + patch - 1) // patch)
    regions = torch.stack([dit_plant.region_mask(grid, slice(2, 8), slice(3, 9)),
                           dit_plant.region_mask(grid, slice(5, 11), slice(grid[1] // 2 - 1, grid[1] - 2))])
    expected = regions.repeat_interleave(patch, -2).repeat_interleave(patch, -1)[..., :lat_h, :lat_w]
    channels = {"flux2": 128, "hunyuan_image": 64}.get(args.family, 16)
    source = {"samples": torch.randn(2, channels, lat_h, lat_w, generator=torch.Generator().manual_seed(0))}
    if args.family == "qwen":
        source = {"samples": source["samples"][:, :, None]}
    width = positive[0][0].shape[-1]
    pooled = positive[0][1]["pooled_output"]
    original, family_of = capture_mod.start_columns, capture_mod.dit_family
    results = {}
    for seed in range(args.seeds):
        family, variant = ("flux", "flux2") if args.family == "flux2" else (args.family, None)
        model = dit_host.build(family, seed, variant=variant, real_depth=not args.shallow, context_dim=width,
                               pooled_dim=None if pooled is None or variant else pooled.shape[-1])
        for mode in args.modes.split(","):
            for beta, noise in ((float(b), float(n)) for b in args.betas.split(",") for n in args.noise.split(",")):
                planted = dit_plant.plant(model, regions.repeat_interleave(COPIES, 0), tokens.positions("cat"),
                                          beta=beta, mode=mode, noise=noise, noise_seed=seed)
                for name in args.candidates.split(","):
                    capture_mod.start_columns = (lambda cols: (lambda _tokens: cols))(columns.get(name))
                    # "textmass": 1 - the text's share of the joint row (HunyuanImage's default)
                    start_map = "text_mass" if name == "textmass" else "no_word"
                    capture_mod.dit_family = lambda m, start_map=start_map: dataclasses.replace(
                        family_of(m), start_map=start_map)
                    try:
                        with torch.inference_mode():
                            result = ide.sample_instdiffedit(planted, positive, negative, source, 1, steps=8,
                                                             strength=0.5, cfg=1.0, sampler_name="euler",
                                                             scheduler="normal", copies=COPIES)
                    finally:
                        capture_mod.start_columns, capture_mod.dit_family = original, family_of
                    row = results.setdefault((mode, noise, beta, name), [])
                    for image in range(2):
                        row.append((int(result.index[image]) == cat,
                                    dit_plant.iou(result.mask[image], expected[image])))
        print(f"seeds 0-{seed}:", flush=True)
        report(results, 2 * (seed + 1))


def report(results, n):
    print("| planting | noise | beta | start map | word | IoU min / mean |")
    for (mode, noise, beta, name), row in sorted(results.items()):
        ious = [iou for _, iou in row]
        print(f"| {mode} | {noise:g} | {beta:g} | {name} | {sum(w for w, _ in row)}/{n} | "
              f"{min(ious):.2f} / {statistics.mean(ious):.2f} |", flush=True)


if __name__ == "__main__":
    main()
