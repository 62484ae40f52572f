"""Check masks/instdiffedit.py against InstDiffEdit golden vectors.

Usage: python tests/golden/check_instdiffedit.py DIR

DIR holds cases.json and case_XXX.safetensors.xz in the golden format (see the golden README,
section 1). Every case is run with both parameter sets of cases.json (bench: theta_hi 0.9,
theta_lo 0.6, phi 0.2; demo: 0.9, 0.3, 0.3), once with `exact=True` and once with the float-only
`exact=False`. For the one-word branch (no official index or P) the expected index is 1 and P is
[0, 1, 0], which is how refine_mask reports "the mask is the word's own map".

Prints per-case figures, then summaries, and as the last line (for exact=True)
`index_agree=<fraction> P_agree=<fraction> mask_iou_min=<x> mask_iou_mean=<x>`.
Exits 1 when a target is missed: index and P agree in 100 % of (case, parameter set) pairs,
mean mask IoU >= 0.99 and min mask IoU >= 0.95.
"""
import json
import lzma
import pathlib
import sys

import numpy as np
import torch
from safetensors.numpy import load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from ae_testlib.pack import pack_module  # noqa: E402

instdiffedit = pack_module("masks.instdiffedit")

IOU_MEAN_TARGET = 0.99
IOU_MIN_TARGET = 0.95


def load_case(directory, case):
    return load(lzma.open(directory / case["file"]).read())


def expected_index_and_position(case, param_set):
    if case["single_word_branch"]:
        return 1, [0, 1, 0]
    return case["index"], case["params"][param_set]["P"]


def mask_iou(ours, official):
    union = np.logical_or(ours, official).sum()
    return 1.0 if union == 0 else np.logical_and(ours, official).sum() / union


def max_abs_diff(ours, official):
    return float(np.abs(ours.double().numpy() - official).max())


def run(case, attn, param_set, exact):
    params = case["params"][param_set]
    groups = instdiffedit.official_word_groups(case["prompt"], case["token_decoded"])
    return instdiffedit.refine_mask(attn, groups, case["n_tokens"] - 1, params["theta_hi"],
                                    params["theta_lo"], params["phi"], exact=exact)


def compare(case, arrays, result, param_set):
    """Figures for one (case, parameter set): agreement of index, P, S, R, blurred and mask."""
    index, position = expected_index_and_position(case, param_set)
    ours_mask = result.mask[0].numpy() > 0
    official_mask = arrays[f"mask_{param_set}"] > 0
    figures = {
        "index_ok": result.index[0].item() == index,
        "P_ok": result.position[0].tolist() == position,
        "iou": float(mask_iou(ours_mask, official_mask)),
        "px_diff": int((ours_mask != official_mask).sum()),
        "R_err": max_abs_diff(result.refined[0], arrays[f"R_{param_set}"]),
        "blur_err": max_abs_diff(result.blurred[0], arrays[f"blurred_{param_set}"]),
    }
    if not case["single_word_branch"]:
        figures["S_err"] = max_abs_diff(result.similarity[0], np.array(case["S"]))
    return figures


def summarise(rows):
    return {
        "index_agree": np.mean([row["index_ok"] for row in rows]),
        "P_agree": np.mean([row["P_ok"] for row in rows]),
        "mask_iou_min": min(row["iou"] for row in rows),
        "mask_iou_mean": np.mean([row["iou"] for row in rows]),
    }


def summary_line(summary):
    return " ".join(f"{key}={value:.4f}" for key, value in summary.items())


def main(directory):
    directory = pathlib.Path(directory)
    cases = json.loads((directory / "cases.json").read_text())["cases"]
    rows = {True: [], False: []}
    groups_ok = word_maps_ok = 0
    for case in cases:
        arrays = load_case(directory, case)
        attn = torch.from_numpy(arrays["attn"])
        groups = instdiffedit.official_word_groups(case["prompt"], case["token_decoded"])
        case_groups_ok = [[0]] + groups + [[case["n_tokens"] - 1]] == case["map_token_groups"]
        groups_ok += case_groups_ok
        line = [f"case {case['case']:3d} {case['prompt']!r}: "
                f"groups={'ok' if case_groups_ok else 'DIFF'}"]
        for exact in (True, False):
            for param_set in ("bench", "demo"):
                result = run(case, attn, param_set, exact)
                figures = compare(case, arrays, result, param_set)
                rows[exact].append(figures)
                line.append(f"{'exact' if exact else 'float'}/{param_set}: "
                            + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in figures.items()))
            if exact:
                word_maps = result.word_maps[0].numpy().astype(np.uint8)
                case_maps_ok = np.array_equal(word_maps, arrays["word_maps"])
                word_maps_ok += case_maps_ok
                line.insert(1, f"word_maps={'exact' if case_maps_ok else 'DIFF'}")
        print(" | ".join(line))

    exact_rows = rows[True]
    print(f"cases={len(cases)} word_groups_agree={groups_ok}/{len(cases)} "
          f"word_maps_bit_exact={word_maps_ok}/{len(cases)} "
          f"masks_bit_exact={sum(row['px_diff'] == 0 for row in exact_rows)}/{len(exact_rows)} "
          f"S_err_max={max(row.get('S_err', 0.0) for row in exact_rows):.3g} "
          f"R_err_max={max(row['R_err'] for row in exact_rows):.3g} "
          f"blurred_err_max={max(row['blur_err'] for row in exact_rows):.3g}")
    float_rows = rows[False]
    print(f"float variant (exact=False): {summary_line(summarise(float_rows))} "
          f"mask_px_diff_mean={np.mean([row['px_diff'] for row in float_rows]):.1f} "
          f"mask_px_diff_max={max(row['px_diff'] for row in float_rows)} (of 4096)")
    summary = summarise(exact_rows)
    ok = (summary["index_agree"] == 1 and summary["P_agree"] == 1
          and summary["mask_iou_mean"] >= IOU_MEAN_TARGET
          and summary["mask_iou_min"] >= IOU_MIN_TARGET)
    print("PASS" if ok else f"FAIL: targets are index and P agree 100 %, mask IoU mean >= "
          f"{IOU_MEAN_TARGET} and min >= {IOU_MIN_TARGET}")
    print(summary_line(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
