"""A recorded prompt joined to a plain one by Conditioning Combine (the real node): ComfyUI runs
both as chunks of the same branch, often in one batch. The maps must be the annotated prompt's
alone, on UNets and DiTs, whichever comes first and whatever the plain prompt's length
(issue 21, item 2). One step, so both runs see the same latent: the maps must match exactly."""
import pytest
import torch

from ae_testlib import dit_host, fixtures, registry
from ae_testlib.pack import pack_module

record = pack_module("samplers.record")
tokens_mod = pack_module("attention.tokens")

RESOLUTION = "1/4 (16x16 at 512 px on SD1.x)"
LONG = " ".join(["a dog running through deep fresh snow under a grey winter sky"] * 8)  # > 77 tokens


def combine(first, second):
    node = registry.core_nodes()["ConditioningCombine"]
    return getattr(node(), node.FUNCTION)(first, second)[0]


def clip_text_encode(text):
    node = registry.core_nodes()["CLIPTextEncode"]
    with torch.inference_mode():
        return getattr(node(), node.FUNCTION)(fixtures.clip("sd15"), text)[0]


def unet_maps(positive, negative, branch="cond"):
    nodes = pack_module("nodes")
    latent = {"samples": torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))}
    with torch.inference_mode():
        _, maps = nodes.record.KSamplerRecordAttention().run(
            fixtures.model("sd15"), 3, 1, 7.5, "euler", "normal", positive, negative, latent, 1.0,
            RESOLUTION, "down + up", branch)
    return maps


@pytest.mark.parametrize("plain_text, plain_first", [("a dog in the snow", False), ("a dog in the snow", True),
                                                     (LONG, True)], ids=["after", "first", "long-first"])
def test_unet_records_only_the_annotated_prompt(comfy_host, plain_text, plain_first):
    annotated = fixtures.encode("sd15", "a cat on a red sofa")
    plain = clip_text_encode(plain_text)
    negative = fixtures.encode("sd15", "")
    alone = unet_maps(annotated, negative)
    joined = combine(plain, annotated) if plain_first else combine(annotated, plain)
    maps = unet_maps(joined, negative)
    assert maps.tokens.text == "a cat on a red sofa" and maps.probs.shape == alone.probs.shape
    torch.testing.assert_close(maps.probs, alone.probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.word_map("cat"), alone.word_map("cat"), atol=1e-5, rtol=1e-4)


def test_unet_negative_branch_records_only_the_annotated_prompt(comfy_host):
    positive = fixtures.encode("sd15", "a cat on a red sofa")
    annotated = fixtures.encode("sd15", "blurry, low quality")
    alone = unet_maps(positive, annotated, branch="uncond")
    maps = unet_maps(positive, combine(clip_text_encode("a dog in the snow"), annotated), branch="uncond")
    torch.testing.assert_close(maps.probs, alone.probs, atol=1e-5, rtol=1e-4)


def test_unet_plain_prompts_only_are_recorded_as_before(comfy_host):
    """No annotated prompt: every chunk of the branch is recorded (maps without words)."""
    negative = fixtures.encode("sd15", "")
    one = clip_text_encode("a cat on a red sofa")
    maps = unet_maps(combine(one, clip_text_encode("a dog in the snow")), negative)
    assert maps.tokens is None and maps.probs.shape == unet_maps(one, negative).probs.shape


# ---------------------------------------------------------------------------------------- DiT

N_TOKENS = 7


def dit_prompt():
    words = [tokens_mod.Word("a", (0,), index=0), tokens_mod.Word("cat", (1,), index=1)]
    tokens = tokens_mod.PromptTokens("a cat", ["a", "cat"] + ["<pad>"] * (N_TOKENS - 2), words)
    return dit_host.conditioning(N_TOKENS, 1, tokens=tokens)


def dit_maps(family, positive):
    latent = dit_host.latent(family, 2, 6, 10)
    with torch.inference_mode():
        _, maps = record.sample_recording(dit_host.model(family), 1, 1, 2.0, "euler", "normal", positive,
                                          dit_host.conditioning(N_TOKENS, 2), latent)
    return maps


@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("plain_tokens, plain_first", [(N_TOKENS, False), (N_TOKENS, True), (N_TOKENS + 5, True)],
                         ids=["after", "first", "longer-first"])
def test_dit_records_only_the_annotated_prompt(comfy_host, family, plain_tokens, plain_first):
    dit_host.require_dit_host()
    annotated, plain = dit_prompt(), dit_host.conditioning(plain_tokens, 3)
    alone = dit_maps(family, annotated)
    maps = dit_maps(family, combine(plain, annotated) if plain_first else combine(annotated, plain))
    assert maps.tokens.text == "a cat" and maps.probs.shape == alone.probs.shape
    torch.testing.assert_close(maps.probs, alone.probs, atol=1e-5, rtol=1e-4)


def test_a_host_without_chunk_uuids_refuses_the_mix_instead_of_mixing(comfy_host):
    recorder = pack_module("attention.recorder").AttentionRecorder()
    assert recorder.chunks_kept({"cond_or_uncond": [0, 0]}) is None  # nothing mixed: every chunk
    recorder.recorded = {"annotated-uuid"}
    assert recorder.chunks_kept({"uuids": ["plain-uuid", "annotated-uuid"]}) == [False, True]
    with pytest.raises(RuntimeError, match="Conditioning Combine.*Record with the Attention Text Encode prompt alone"):
        recorder.chunks_kept({"cond_or_uncond": [0, 0]})
    recorder.recorded = {None}  # an annotated cond without a uuid
    with pytest.raises(RuntimeError, match="Conditioning Combine"):
        recorder.chunks_kept({"uuids": ["plain-uuid", "other-uuid"]})
