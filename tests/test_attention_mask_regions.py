"""Attention Mask / Heatmap on exact maps: odd latents (a grid rounded up past the latent's edge)
and small regions with the node's defaults (docs/recording.md, "Attention Mask defaults")."""
import pytest
import torch

from ae_testlib.pack import pack_module

maps_mod = pack_module("attention.maps")
tokens_mod = pack_module("attention.tokens")

WORDS = "a photo of a cat on grass".split()


@pytest.fixture(scope="module")
def record_nodes(comfy_host):
    return pack_module("nodes.record")


def perfect_maps(regions, latent_hw, level):
    """ATTENTION_MAPS whose "cat" map is exactly `regions` ([B, h, w] bool) and the other words
    share the rest: what a perfectly localised word would record."""
    tokens = tokens_mod.PromptTokens(text=" ".join(WORDS), token_strings=list(WORDS),
                                     words=[tokens_mod.Word(w, (i,)) for i, w in enumerate(WORDS)])
    probs = torch.full((*regions.shape, len(WORDS)), 0.1)
    probs[..., WORDS.index("cat")] = torch.where(regions, 0.9, 0.02)
    return maps_mod.AttentionMaps(probs=probs, tokens=tokens, latent_hw=latent_hw, level=level)


def regions_on(grid, boxes):
    regions = torch.zeros(len(boxes), *grid, dtype=torch.bool)
    for b, (rows, cols) in enumerate(boxes):
        regions[b, rows, cols] = True
    return regions


def in_image(regions, cell, image_hw):
    return regions.repeat_interleave(cell, -2).repeat_interleave(cell, -1)[..., :image_hw[0], :image_hw[1]]


def iou(found, expected):
    found, expected = found.bool(), expected.bool()
    return float((found & expected).sum() / (found | expected).sum())


def defaults(node):
    required = node.INPUT_TYPES()["required"]
    return required["blur"][1]["default"], required["threshold"][1]["default"]


@pytest.mark.parametrize("level", [1, 2])  # a DiT's token grid (latent / 2), a UNet's 1/4 layers
def test_odd_latent_grid_is_cropped_not_stretched(record_nodes, level):
    """A 13 x 17 latent: the map grid is rounded up (level 1: 7 x 9 cells covering 6.5 x 8.5;
    level 2: 4 x 5 covering 3.25 x 4.25). Each cell is 8 * 2^level image pixels, the overhang is
    cropped: a region's edges land on the cell boundaries (stretching the grid over the image put
    them 4-9 px off, and cut the overhanging cells' share)."""
    latent_hw, image_hw, cell = (13, 17), (104, 136), 8 * 2 ** level
    grid = tuple(-(-s // 2 ** level) for s in latent_hw)
    boxes = [(slice(1, grid[0]), slice(grid[1] // 2, grid[1])), (slice(0, 2), slice(1, 3))]
    regions = regions_on(grid, boxes)
    maps = perfect_maps(regions, latent_hw, level)
    (mask,) = record_nodes.AttentionMask().run(maps, "cat", 0.0, 0.5, "union")
    assert mask.shape == (2, *image_hw)
    expected = in_image(regions, cell, image_hw)
    for b in range(2):
        rows = mask[b].amax(1).nonzero()[:, 0]
        cols = mask[b].amax(0).nonzero()[:, 0]
        want_rows = expected[b].amax(1).nonzero()[:, 0]
        want_cols = expected[b].amax(0).nonzero()[:, 0]
        for got, want in ((rows, want_rows), (cols, want_cols)):  # edges within a pixel
            assert abs(int(got[0]) - int(want[0])) <= 1 and abs(int(got[-1]) - int(want[-1])) <= 1
        assert iou(mask[b], expected[b]) >= 0.9
    # the heatmap places the map the same way (image 0, below the word's label drawn at the top)
    image = torch.zeros(1, *image_hw, 3)
    (overlay,) = record_nodes.AttentionHeatmap().run(maps, image, "cat", 1.0)
    hot = overlay[0, 24:, :, 0] > 0.5  # the colormap's red channel: the upper half of the range
    assert iou(hot, expected[0, 24:]) >= 0.95


@pytest.mark.parametrize("grid,boxes", [
    ((6, 10), [(slice(1, 4), slice(2, 6)), (slice(3, 5), slice(6, 8))]),  # 3x4 and 2x2 tokens
    ((12, 17), [(slice(3, 9), slice(4, 10)), (slice(7, 9), slice(11, 13))]),  # 6x6 and 2x2
])
def test_default_blur_keeps_small_regions(record_nodes, grid, boxes):
    """A perfect map of a small region (2x2 to 6x6 cells; batch 2, different regions, non-square
    grids) comes back with the node's defaults (the old blur 1.0 gave 3x4 cells IoU 0.62 and
    2x2 cells 0.58)."""
    node = record_nodes.AttentionMask()
    blur, threshold = defaults(node)
    regions = regions_on(grid, boxes)
    latent_hw = (2 * grid[0], 2 * grid[1])
    (mask,) = node.run(perfect_maps(regions, latent_hw, 1), "cat", blur, threshold, "union")
    expected = in_image(regions, 16, mask.shape[-2:])
    for b in range(2):
        assert iou(mask[b], expected[b]) >= 0.85
