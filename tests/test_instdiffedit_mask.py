"""InstDiffEdit mask refinement (masks/instdiffedit.py) against the official chain's golden data."""
import json
import lzma
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load

from ae_testlib.pack import PACK_ROOT, pack_module

instdiffedit = pack_module("masks.instdiffedit")

GOLDEN_SUBSET = PACK_ROOT / "tests" / "golden" / "data" / "instdiffedit"
CHECKER = PACK_ROOT / "tests" / "golden" / "check_instdiffedit.py"
SUBSET_CASES = json.loads((GOLDEN_SUBSET / "cases.json").read_text())["cases"]
PARAM_SETS = ("bench", "demo")


def golden_arrays(case):
    return load(lzma.open(GOLDEN_SUBSET / case["file"]).read())


def run_case(case, attn, param_set="bench", **kwargs):
    params = case["params"][param_set]
    groups = instdiffedit.official_word_groups(case["prompt"], case["token_decoded"])
    return instdiffedit.refine_mask(attn, groups, case["n_tokens"] - 1, params["theta_hi"],
                                    params["theta_lo"], params["phi"], **kwargs)


def random_attention(batch, h, w, tokens, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, h, w, tokens, generator=generator) * 2
    return logits.softmax(-1)


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: c["prompt"])
def test_word_groups_match_official(case):
    groups = instdiffedit.official_word_groups(case["prompt"], case["token_decoded"])
    assert [[0]] + groups + [[case["n_tokens"] - 1]] == case["map_token_groups"]


def test_word_groups_reject_misaligned_tokens():
    # Double space: the empty word can never be spelled, the official code would misalign.
    decoded = ["<|startoftext|>", "an", "ax", "o", "lot", "l", "<|endoftext|>"]
    with pytest.raises(ValueError, match="single spaces"):
        instdiffedit.official_word_groups("an  axolotl", decoded)


@pytest.mark.parametrize("param_set", PARAM_SETS)
@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: c["prompt"])
def test_golden_bit_exact(case, param_set):
    arrays = golden_arrays(case)
    result = run_case(case, torch.from_numpy(arrays["attn"]), param_set)
    assert result.mask.shape == (1, 64, 64)
    np.testing.assert_array_equal(result.word_maps[0].numpy().astype(np.uint8), arrays["word_maps"])
    np.testing.assert_array_equal((result.mask[0] * 255).numpy().astype(np.uint8),
                                  arrays[f"mask_{param_set}"])
    if case["single_word_branch"]:
        assert result.position[0].tolist() == [0, 1, 0]
    else:
        assert result.index.tolist() == [case["index"]]
        assert result.position[0].tolist() == case["params"][param_set]["P"]
        np.testing.assert_allclose(result.similarity[0].numpy(), case["S"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(result.refined[0].numpy(), arrays[f"R_{param_set}"], atol=1e-6)
    np.testing.assert_allclose(result.blurred[0].numpy(), arrays[f"blurred_{param_set}"], atol=1e-6)


def test_float_variant_on_golden_subset():
    for case in SUBSET_CASES:
        arrays = golden_arrays(case)
        result = run_case(case, torch.from_numpy(arrays["attn"]), exact=False)
        assert torch.isfinite(result.blurred).all()
        assert set(result.mask.unique().tolist()) <= {0.0, 1.0}
        if not case["single_word_branch"]:
            assert result.index.item() == case["index"]


def test_batch_of_two_matches_single_runs():
    case = next(c for c in SUBSET_CASES if c["params"]["bench"]["has_background_term"])
    attn = torch.from_numpy(golden_arrays(case)["attn"])
    batch = torch.stack([attn, attn.flip(1)])
    result = run_case(case, batch)
    assert result.mask.shape == (2, 64, 64)
    for b in range(2):
        single = run_case(case, batch[b])
        for field in ("mask", "position", "index", "similarity", "word_maps", "blurred"):
            assert torch.equal(getattr(result, field)[b], getattr(single, field)[0]), field


def pil_reference_word_maps(attn, groups, eos_index):
    """The official token_combination written with numpy and PIL, for one image."""
    columns = [[0]] + groups + [[eos_index]]
    maps = []
    for i, cols in enumerate(columns):
        image = torch.stack([attn[..., c] for c in cols], 0).mean(0)
        image = 255 * image / image.max()
        h, w = image.shape
        pil = Image.fromarray(image.numpy().astype(np.uint8)).resize((4 * w, 4 * h))
        pixels = np.array(pil)
        if i == 0:
            pixels = 255 - pixels  # ImageChops.invert
        x = torch.from_numpy(pixels).float() / 255
        maps.append(((x - x.min()) / (x.max() - x.min()) * 255.0).numpy().astype(np.uint8))
    return np.stack(maps)


def test_non_square_maps_follow_pil():
    attn = random_attention(2, 12, 20, 77)
    groups = [[1], [2, 3], [4]]
    result = instdiffedit.refine_mask(attn, groups, eos_index=5)
    assert result.mask.shape == (2, 48, 80)
    assert result.word_maps.shape == (2, 5, 48, 80)
    for b in range(2):
        np.testing.assert_array_equal(result.word_maps[b].numpy().astype(np.uint8),
                                      pil_reference_word_maps(attn[b], groups, 5))
    float_result = instdiffedit.refine_mask(attn, groups, eos_index=5, exact=False)
    assert float_result.mask.shape == (2, 48, 80)


def test_frozen_position_is_reused():
    groups = [[1], [2], [3], [4]]
    first = instdiffedit.refine_mask(random_attention(1, 16, 16, 77, seed=1), groups, 5)
    later_attn = random_attention(1, 16, 16, 77, seed=2)
    fresh = instdiffedit.refine_mask(later_attn, groups, 5)
    frozen_position = torch.tensor([0, 1, -1, 0, 0, 0])
    assert not torch.equal(fresh.position[0], frozen_position)
    later = instdiffedit.refine_mask(later_attn, groups, 5, position=frozen_position)
    assert later.position.tolist() == [frozen_position.tolist()]
    assert later.index is None and later.similarity is None
    again = instdiffedit.refine_mask(later_attn, groups, 5, position=first.position)
    assert torch.equal(again.position, first.position)
    with pytest.raises(ValueError, match="entries"):
        instdiffedit.refine_mask(later_attn, groups, 5, position=[0, 1, 0])


@pytest.mark.parametrize("exact", [True, False])
def test_degenerate_inputs_give_empty_masks_without_nan(exact):
    groups = [[1], [2]]
    uniform = torch.full((2, 16, 16, 77), 1 / 77)
    for attn in (uniform, torch.zeros(1, 16, 16, 77)):
        result = instdiffedit.refine_mask(attn, groups, 3, exact=exact)
        for field in ("mask", "similarity", "word_maps", "refined", "blurred"):
            assert torch.isfinite(getattr(result, field)).all(), field
        assert result.index.eq(0).all() and result.position.eq(0).all()
        assert result.mask.sum() == 0
    no_object = instdiffedit.refine_mask(random_attention(1, 16, 16, 77), groups, 3,
                                         position=[0, -1, 0, 0], exact=exact)
    assert torch.isfinite(no_object.blurred).all() and no_object.mask.sum() == 0


def test_checker_on_bundled_subset():
    # The full official set (../shared/golden, outside the repository) is checked by .ci/run;
    # a CUDA run of the same cases is tests/device/check_cuda.py.
    done = subprocess.run([sys.executable, str(CHECKER), str(GOLDEN_SUBSET)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line == ("index_agree=1.0000 P_agree=1.0000 "
                         "mask_iou_min=1.0000 mask_iou_mean=1.0000")
