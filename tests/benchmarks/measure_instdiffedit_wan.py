"""InstDiffEdit on Wan video: which start map finds a planted word on umT5 (docs/instdiffedit.md,
"Wan video"; docs/video.md).

Tiny-width Wan 2.1 / 2.2 5B models at the released 30 blocks (default recorded blocks 24-28),
weight seeds 0..N-1, the umT5 layout (6 words, '</s>', zeroed padding to 512: test_wan_record's),
3 latent frames x 16 x 20 tokens (a 32 x 40 latent), batch 2 with a different region per video
moving from frame to frame (test_wan_record.moving_region), "cat" planted +beta logits on its
video's region in the text cross-attention (wan_host.plant; optional per-token logit noise),
2 copies, 4 of 8 euler steps, cfg 1. For each start-map candidate: right "cat" picks out of
(seeds x 2 videos x 3 latent frames) and the final per-decoded-frame MASK's IoU (min / mean).

Candidates (umT5 has no start token; the tokens of no word are '</s>' and the zeroed padding):
- noword: mean over every token of no word ('</s>' + padding; the padding columns are 0 in rows
  renormalised over the real keys, so this is '</s>''s map scaled): the image DiTs' rule
- end: '</s>' alone
- padmass: the padding keys' share of the model's own row (joint normalisation: 1 - the real
  keys' mass; the 505 padding keys are one key vector repeated), word maps renormalised over the
  real keys: the default (the Wan family's start_map "text_mass")
- first: column 0 (the literal port; a word on umT5)

    python tests/benchmarks/measure_instdiffedit_wan.py --variant wan21 --seeds 3 --betas 2,4,8 --noise 0,1
"""
import argparse
import dataclasses
import statistics

from common import pack_module, setup


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="wan21", choices=("wan21", "wan22_5b"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--betas", default="2,4,8")
    parser.add_argument("--noise", default="0,1")
    parser.add_argument("--candidates", default="noword,end,padmass,first")
    parser.add_argument("--depth", type=int, default=30)
    args = parser.parse_args()
    setup()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    import test_wan_instdiffedit as twi
    import test_wan_record as wr
    from ae_testlib import dit_plant

    capture_mod = pack_module("samplers.instdiffedit_capture")
    tokens = wr.annotated()
    worded = {p for word in tokens.words for p in word.positions}
    columns = {"noword": [i for i in range(tokens.n_tokens) if i not in worded], "end": [wr.N_REAL - 1],
               "first": [0]}
    family_of, original_start = capture_mod.dit_family, capture_mod.start_columns

    def use(name):
        if name != "padmass":  # a mean of columns on text-renormalised rows, as the image DiTs
            capture_mod.dit_family = lambda model: dataclasses.replace(family_of(model), start_map="no_word")
            capture_mod.start_columns = (lambda cols: (lambda _tokens: cols))(columns[name])
    scale = 16 if args.variant == "wan22_5b" else 8
    results = {}
    for seed in range(args.seeds):
        for beta, noise in ((float(b), float(n)) for b in args.betas.split(",") for n in args.noise.split(",")):
            model = twi.planted(args.variant, seed, beta, depth=args.depth, noise=noise)
            for name in args.candidates.split(","):
                use(name)
                try:
                    result = twi.edit(model, twi.source(args.variant), seed=seed)
                finally:
                    capture_mod.dit_family, capture_mod.start_columns = family_of, original_start
                mask = pack_module("masks.video").pixel_frame_masks(result.mask.float(), scale)
                ious = twi.frame_ious(mask, scale)
                row = results.setdefault((noise, beta, name), ([], []))
                row[0].extend(int(i) == wr.WORD + 1 for i in result.index.tolist())
                row[1].extend(ious)
        print(f"{args.variant}, seeds 0-{seed}:", flush=True)
        report(results)
    del dit_plant


def report(results):
    print("| noise | beta | start map | cat picked (frames) | per-frame IoU min / mean |")
    for (noise, beta, name), (picks, ious) in sorted(results.items()):
        print(f"| {noise:g} | {beta:g} | {name} | {sum(picks)}/{len(picks)} | "
              f"{min(ious):.2f} / {statistics.mean(ious):.2f} |", flush=True)


if __name__ == "__main__":
    main()
