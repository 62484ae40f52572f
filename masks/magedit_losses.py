"""MAG-Edit mask-based cross-attention losses (Mao et al., arXiv 2312.11396).

Pure torch, differentiable, device-agnostic. Semantics follow the official code
(HelenMao/MAG-Edit, code_tr/network.py): `compute_ca_TR` (token ratio, Eq. 5, the loss the
released code optimises) and `compute_ca_SR` (spatial ratio, Eq. 6, present but unused there).

Inputs shared by every function:
* `layer_maps`: a sequence of cross-attention probability tensors, one per layer, each
  [heads, pixels, tokens], or [batch, heads, pixels, tokens] for a batch of images. All layers
  share the mask's resolution (MAG-Edit uses the five 16x16 layers).
* `mask`: the edit region at that resolution, [h, w] or [pixels] (shared by the batch), or
  [batch, h, w] / [batch, pixels] (one per image). Any nonzero value counts as inside; NaN / inf
  are an error.
* `word_token_indices`: one list of token positions per edit word (every BPE piece of every
  occurrence, BOS = 0), e.g. [[5], [2, 3]].
* `n_words`: the normaliser W; defaults to len(word_token_indices). The official code skips a
  target word that is missing from the prompt but still counts it in W; pass the full count to
  reproduce that.

Each loss is 0-d for unbatched maps and [batch] (one loss per image) for batched maps; sum it
before backward, which keeps the images' gradients independent.
"""
import torch

from .validate import mask_inside

LOSS_KINDS = ("token", "spatial", "both")


def _prepare(layer_maps, mask, word_token_indices, n_words):
    """Validate the inputs; return (layers, mask as 0/1 floats, pixel count, index tensors, W)."""
    layers = list(layer_maps)
    if not layers:
        raise ValueError("layer_maps is empty: pass at least one cross-attention layer map.")
    ndim = layers[0].dim()
    if ndim not in (3, 4) or any(layer.dim() != ndim for layer in layers):
        raise ValueError(
            "layer_maps must all be [heads, pixels, tokens] or all [batch, heads, pixels, tokens]; "
            f"got shapes {[tuple(layer.shape) for layer in layers]}."
        )
    pixels = layers[0].shape[-2]
    if any(layer.shape[-2] != pixels for layer in layers):
        raise ValueError(
            "All layer maps must share one resolution (the mask's); got pixel counts "
            f"{[layer.shape[-2] for layer in layers]}."
        )

    inside = mask_inside(torch.as_tensor(mask).to(layers[0].device))
    if inside.numel() == pixels:
        inside = inside.reshape(pixels)
    elif ndim == 4 and inside.numel() == layers[0].shape[0] * pixels:
        inside = inside.reshape(-1, 1, pixels)  # per image, broadcast over heads
    else:
        raise ValueError(
            f"mask of shape {tuple(inside.shape)} does not match the layer maps' {pixels} pixels "
            "(resize the mask to the attention resolution, e.g. 16x16)."
        )
    count = inside.sum(-1)  # integer |M|; [batch, 1] for per-image masks
    if (count == 0).any():
        raise ValueError(
            "mask is empty at the attention resolution: MAG-Edit needs at least one masked pixel "
            "(draw a larger mask, or check that a thin mask survives the downscale)."
        )

    if not word_token_indices or any(len(indices) == 0 for indices in word_token_indices):
        raise ValueError(
            f"word_token_indices {word_token_indices!r} is empty or has a word without tokens: "
            "pass one non-empty list of token positions per edit word (is the word in the prompt?)."
        )
    indices = [torch.as_tensor(list(idx), dtype=torch.long, device=layers[0].device)
               for idx in word_token_indices]
    if n_words is None:
        n_words = len(indices)
    if n_words < len(indices):
        raise ValueError(f"n_words={n_words} is smaller than the {len(indices)} words given.")
    return layers, inside.to(layers[0].dtype), count, indices, n_words


def token_ratio_loss(layer_maps, mask, word_token_indices, n_words=None):
    """Token-ratio loss, Eq. 5, as the official compute_ca_TR."""
    layers, inside, count, indices, n_words = _prepare(
        layer_maps, mask, word_token_indices, n_words)

    def term(attn, idx):
        # Eq. 5: word share of all 77 token columns (word columns averaged), per head and pixel
        ratio = attn[..., idx].mean(-1) / attn.sum(-1)
        activation = (ratio * inside).sum(-1) / count  # masked mean over pixels, per head
        return ((1 - activation) ** 2).mean(-1)  # squared per head, then head mean

    # Summed in the official order (layers within each word), so float32 results match it.
    total = sum(sum(term(attn, idx) for attn in layers) for idx in indices)
    return total / (len(layers) * n_words)


def spatial_ratio_loss(layer_maps, mask, word_token_indices, lam=3.0, n_words=None):
    """Spatial-ratio loss, Eq. 6, as the official compute_ca_SR (lam=3 gives its 3 - 4r)."""
    layers, inside, _, indices, n_words = _prepare(layer_maps, mask, word_token_indices, n_words)

    def term(attn, idx):
        word_map = attn[..., idx].sum(-1)  # summed over the word's tokens (TR averages)
        ratio = (word_map * inside).sum(-1) / word_map.sum(-1)  # in-mask share over all pixels
        return (lam - (lam + 1) * ratio).mean(-1)  # Eq. 6: lam(1 - r) - r, per head, head mean

    # Summed in the official order (words within each layer), so float32 results match it.
    total = sum(sum(term(attn, idx) for idx in indices) for attn in layers)
    return total / (len(layers) * n_words)


def combined_loss(kind, layer_maps, mask, word_token_indices, n_words=None,
                  tr_weight=1.0, sr_weight=1.0, lam=3.0):
    """kind "token" -> tr_weight * TR, "spatial" -> sr_weight * SR, "both" -> their sum.

    The paper optimises both constraints but its released code uses TR only (scaled by 2.5) and
    gives no weighting for SR, so the weights are left to the caller.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}.")
    total = 0.0
    if kind in ("token", "both"):
        total = total + tr_weight * token_ratio_loss(layer_maps, mask, word_token_indices, n_words)
    if kind in ("spatial", "both"):
        total = total + sr_weight * spatial_ratio_loss(
            layer_maps, mask, word_token_indices, lam=lam, n_words=n_words)
    return total
