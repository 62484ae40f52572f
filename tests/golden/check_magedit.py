"""Check masks/magedit_losses.py against MAG-Edit golden vectors.

Usage: python tests/golden/check_magedit.py DIR

DIR holds cases.json and case_XXX.safetensors.xz in the golden format (see the golden README,
section 2). Prints per-case figures and, as the last line,
`tr_rel_err_max=<x> sr_rel_err_max=<x> grad_cos_min=<x>` (grad_cos: cosine between our autograd
d loss_tr / d attn and the official grad_tr). Exits 1 when a target is missed: relative loss
errors <= 1e-4 and gradient cosines (TR and SR) >= 0.999.
"""
import json
import lzma
import pathlib
import sys

import torch
from safetensors.numpy import load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ae_testlib.pack import pack_module  # noqa: E402

losses = pack_module("masks.magedit_losses")

REL_TOL = 1e-4
COS_TOL = 0.999
# Elementwise gradient tolerances suggested by the golden README (reported, not enforced).
GRAD_TOL = {"tr": dict(atol=1e-9, rtol=1e-5), "sr": dict(atol=1e-7, rtol=1e-5)}


def load_case(directory, case):
    return load(lzma.open(directory / case["file"]).read())


def case_inputs(case, arrays):
    """(attn tensor, mask, word token indices, W) as the official call sees them."""
    attn = torch.from_numpy(arrays["attn"]).requires_grad_(True)
    # The official code skips target words missing from the prompt but counts them in W.
    words = [idx for word, idx in zip(case["target_words"], case["edit_token_indices_per_word"])
             if word in case["prompt"]]
    return attn, torch.from_numpy(arrays["mask16"]), words, len(case["target_words"])


def evaluate(case, arrays):
    """Our losses and gradients next to the official ones, as a dict of figures."""
    attn, mask, words, n_words = case_inputs(case, arrays)
    ours = {
        "tr": losses.token_ratio_loss(attn, mask, words, n_words=n_words),
        "sr": losses.spatial_ratio_loss(attn, mask, words, n_words=n_words),
    }
    figures = {}
    for key, loss in ours.items():
        (grad,) = torch.autograd.grad(loss, attn)
        official = torch.from_numpy(arrays[f"grad_{key}"])
        expected = case[f"loss_{key}"]
        figures[f"{key}_rel_err"] = abs(loss.item() - expected) / abs(expected)
        figures[f"{key}_abs_err"] = abs(loss.item() - expected)
        figures[f"grad_{key}_cos"] = torch.nn.functional.cosine_similarity(
            grad.flatten().double(), official.flatten().double(), dim=0).item()
        figures[f"grad_{key}_max_abs_err"] = (grad - official).abs().max().item()
        figures[f"grad_{key}_within_readme_tol"] = torch.allclose(grad, official, **GRAD_TOL[key])
    return figures


def main(directory):
    directory = pathlib.Path(directory)
    cases = json.loads((directory / "cases.json").read_text())["cases"]
    rows = []
    for case in cases:
        figures = evaluate(case, load_case(directory, case))
        rows.append(figures)
        print(f"case {case['case']:3d} words={case['target_words']} "
              f"idx={case['edit_token_indices_per_word']}: "
              + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in figures.items()))

    def worst(key, pick):
        return pick(row[key] for row in rows)

    summary = {
        "tr_rel_err_max": worst("tr_rel_err", max),
        "sr_rel_err_max": worst("sr_rel_err", max),
        "grad_cos_min": worst("grad_tr_cos", min),
    }
    print(f"cases={len(rows)} "
          f"tr_abs_err_max={worst('tr_abs_err', max):.3g} "
          f"sr_abs_err_max={worst('sr_abs_err', max):.3g} "
          f"grad_tr_max_abs_err={worst('grad_tr_max_abs_err', max):.3g} "
          f"grad_sr_max_abs_err={worst('grad_sr_max_abs_err', max):.3g} "
          f"grad_sr_cos_min={worst('grad_sr_cos', min):.9f}")
    print(f"grad_tr within README tol (atol 1e-9, rtol 1e-5): "
          f"{sum(row['grad_tr_within_readme_tol'] for row in rows)}/{len(rows)}; "
          f"grad_sr within README tol (atol 1e-7, rtol 1e-5): "
          f"{sum(row['grad_sr_within_readme_tol'] for row in rows)}/{len(rows)}")
    ok = (summary["tr_rel_err_max"] <= REL_TOL and summary["sr_rel_err_max"] <= REL_TOL
          and summary["grad_cos_min"] >= COS_TOL and worst("grad_sr_cos", min) >= COS_TOL)
    print("PASS" if ok else f"FAIL: targets are rel errors <= {REL_TOL}, cosines >= {COS_TOL}")
    print(" ".join(f"{k}={v:.3g}" if k.endswith("max") else f"{k}={v:.9f}"
                   for k, v in summary.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
