"""InstDiffEdit instant attention mask (Zou et al., AAAI 2024), in pure torch.

Follows the official code (github.com/xiaotianqing/InstDiffEdit, model/InstDiffEdit.py and
model/util.py at 455968b3): `get_mask` builds one map per word (`token_combination`), picks the
word most similar to the inverted start-token map and sets a position vector P (`get_position`,
`cal_sim`), combines the maps P marks (`refine`), then blurs and thresholds (`post_deal`).

`exact=True` reproduces the official numbers bit-exactly, quirks included: float32 `255*m/max`
then uint8 truncation, Pillow's BICUBIC resize (a = -0.5, 22-bit fixed point, horizontal then
vertical pass, uint8 rounding after each), float32 min-max renormalisation with truncation, cosine
similarity on the raw 0..255 values. `exact=False` keeps the same steps in plain float (no uint8
steps, torch bicubic resize); it agrees with the official index and P less often.

Every division the official code does by a Python number is done here by a tensor on the input's
device: CUDA replaces `x / scalar` by `x * (1 / scalar)`, which is not bit-exact.

Degenerate inputs, where the official code yields NaN or raises, give defined results instead:
a map that is constant at a normalisation step becomes all zeros; when no word map has a positive
cosine similarity with the inverted start-token map there is no chosen word (index 0), P is all 0
and the mask is empty; a position without any +1 entry gives an empty mask.
"""
import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

UPSCALE = 4  # official maps are 16x16 and the mask is 64x64 (latent size)
PIL_PRECISION_BITS = 22  # Pillow Resample.c: 32 - 8 - 2 bits for the fixed-point weights
PIL_BICUBIC_A = -0.5
BLUR_KERNEL = (6 / 16, 4 / 16, 1 / 16)  # centre, +-1, +-2 of OpenCV's 5-tap sigma-0 table kernel


class InstDiffEditMask(NamedTuple):
    """Result of `refine_mask`; B = batch, M = number of maps (words + 2), H x W = 4x the input."""
    mask: torch.Tensor  # [B, H, W] float 0/1, 1 = edit region
    position: torch.Tensor  # [B, M] int64 in {-1, 0, 1}: P over [BOS, words..., EOS]
    # index and similarity are None when a frozen position was passed in
    index: Optional[torch.Tensor]  # [B] int64: chosen word, 1-based into the maps (0: none)
    similarity: Optional[torch.Tensor]  # [B, M-2] float64: S, cos(chosen word, word i)
    word_maps: torch.Tensor  # [B, M, H, W] float32 in 0..255: G (inverted BOS, words, EOS)
    refined: torch.Tensor  # [B, H, W] float32: R, the refined map before blurring
    blurred: torch.Tensor  # [B, H, W] float32: blurred, min-max normalised map compared with phi


def official_word_groups(prompt, token_decoded):
    """Token columns averaged into each word map, as the official `token_combination` groups them.

    `token_decoded` holds `tokenizer.decode(id)` for every token of the prompt, BOS and EOS
    included (no padding). Words are `prompt.split(' ')`. Returns one list of column indices per
    map between BOS (column 0) and EOS (column len(token_decoded) - 1), which are not included.
    Raises ValueError when the tokens cannot be aligned with the words (the official code would
    raise IndexError or silently misalign, e.g. on double spaces).
    """
    words = prompt.split(" ")
    inner = range(1, len(token_decoded) - 1)
    if len(token_decoded) <= len(words) + 2:  # official flag == 0: one map per token
        return [[column] for column in inner]
    groups, pending, text = [], [], ""
    for column in inner:
        if len(groups) == len(words):
            raise ValueError(f"tokens left over after the last word of {prompt!r}")
        word, piece = words[len(groups)], token_decoded[column]
        if piece == word:  # exact, case-sensitive match: the token's own map
            groups.append([column])
            continue
        pending.append(column)
        text += piece
        if text.lower() == word.lower():  # sub-tokens spell the word: their mean map
            groups.append(pending)
            pending, text = [], ""
    if pending or len(groups) != len(words):
        raise ValueError(f"tokens {token_decoded} do not spell the words of {prompt!r}; "
                         "separate words by single spaces")
    return groups


def refine_mask(attn, word_groups, eos_index, theta_hi=0.9, theta_lo=0.6, phi=0.2,
                position=None, exact=True):
    """InstDiffEdit mask from aggregated cross-attention probabilities (official `get_mask`).

    attn: [B, h, w, T] (or [h, w, T], treated as B = 1) attention probabilities over the T
    token columns of the edit prompt, any h x w; the mask is (4h, 4w).
    word_groups: per word, its token columns (see `official_word_groups`); eos_index: EOS column.
    theta_hi / theta_lo: S >= theta_hi gives P = +1, S <= theta_lo gives -1 (0.9 / 0.6 benchmark,
    0.9 / 0.3 demo). phi: blurred map > phi is the mask (0.2 benchmark, 0.3 demo).
    position: None computes P (first step); the official loop then freezes it, so pass the
    returned `position` back on later steps ([M] or [B, M]).
    A one-word prompt always uses its word map (P = [0, 1, 0], any given position ignored), as
    the official code does.
    """
    if not word_groups:
        raise ValueError("InstDiffEdit needs at least one word")
    if attn.dim() == 3:
        attn = attn.unsqueeze(0)
    maps = _token_maps(attn.float(), word_groups, eos_index)
    word_maps = _exact_word_maps(maps) if exact else _float_word_maps(maps)
    batch, n_maps = word_maps.shape[:2]
    index = similarity = None
    if n_maps == 3:  # official get_mask: len(images) == 3 -> the single word map
        position = torch.tensor([0, 1, 0], device=attn.device)
        index = torch.ones(batch, dtype=torch.int64, device=attn.device)
        similarity = torch.ones(batch, 1, dtype=torch.float64, device=attn.device)
    elif position is None:
        index, similarity = _index_and_similarity(word_maps)
        position = _position(similarity, index, theta_hi, theta_lo)
    position = _as_position(position, batch, n_maps, attn.device)
    refined = _refine(word_maps, position)
    blurred = _min_max(_min_max(_blur(_blur(refined))))  # official post_deal
    mask = (blurred > phi).float()
    return InstDiffEditMask(mask, position, index, similarity, word_maps, refined, blurred)


def _token_maps(attn, word_groups, eos_index):
    """[B, M, h, w]: BOS column, one map per word (float32 mean of its columns), EOS column."""
    maps = [attn[..., 0]]
    for columns in word_groups:
        maps.append(torch.stack([attn[..., c] for c in columns], 0).mean(0))
    maps.append(attn[..., eos_index])
    return torch.stack(maps, 1)


def _exact_word_maps(maps):
    """Official token_combination: uint8 scaling, PIL bicubic x4, inverted BOS, renormalisation."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    scaled = torch.where(peak > 0, 255 * maps / peak, torch.zeros_like(maps))
    as_uint8 = scaled.clamp(0, 255).to(torch.int64)  # numpy astype(uint8) truncates
    h, w = maps.shape[-2:]
    resized = _pil_resize_axis(as_uint8, UPSCALE * w)
    resized = _pil_resize_axis(resized.transpose(-1, -2), UPSCALE * h).transpose(-1, -2)
    resized[:, 0] = 255 - resized[:, 0]  # ImageChops.invert on the start-token map
    as_float = resized.float() / _device_scalar(255.0, maps)  # ToTensor
    return (_min_max(as_float) * 255.0).trunc()  # float32 renormalisation, astype(uint8)


def _float_word_maps(maps):
    """Float-only token_combination: same steps without uint8 steps, torch bicubic resize."""
    peak = maps.amax(dim=(-2, -1), keepdim=True)
    scaled = torch.where(peak > 0, maps / peak, torch.zeros_like(maps))
    h, w = maps.shape[-2:]
    resized = F.interpolate(scaled, size=(UPSCALE * h, UPSCALE * w), mode="bicubic",
                            align_corners=False).clamp(0, 1)
    resized[:, 0] = 1 - resized[:, 0]
    return _min_max(resized) * 255.0


def _pil_resize_axis(pixels, out_size):
    """Pillow's 8-bit BICUBIC upscaling pass along the last axis (int64 values 0..255)."""
    taps, weights = _pil_bicubic_taps(pixels.shape[-1], out_size)
    taps, weights = taps.to(pixels.device), weights.to(pixels.device)
    total = (pixels[..., taps] * weights).sum(-1) + (1 << (PIL_PRECISION_BITS - 1))
    return torch.div(total, 1 << PIL_PRECISION_BITS, rounding_mode="floor").clamp(0, 255)


@functools.lru_cache(maxsize=16)  # the same few sizes every step; callers never modify the result
def _pil_bicubic_taps(in_size, out_size):
    """([out, 5] input indices, [out, 5] fixed-point weights) as Pillow's precompute_coeffs
    computes them for upscaling (support 2 input pixels, half-pixel centres)."""
    scale = in_size / out_size
    taps, weights = [], []
    for out in range(out_size):
        centre = (out + 0.5) * scale
        first = max(int(centre - 2.0 + 0.5), 0)
        stop = min(int(centre + 2.0 + 0.5), in_size)
        row = [_pil_bicubic(x - centre + 0.5) for x in range(first, stop)]
        total = sum(row)
        row = [w / total for w in row]  # taps outside the image dropped, the rest renormalised
        fixed = [int(w * (1 << PIL_PRECISION_BITS) + (0.5 if w >= 0 else -0.5)) for w in row]
        pad = 5 - len(row)
        taps.append(list(range(first, stop)) + [first] * pad)
        weights.append(fixed + [0] * pad)
    return torch.tensor(taps), torch.tensor(weights, dtype=torch.int64)


def _pil_bicubic(x):
    """Pillow's bicubic kernel, a = -0.5."""
    a, x = PIL_BICUBIC_A, abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _index_and_similarity(word_maps):
    """Official get_position's two cal_sim calls: chosen word index [B] and S [B, n_words]."""
    flat = word_maps.flatten(2).to(_similarity_dtype(word_maps.device))
    norm = flat.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    unit = flat / norm  # a zero map has cosine 0 with everything
    words = unit[:, 1:-1]  # EOS is excluded
    to_background = (words * unit[:, :1]).sum(-1)
    # strict '>' from a running max of 0: the first maximum wins, and 0 means no word at all
    index = torch.where(to_background.amax(-1) > 0, to_background.argmax(-1) + 1, 0)
    rows, chosen = torch.arange(len(words)), (index - 1).clamp_min(0)
    similarity = (words * words[rows, chosen][:, None]).sum(-1)
    similarity[rows, chosen] = 1.0  # cal_sim inserts an exact 1.0
    return index, torch.where(index[:, None] > 0, similarity, 0.0)


def _position(similarity, index, theta_hi, theta_lo):
    """Official get_position: +1 if S >= theta_hi, -1 if S <= theta_lo, else 0; BOS, EOS 0."""
    words = torch.where(similarity >= theta_hi, 1, torch.where(similarity <= theta_lo, -1, 0))
    words = torch.where(index[:, None] > 0, words, 0)
    return F.pad(words, (1, 1))


def _as_position(position, batch, n_maps, device):
    position = torch.as_tensor(position, dtype=torch.int64, device=device)
    if position.shape[-1] != n_maps:
        raise ValueError(f"position has {position.shape[-1]} entries, the prompt {n_maps} maps")
    return position.expand(batch, n_maps).clone()


def _refine(word_maps, position):
    """Official refine: min-max(mean of +1 maps) minus min-max(mean of -1 maps), clamped at 0."""
    maps01 = word_maps / _device_scalar(255.0, word_maps)  # ToTensor
    objects, _ = _mean_of_selected(maps01, position == 1)
    background, has_background = _mean_of_selected(maps01, position == -1)
    return torch.where(has_background[:, None, None],
                       (objects - background).clamp(min=0.0), objects)


def _mean_of_selected(maps01, selected):
    """Min-max normalised mean of the selected maps ([B, H, W]) and whether any was selected."""
    total = torch.zeros_like(maps01[:, 0])
    for i in range(maps01.shape[1]):  # summed in map order, as the official loop does
        total = total + torch.where(selected[:, i, None, None], maps01[:, i], 0.0)
    count = selected.sum(1).to(maps01.dtype)[:, None, None]
    mean = torch.where(count > 0, total / count.clamp_min(1), 0.0)
    return _min_max(mean), count[:, 0, 0] > 0


def _blur(image):
    """cv2.GaussianBlur(ksize 5, sigma 0): [1,4,6,4,1]/16 rows then columns, BORDER_REFLECT_101.

    Same operation order as OpenCV's symmetric filter; OpenCV builds with IPP fuse the
    multiply-adds, so results can differ from theirs by an ulp (~1e-7).
    """
    return _blur_last_axis(_blur_last_axis(image).transpose(-1, -2)).transpose(-1, -2)


def _blur_last_axis(image):
    padded = F.pad(image, (2, 2), mode="reflect")
    width = image.shape[-1]

    def shifted(offset):
        return padded[..., 2 + offset: 2 + offset + width]

    centre, near, far = BLUR_KERNEL
    centre_term = shifted(0) * centre
    return centre_term + (shifted(-1) + shifted(1)) * near + (shifted(-2) + shifted(2)) * far


def _min_max(images):
    """(x - min) / (max - min) per image over the last two axes; a constant image gives zeros."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    high = images.amax(dim=(-2, -1), keepdim=True)
    span = high - low
    return torch.where(span > 0, (images - low) / torch.where(span > 0, span, 1.0), 0.0)


def _device_scalar(value, like):
    return torch.tensor(value, dtype=like.dtype, device=like.device)


def _similarity_dtype(device):
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
