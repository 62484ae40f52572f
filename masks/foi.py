"""FoI ("Focus on Your Instruction", Guo & Lin, CVPR 2024): mask math and guidance.

Pure torch, no ComfyUI import. Every function is device-agnostic and batch-aware. Equation numbers
refer to the paper (arXiv 2312.10113): Sec. 4.1 / Eq. 2 (mask extraction), Eq. 3-6 (the token-region
mask M used by the attention modulation in ``attention/foi_modulation.py``), Eq. 8-9 (union mask and
mask-guided disentangle sampling).

Mask pipeline (Sec. 4.1), per keyword e_i of sub-instruction T_i, on the 16x16 cross-attention map of
the instruction branch eps(z_t, t, I, T) at the first denoising step:
    gaussian_smooth -> sharpen (Eq. 2, gamma rounds of square + min-max) -> M_ei = 1[A >= tau].
"""
import torch
import torch.nn.functional as F

from .filters import gaussian_smooth, minmax_normalize


# --------------------------------------------------------------------------------------------
# Sec. 4.1: smoothing, Eq. 2 sharpening, threshold
# --------------------------------------------------------------------------------------------

def sharpen(maps, gamma=3):
    """Eq. 2: gamma rounds of "square, then min-max normalise to [0, 1]" per map [..., h, w].

    Follows the text of Sec. 4.1 ("in each cycle, the map is squared and then normalized"); the
    trailing ^2 outside the outermost norm in the typeset Eq. 2 is read as part of the notation,
    not as an extra squaring after the last normalisation. gamma=0 returns norm(maps).
    Computed (and returned) in at least float32, so squaring small half-precision values does
    not underflow.
    """
    x = maps.to(torch.promote_types(maps.dtype, torch.float32))
    if gamma <= 0:
        return minmax_normalize(x)
    for _ in range(int(gamma)):
        x = minmax_normalize(x * x)
    return x


def keyword_masks(keyword_maps, tau=0.5, gamma=3, kernel_size=3, sigma=0.5, ae_compat=True):
    """Sec. 4.1: keyword maps [B, K, h, w] -> (binary masks M_ei = 1[A >= tau], sharpened maps).

    `keyword_maps` are the instruction branch's cross-attention maps at the 16x16 layers, already
    averaged over heads/layers and over the tokens of each keyword. Both outputs are [B, K, h, w];
    the masks are float 0/1, the sharpened maps (in [0, 1]) are for previews. tau is sampled from
    [0.4, 0.7] in the paper's experiments; 0.5 is a fixed default.
    """
    soft = sharpen(gaussian_smooth(keyword_maps, kernel_size, sigma, ae_compat), gamma)
    return (soft >= tau).to(soft.dtype), soft


# --------------------------------------------------------------------------------------------
# Resizing masks to other attention resolutions / the latent (Eq. 3-6 "interpolated", Eq. 8)
# --------------------------------------------------------------------------------------------

def resize_mask(masks, out_hw):
    """Resize binary masks [..., h, w] to out_hw = (H, W), result binary (float 0/1).

    Growing a dimension: nearest ("nearest-exact": each source cell becomes a block; exact
    replication for integer factors, no half-pixel shift otherwise). Shrinking a dimension: area
    average, then >= 0.5 (a target cell is in the mask when at least half of the source cells it
    covers are; ties count as inside). A mixed case does the shrink first, then the growth.
    """
    h, w = masks.shape[-2:]
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    work_dtype = masks.dtype if masks.dtype in (torch.float32, torch.float64) else torch.float32
    x = masks.reshape(-1, 1, h, w).to(work_dtype)
    mid = (min(h, out_h), min(w, out_w))
    if mid != (h, w):
        x = (F.interpolate(x, size=mid, mode="area") >= 0.5).to(x.dtype)
    if mid != (out_h, out_w):
        x = F.interpolate(x, size=(out_h, out_w), mode="nearest-exact")
    return x.reshape(*masks.shape[:-2], out_h, out_w).to(masks.dtype)


def union_mask(keyword_masks, out_hw):
    """Eq. 8: M_union = Upsample(OR_i M_ei) to the latent size. [B, K, h, w] -> [B, 1, H, W]
    (channel dim kept so it broadcasts over latent channels in Eq. 9; .squeeze(1) for a MASK)."""
    union = (keyword_masks > 0.5).any(dim=1, keepdim=True).to(keyword_masks.dtype)
    return resize_mask(union, out_hw)


# --------------------------------------------------------------------------------------------
# Eq. 3-6: the token-region mask M in R^{(r*r) x N}
# --------------------------------------------------------------------------------------------

def token_indices(span, n_tokens):
    """Token positions of one span. A span is always the explicit positions of its tokens (a tuple,
    list, range or 1-D tensor of ints): (4, 5) is the two tokens 4 and 5, never a range."""
    idx = [int(i) for i in (span.tolist() if torch.is_tensor(span) else span)]
    for i in idx:
        if not 0 <= i < n_tokens:
            raise ValueError(f"token index {i} outside 0..{n_tokens - 1}")
    return idx


OUTSIDE_MODES = ("union", "ones", "zeros")


def token_region_mask(keyword_masks, subinstruction_token_spans, n_tokens, out_hw, outside="union"):
    """Eq. 3-6 mask M: [B, K, h, w] keyword masks -> [B, H*W, N] float 0/1.

    M[b, p, n] = 1 iff token n belongs to sub-instruction i and pixel p lies in M_ei (resized to
    out_hw with `resize_mask`). Pixels are flattened row-major (p = y * W + x), the order of the
    query axis in ComfyUI's attention (b c h w -> b (h w) c). `subinstruction_token_spans[i]` holds
    the token positions of sub-instruction i (same for every batch item); a token in several
    spans gets the OR of their masks. Spans are explicit positions (`token_indices`).

    Tokens outside every sub-instruction (BOS, EOS, padding, separators such as "and"), `outside`:
      "union" (default): the column is OR_i M_ei, i.e. such tokens follow the pixel: inside any
          keyword region they keep the instruction scores, outside all regions they take the
          null-instruction scores.
      "ones": instruction scores everywhere.  "zeros": null-instruction scores everywhere.
    Why "union": Sec. 4.2 says "we preserve the masked region's attention in the computation of
    eps(I,T), while substituting attention in the external regions with that from eps(I,0_T)",
    and M is built by broadcasting each keyword mask across its sub-instruction and concatenating
    the sub-instructions into all N columns, i.e. the paper treats every token as part of the
    instruction. For a single instruction this makes M the keyword mask broadcast over all N tokens
    (whole rows inside / outside), exactly the region-wise substitution the text describes; the
    softmax row of a pixel outside every region is then the null branch's row. With "ones" the
    EOS/padding tokens (which in CLIP carry the whole instruction's meaning) would keep the
    instruction active everywhere; with "zeros" masked pixels would lose the instruction's EOS and
    BOS scores, so both contradict the region-wise description.
    """
    if outside not in OUTSIDE_MODES:
        raise ValueError(f"outside must be one of {OUTSIDE_MODES}, got {outside!r}")
    b, k = keyword_masks.shape[:2]
    if len(subinstruction_token_spans) != k:
        raise ValueError(f"{k} keyword masks but {len(subinstruction_token_spans)} token spans")
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    dtype = keyword_masks.dtype if keyword_masks.is_floating_point() else torch.float32
    masks = resize_mask((keyword_masks > 0.5).to(dtype), (out_h, out_w)).reshape(b, k, out_h * out_w)

    # assignment[i, n] = 1 if token n belongs to sub-instruction i
    assignment = torch.zeros(k, n_tokens, dtype=dtype, device=keyword_masks.device)
    for i, span in enumerate(subinstruction_token_spans):
        assignment[i, token_indices(span, n_tokens)] = 1
    # OR over sub-instructions: [B, P, K] x [K, N] counts, > 0
    region = (torch.einsum("bkp,kn->bpn", masks, assignment) > 0).to(dtype)

    unassigned = assignment.sum(0) == 0  # [N]
    if unassigned.any() and outside != "zeros":
        fill = masks.amax(1) if outside == "union" else torch.ones_like(masks[:, 0])  # [B, P]
        region = torch.where(unassigned[None, None, :], fill[:, :, None], region)
    return region


# --------------------------------------------------------------------------------------------
# Eq. 9: mask-guided disentangle sampling
# --------------------------------------------------------------------------------------------

def disentangled_guidance(eps_full, eps_img, eps_none, s_T, s_I, union_mask=None):
    """Eq. 9 (Eq. 1 when union_mask is None, plain IP2P guidance):
        eps = eps_none + s_I (eps_img - eps_none) + s_T (eps_full - eps_img) * M_union
    eps_full = eps(z, I, T), eps_img = eps(z, I, 0_T), eps_none = eps(z, 0_I, 0_T), all
    [B, C, H, W]; union_mask [B, 1, H, W] (or anything broadcastable), from `union_mask`.
    The weights of the three predictions sum to 1 at every pixel, so the same combination applies
    unchanged to denoised (x0) predictions, which is what a ComfyUI guider receives.
    The paper uses it for the first 75 % of steps, then Eq. 1 (the caller switches).
    """
    text_dir = eps_full - eps_img
    if union_mask is not None:
        text_dir = text_dir * union_mask.to(text_dir.dtype)
    return eps_none + s_I * (eps_img - eps_none) + s_T * text_dir


# --------------------------------------------------------------------------------------------
# Sec. 4.1 on a DiT's token grid
# --------------------------------------------------------------------------------------------

# 8, not 4: on the 4x map the filter's edge ring is a quarter of a token, so a keyword region
# one token wide kept under half of each token's cells and vanished (docs/foi.md measures it).
DIT_MASK_UPSAMPLE = 8


def dit_keyword_masks(keyword_maps, tau=0.5, gamma=3, kernel_size=3, sigma=0.5, upsample=DIT_MASK_UPSAMPLE):
    """Sec. 4.1 for maps at a DiT's token grid [B, K, gh, gw] -> (masks, sharpened maps), both at
    the token grid (masks float 0/1).

    The Gaussian filter, Eq. 2 and the threshold run on the maps upsampled `upsample` times
    (nearest: each token's value on its upsample x upsample cells), and each token's mask is then
    whether at least half of its cells pass (resize_mask's area rule). Why: Eq. 2 raises the map to
    the 2^gamma = 8th power between min-max normalisations, so any cell the 3x3 filter pulls below
    tau^(1/8) = 0.917 of the peak drops out. At the token grid that is every token on a region's
    border (an edge token keeps 0.894 of the peak, a corner 0.80): the planted-region IoU fell to
    0.5 (docs/foi.md). On the upsampled map the filter still smooths what it smoothed before,
    at 1/upsample of a token, so it only erodes the outer ring of each border token's cells and
    the token vote keeps the border. upsample=1 is the filter at the token grid. The eroded ring
    is one cell wide, so a token with three or four free sides (a region 1 token wide) keeps
    (u - 2)(u - 1) or (u - 2)^2 of its u^2 cells: under half at u = 4, over half from u = 8.
    """
    b, k, h, w = keyword_maps.shape
    u = max(1, int(upsample))
    fine = keyword_maps.repeat_interleave(u, -2).repeat_interleave(u, -1) if u > 1 else keyword_maps
    masks, soft = keyword_masks(fine, tau=tau, gamma=gamma, kernel_size=kernel_size, sigma=sigma)
    if u > 1:
        masks = resize_mask(masks, (h, w))
        soft = F.interpolate(soft.reshape(b * k, 1, h * u, w * u), size=(h, w), mode="area").reshape(b, k, h, w)
    return masks, soft


def token_masks_to_latent(masks, latent_hw, patch):
    """Token-grid masks [..., gh, gw] -> each token's patch x patch latent cells, cropped to the
    latent (the token grid rounds odd latent sizes up)."""
    big = masks.float().repeat_interleave(patch, -2).repeat_interleave(patch, -1)
    return big[..., :latent_hw[0], :latent_hw[1]]
