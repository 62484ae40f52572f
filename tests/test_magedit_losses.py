"""MAG-Edit token-ratio (Eq. 5) and spatial-ratio (Eq. 6) losses: masks/magedit_losses.py."""
import json
import lzma
import re
import subprocess
import sys

import pytest
import torch
from safetensors.numpy import load

from ae_testlib.pack import PACK_ROOT, pack_module

losses = pack_module("masks.magedit_losses")

GOLDEN_SUBSET = PACK_ROOT / "tests" / "golden" / "data" / "magedit"
CHECKER = PACK_ROOT / "tests" / "golden" / "check_magedit.py"
SUBSET_CASES = json.loads((GOLDEN_SUBSET / "cases.json").read_text())["cases"]


def golden_case(case):
    """(attn requiring grad, mask16, word token indices, W, arrays) for one golden case."""
    arrays = load(lzma.open(GOLDEN_SUBSET / case["file"]).read())
    attn = torch.from_numpy(arrays["attn"]).requires_grad_(True)
    words = case["edit_token_indices_per_word"]
    return attn, torch.from_numpy(arrays["mask16"]), words, len(case["target_words"]), arrays


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: " ".join(c["target_words"]))
def test_golden_values_and_gradients(case):
    attn, mask, words, n_words, arrays = golden_case(case)
    for key, fn, tol in [("tr", losses.token_ratio_loss, dict(atol=1e-9, rtol=1e-5)),
                         ("sr", losses.spatial_ratio_loss, dict(atol=1e-7, rtol=1e-5))]:
        loss = fn(attn, mask, words, n_words=n_words)
        assert loss.shape == ()
        assert loss.item() == pytest.approx(case[f"loss_{key}"], rel=1e-6)
        (grad,) = torch.autograd.grad(loss, attn)
        torch.testing.assert_close(grad, torch.from_numpy(arrays[f"grad_{key}"]), **tol)


def test_golden_per_layer_values():
    case = SUBSET_CASES[0]
    attn, mask, words, n_words, _ = golden_case(case)
    for layer, tr, sr in zip(attn, case["loss_tr_per_layer"], case["loss_sr_per_layer"]):
        ours_tr = losses.token_ratio_loss([layer], mask, words, n_words=n_words)
        ours_sr = losses.spatial_ratio_loss([layer], mask, words, n_words=n_words)
        assert ours_tr.item() == pytest.approx(tr, rel=1e-6)
        assert ours_sr.item() == pytest.approx(sr, rel=1e-6)


def analytic_tr_gradient(attn, mask, words):
    """The golden README's closed form of d TR / d attn (summed over words)."""
    n_layers, heads = attn.shape[:2]
    inside = (mask != 0).flatten().to(attn.dtype)
    count = inside.sum()
    total = attn.sum(-1)  # S[l, h, p]
    grad = torch.zeros_like(attn)
    for idx in words:
        mean = attn[..., idx].mean(-1)  # m[l, h, p]
        a = (mean / total * inside).sum(-1) / count  # a[l, h]
        c = (-2 * (1 - a) / (count * heads * n_layers * len(words)))[..., None, None]
        grad += -c * (mean / total**2)[..., None] * inside[:, None]
        grad[..., idx] += (c / (len(idx) * total[..., None])) * inside[:, None]
    return grad


@pytest.mark.parametrize("case", SUBSET_CASES, ids=lambda c: " ".join(c["target_words"]))
def test_tr_gradient_structure(case):
    attn, mask, words, n_words, _ = golden_case(case)
    (grad,) = torch.autograd.grad(losses.token_ratio_loss(attn, mask, words, n_words), attn)
    outside = mask.flatten() == 0
    assert torch.all(grad[:, :, outside] == 0)
    analytic = analytic_tr_gradient(attn.detach().double(), mask, words).float()
    torch.testing.assert_close(grad, analytic, atol=1e-9, rtol=1e-5)
    # Within a masked pixel all non-edit columns (BOS, padding...) share one positive value.
    edit = sorted({i for idx in words for i in idx})
    others = grad[:, :, ~outside][..., [t for t in range(attn.shape[-1]) if t not in edit]]
    assert torch.all(others > 0)
    torch.testing.assert_close(others, others[..., :1].expand_as(others))


def loop_token_ratio(layers, mask, words, n_words):
    """Eq. 5 written out with scalar loops (per word, layer, head, pixel)."""
    inside = [p for p, value in enumerate(mask.flatten().tolist()) if value != 0]
    total = 0.0
    for idx in words:
        for attn in layers:
            heads, pixels, tokens = attn.shape
            for h in range(heads):
                a = 0.0
                for p in inside:
                    word = sum(attn[h, p, t].item() for t in idx) / len(idx)
                    a += word / sum(attn[h, p, t].item() for t in range(tokens))
                total += (1 - a / len(inside)) ** 2 / heads
    return total / (len(layers) * n_words)


def loop_spatial_ratio(layers, mask, words, lam, n_words):
    """Eq. 6 written out with scalar loops."""
    flat_mask = mask.flatten().tolist()
    total = 0.0
    for idx in words:
        for attn in layers:
            heads, pixels, _ = attn.shape
            for h in range(heads):
                word = [sum(attn[h, p, t].item() for t in idx) for p in range(pixels)]
                r = sum(w for w, m in zip(word, flat_mask) if m != 0) / sum(word)
                total += (lam * (1 - r) - r) / heads
    return total / (len(layers) * n_words)


def random_inputs(seed, n_layers=2, heads=3, side=4, tokens=9):
    gen = torch.Generator().manual_seed(seed)
    # Rows deliberately not normalised, so the all-token denominator of Eq. 5 matters.
    layers = [torch.rand(heads, side * side, tokens, generator=gen, dtype=torch.float64) + 0.05
              for _ in range(n_layers)]
    mask = (torch.rand(side, side, generator=gen) > 0.5).float() * 0.7  # nonzero = inside
    mask[0, 0] = 1.0
    return layers, mask


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("words,n_words", [([[3]], None), ([[2, 5]], None), ([[1], [4, 6]], None),
                                           ([[2, 7], [3]], 3)])
def test_matches_loop_implementation(seed, words, n_words):
    layers, mask = random_inputs(seed)
    W = n_words or len(words)
    assert losses.token_ratio_loss(layers, mask, words, n_words=n_words).item() == pytest.approx(
        loop_token_ratio(layers, mask, words, W), rel=1e-12)
    for lam in (3.0, 1.5):
        assert losses.spatial_ratio_loss(layers, mask, words, lam=lam, n_words=n_words).item() == (
            pytest.approx(loop_spatial_ratio(layers, mask, words, lam, W), rel=1e-12))


def test_mask_values_only_matter_when_nonzero():
    layers, mask = random_inputs(3)
    words = [[2]]
    binary = mask != 0
    for fn in (losses.token_ratio_loss, losses.spatial_ratio_loss):
        expected = fn(layers, binary, words).item()
        assert fn(layers, mask, words).item() == pytest.approx(expected, rel=1e-15)
        flat_numpy = binary.flatten().numpy()
        assert fn(layers, flat_numpy, words).item() == pytest.approx(expected, rel=1e-15)


def test_combined_loss():
    layers, mask = random_inputs(4)
    words = [[2, 3]]
    tr = losses.token_ratio_loss(layers, mask, words)
    sr = losses.spatial_ratio_loss(layers, mask, words, lam=2.0)
    assert losses.combined_loss("token", layers, mask, words) == tr
    assert losses.combined_loss("spatial", layers, mask, words, lam=2.0) == sr
    both = losses.combined_loss("both", layers, mask, words, tr_weight=2.5, sr_weight=0.5, lam=2.0)
    assert both.item() == pytest.approx(2.5 * tr.item() + 0.5 * sr.item(), rel=1e-14)
    with pytest.raises(ValueError, match="kind must be one of"):
        losses.combined_loss("ratio", layers, mask, words)


@pytest.mark.parametrize("fn", [losses.token_ratio_loss, losses.spatial_ratio_loss])
def test_clear_errors(fn):
    layers, mask = random_inputs(5)
    with pytest.raises(ValueError, match="mask is empty"):
        fn(layers, torch.zeros_like(mask), [[2]])
    with pytest.raises(ValueError, match="word_token_indices"):
        fn(layers, mask, [])
    with pytest.raises(ValueError, match="word_token_indices"):
        fn(layers, mask, [[2], []])
    with pytest.raises(ValueError, match="does not match"):
        fn(layers, torch.ones(8, 8), [[2]])
    with pytest.raises(ValueError, match="one resolution"):
        fn([layers[0], layers[1][:, :8]], mask, [[2]])
    with pytest.raises(ValueError, match="n_words"):
        fn(layers, mask, [[1], [2]], n_words=1)
    batched = [torch.stack([layer, layer]) for layer in layers]
    with pytest.raises(ValueError, match="mask is empty"):
        fn(batched, torch.stack([mask, torch.zeros_like(mask)]), [[2]])


@pytest.mark.parametrize("fn", [losses.token_ratio_loss, losses.spatial_ratio_loss])
def test_batch_dimension(fn):
    (layers_a, mask_a), (layers_b, mask_b) = random_inputs(6), random_inputs(7)
    words = [[1, 3], [5]]
    batched = [torch.stack([a, b]).requires_grad_(True) for a, b in zip(layers_a, layers_b)]
    per_image = fn(batched, torch.stack([mask_a, mask_b]), words)
    assert per_image.shape == (2,)
    torch.testing.assert_close(per_image, torch.stack([fn(layers_a, mask_a, words),
                                                       fn(layers_b, mask_b, words)]))
    shared = fn(batched, mask_a, words)
    torch.testing.assert_close(shared[1], fn(layers_b, mask_a, words))
    # Summing the per-image losses keeps each image's gradient its own.
    grads = torch.autograd.grad(per_image.sum(), batched)
    expected = torch.autograd.grad(fn([t[0] for t in batched], mask_a, words), batched)
    torch.testing.assert_close(grads[0][0], expected[0][0])


def run_checker(directory):
    result = subprocess.run([sys.executable, str(CHECKER), str(directory)],
                            capture_output=True, text=True, timeout=600)
    last = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"tr_rel_err_max=\S+ sr_rel_err_max=\S+ grad_cos_min=\S+", last), last


def test_checker_on_bundled_subset():
    # The full official set (../shared/golden, outside the repository) is checked by .ci/run;
    # a CUDA run of the losses is tests/device/check_cuda.py.
    run_checker(GOLDEN_SUBSET)
