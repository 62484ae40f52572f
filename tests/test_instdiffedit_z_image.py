"""InstDiffEdit on Z-Image (Turbo) on the real ComfyUI host: a tiny random-weight Z-Image at its 30
main layers (ComfyUI's Lumina2 NextDiT through the host's checkpoint detection), the prompt encoded
by ComfyUI's own Z-Image tokenizer and Qwen3 text-encoder classes (tiny encoder), and "cat"
planted on a different region per image (ae_testlib.dit_plant). The start map is the tokens of no
word (the chat template's 3 opening and 5 closing tokens), chosen by the measurement in
docs/instdiffedit.md ("Z-Image")."""
import pytest
import torch

from ae_testlib import host

host.module_requires("z_image")

import test_instdiffedit_dit as idd  # noqa: E402
from ae_testlib import dit_host, dit_plant, dit_text  # noqa: E402
from ae_testlib.pack import pack_module  # noqa: E402

ide = pack_module("samplers.instdiffedit")
capture_mod = pack_module("samplers.instdiffedit_capture")
text_encoders = pack_module("attention.text_encoders")

HEIGHT, WIDTH = 24, 34  # 12 x 17 tokens, non-square


@pytest.fixture(autouse=True)
def _host(comfy_host):
    dit_host.require_dit_host()
    dit_text.require_dit_clip("z_image")


def prompt():
    clip = dit_text.build_dit_clip("z_image")
    tokens = text_encoders.prompt_tokens(clip, idd.PROMPT)
    return tokens, idd.encoded(clip, idd.PROMPT, tokens), idd.encoded(clip, "")


def test_start_map_is_the_template_tokens():
    tokens, _, _ = prompt()
    strings = [tokens.token_strings[c] for c in capture_mod.start_columns(tokens)]
    assert strings == ["<|im_start|>", "user", "Ċ", "<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]


@pytest.mark.parametrize("seed,beta,noise", [(0, 4.0, 0.0), (1, 4.0, 0.0), (2, 4.0, 0.0), (0, 4.0, 1.0)])
def test_planted_region_is_recovered(seed, beta, noise):
    """Batch 2 with a different region per image, 30 layers (default blocks 24-28), "cat" planted
    at +beta logits (with per-token logit noise of std `noise` in the last case): the start map
    picks "cat" on both images and each final mask has IoU >= 0.8 with its region."""
    tokens, positive, negative = prompt()
    regions = idd.regions_for(HEIGHT, WIDTH)
    model = dit_host.build("zimage", seed, real_depth=True, context_dim=positive[0][0].shape[-1])
    model = dit_plant.plant(model, regions.repeat_interleave(idd.COPIES, 0), tokens.positions("cat"), beta=beta,
                            noise=noise, noise_seed=seed)
    options = {"steps": 8, "strength": 0.5, "sampler_name": "euler", "scheduler": "normal", "copies": idd.COPIES}
    with torch.inference_mode():
        result = ide.sample_instdiffedit(model, positive, negative, idd.source(2, HEIGHT, WIDTH), 1, cfg=1.0,
                                         **options)
    assert result.mask.shape == (2, HEIGHT, WIDTH)
    assert result.index.tolist() == [idd.cat_index(tokens)] * 2
    expected = idd.in_latent(regions, HEIGHT, WIDTH)
    ious = [dit_plant.iou(result.mask[image], expected[image]) for image in range(2)]
    print(f"Z-Image InstDiffEdit seed {seed} beta {beta} noise {noise}: IoU {ious[0]:.3f} / {ious[1]:.3f}")
    assert min(ious) >= 0.8, ious
