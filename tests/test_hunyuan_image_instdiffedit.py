"""InstDiffEdit on HunyuanImage 2.1 on the real ComfyUI host: tiny random-weight models at the
released block count (20 double + 40 single, tiny width) from ComfyUI's classes, the real
HunyuanImage text encoder's token layout (tiny encoders, ae_testlib.dit_text), a planted word <->
region attention bias (ae_testlib.dit_plant). Its prompt keeps one token of no word, so the start
map is 1 - the text's share of the joint row (docs/instdiffedit.md, "HunyuanImage 2.1")."""
import pytest
import torch

from ae_testlib import dit_host, dit_plant, dit_text, host
from ae_testlib.pack import pack_module

pytestmark = host.requires("hunyuan_image")
ide = pack_module("samplers.instdiffedit")
capture_mod = pack_module("samplers.instdiffedit_capture")
tokens_mod = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
record = pack_module("samplers.record")

PROMPT = "a photo of a cat on grass"
FAMILY = "hunyuan_image"
COPIES = 3
GRID = (12, 17)  # patch 1: the latent is the token grid (non-square)


@pytest.fixture(scope="module")
def tokens(comfy_host):
    return text_encoders.prompt_tokens(dit_text.build_dit_clip(FAMILY), PROMPT)


def regions():
    return torch.stack([dit_plant.region_mask(GRID, slice(2, 8), slice(3, 9)),
                        dit_plant.region_mask(GRID, slice(5, 11), slice(7, 15))])


def source(batch=2):
    return {"samples": torch.randn(batch, 64, *GRID, generator=torch.Generator().manual_seed(0))}


def conds(tokens, seed=1):
    return (dit_host.conditioning(tokens.n_tokens, seed, tokens=tokens),
            dit_host.conditioning(tokens.n_tokens, seed + 50))


def cat_index(tokens):
    return 1 + [tokens_mod.normalise_word(w.text) for w in tokens.words].index("cat")


def planted(seed, tokens, beta, noise=0.0, rows=COPIES):
    model = dit_host.build(FAMILY, seed, real_depth=True)
    return dit_plant.plant(model, regions().repeat_interleave(rows, 0), tokens.positions("cat"), beta=beta,
                           noise=noise, noise_seed=seed)


def edit(model, tokens, seed=1):
    positive, negative = conds(tokens, seed)
    with torch.inference_mode():
        return ide.sample_instdiffedit(model, positive, negative, source(), seed, steps=8, strength=0.5, cfg=1.0,
                                       sampler_name="euler", scheduler="normal", copies=COPIES)


def test_start_map_is_the_text_mass(tokens):
    """One token of no word (<|im_end|>): the capture reads joint rows and 1 - their text share."""
    assert [tokens.token_strings[c] for c in capture_mod.start_columns(tokens)] == ["<|im_end|>"]
    capture = capture_mod.capture_for(dit_host.model(FAMILY), tokens)
    assert capture.text_mass and capture.normalise == "joint" and capture.level == 0
    attn = torch.rand(2, 3, 4, tokens.n_tokens) * 0.1
    maps, _, _ = capture.maps_and_columns(attn)
    assert torch.allclose(maps[..., 0], 1 - attn.sum(-1))
    assert torch.allclose(maps[..., 1:].sum(-1), torch.ones(()))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beta,noise", [(4.0, 0.0), (4.0, 1.0)])
def test_planted_region_is_recovered(tokens, seed, beta, noise):
    """Batch 2 with a different region per image, non-square latent, real block count; with and
    without per-token logit noise: "cat" is picked and each image's mask finds its region."""
    result = edit(planted(seed, tokens, beta, noise), tokens)
    assert result.mask.shape == (2, *GRID)
    assert result.index.tolist() == [cat_index(tokens)] * 2
    ious = [dit_plant.iou(result.mask[i], regions()[i]) for i in range(2)]
    print(f"HunyuanImage InstDiffEdit seed {seed} beta {beta} noise {noise}: IoU {ious}")
    assert min(ious) >= 0.8, ious


def test_mask_from_recorded_maps_needs_joint_rows(tokens):
    """Instruct mask from ATTENTION_MAPS: joint rows give the sampler's reading; text rows get an
    error naming the setting."""
    model = planted(0, tokens, 4.0, rows=1)
    positive, negative = conds(tokens)
    with torch.inference_mode():
        _, maps = record.sample_recording(model, 1, 4, 1.0, "euler", "normal", positive, negative,
                                          {"samples": torch.zeros(2, 64, *GRID)}, normalise="joint")
    mask = ide.mask_from_maps(maps)
    assert mask.shape == (2, *GRID)
    assert min(dit_plant.iou(mask[i], regions()[i]) for i in range(2)) >= 0.8
    with torch.inference_mode():
        _, text_maps = record.sample_recording(model, 1, 2, 1.0, "euler", "normal", positive, negative,
                                               {"samples": torch.zeros(2, 64, *GRID)})
    with pytest.raises(ValueError, match="over all keys.*'joint \\(all keys\\)'"):
        ide.mask_from_maps(text_maps)
