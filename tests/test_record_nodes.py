"""The foundation nodes as ComfyUI calls them (inside inference mode): types, shapes, ranges, errors."""
import pytest
import torch

from ae_testlib import fixtures, registry
from ae_testlib.pack import pack_module

nodes = pack_module("nodes")
maps_mod = pack_module("attention.maps")
tokens = pack_module("attention.tokens")

RESOLUTION = "1/4 (16x16 at 512 px on SD1.x)"


@pytest.fixture(scope="module")
def recorded(comfy_host):
    positive = fixtures.encode("sd15", "a corgi wearing a red hat")
    negative = fixtures.encode("sd15", "")
    latent = {"samples": torch.zeros(2, 4, 16, 24)}
    with torch.inference_mode():
        out, maps = nodes.record.KSamplerRecordAttention().run(
            fixtures.model("sd15"), 3, 3, 7.5, "euler", "normal", positive, negative, latent, 1.0,
            RESOLUTION, "down + up", "cond")
    return out, maps


def test_record_node_outputs(recorded):
    out, maps = recorded
    assert out["samples"].shape == (2, 4, 16, 24)
    assert isinstance(maps, maps_mod.AttentionMaps)
    assert maps.probs.shape == (2, 4, 6, 77) and maps.latent_hw == (16, 24)
    assert maps.tokens.word_list() == ["a", "corgi", "wearing", "a", "red", "hat"]


def test_heatmap_node(recorded):
    _, maps = recorded
    image = torch.full((2, 128, 192, 3), 0.5)
    with torch.inference_mode():
        every, = nodes.record.AttentionHeatmap().run(maps, image, "", 0.6)
        two, = nodes.record.AttentionHeatmap().run(maps, image[:1], "corgi, red hat", 0.6)
    assert every.shape == (2 * 6, 128, 192, 3)  # word-major: each word for each image
    assert two.shape == (4, 128, 192, 3) and two.dtype == torch.float32
    assert 0 <= float(two.min()) and float(two.max()) <= 1
    assert not torch.equal(two[0], two[2])  # different words, different overlays
    label_band, body = two[0, :8, :40], two[0, 64:, 100:]
    assert float(label_band.min()) == 0.0 and float(body.min()) > 0.0  # the word is drawn on a dark band


def test_mask_node(recorded):
    _, maps = recorded
    with torch.inference_mode():
        hard, = nodes.record.AttentionMask().run(maps, "corgi", 1.0, 0.5, "union")
        soft, = nodes.record.AttentionMask().run(maps, "corgi", 1.0, 0.0, "union")
        union, = nodes.record.AttentionMask().run(maps, "corgi, red hat", 1.0, 0.5, "union")
        inter, = nodes.record.AttentionMask().run(maps, "corgi, red hat", 1.0, 0.5, "intersection")
    assert hard.shape == soft.shape == (2, 128, 192)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and 0 < float(hard.mean()) < 1
    assert 0 <= float(soft.min()) and float(soft.max()) <= 1 and soft.unique().numel() > 2
    assert torch.all(union >= hard) and torch.all(inter <= hard)


def test_node_errors(recorded):
    _, maps = recorded
    with pytest.raises(tokens.PromptWordError, match="'corgi'"):
        nodes.record.AttentionMask().run(maps, "cat", 1.0, 0.5, "union")
    with pytest.raises(ValueError, match="at least one word"):
        nodes.record.AttentionMask().run(maps, " , ", 1.0, 0.5, "union")
    with pytest.raises(ValueError, match="3 images but the attention maps have 2"):
        nodes.record.AttentionHeatmap().run(maps, torch.zeros(3, 64, 64, 3), "corgi", 0.5)


def test_annotation_survives_core_conditioning_nodes(comfy_host):
    core = registry.core_nodes()
    positive = fixtures.encode("sd15", "a corgi wearing a red hat")
    timed = getattr(core["ConditioningSetTimestepRange"](), core["ConditioningSetTimestepRange"].FUNCTION)(positive, 0.0, 0.5)[0]
    area = getattr(core["ConditioningSetArea"](), core["ConditioningSetArea"].FUNCTION)(positive, 64, 64, 0, 0, 1.0)[0]
    combined = getattr(core["ConditioningCombine"](), core["ConditioningCombine"].FUNCTION)(timed, area)[0]
    for conditioning in (timed, area, combined):
        assert tokens.tokens_of(conditioning).positions("hat") == [6]
