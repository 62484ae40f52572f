"""FoI inside the UNet: attn2 replace patches for mask extraction (Sec. 4.1) and cross-condition
attention modulation (Sec. 4.2, Eq. 3-7).

The FoI guider (samplers/foi.py) runs the three IP2P branches in one `calc_cond_batch` call with
the conds list [instruction + image, image only (null instruction), neither]; ComfyUI puts each
batch chunk's index into that list in `cond_or_uncond` (chunks in any order), so chunk 0 is the
instruction branch eps(z, I, T) and chunk 1 the null-instruction branch eps(z, I, 0_T).

One `FoIAttention` patch sits on every cross-attention layer and reads the shared `FoIState`:
- phase "extract" (the first UNet call of a run): returns the layer's normal output; on the
  mask layers (resolution level 2, down + up: 16x16 at 512 px on SD1.x) it also adds the
  instruction branch's head-averaged softmax(QK^T/sqrt(d)) to a running sum;
- phase "edit", while `state.modulate_now`: returns the normal output for every chunk except
  the instruction branch's, which gets A' V with A' from Eq. 3 (X from its own q/k, Y from the
  null-instruction chunk's q/k of the same layer and call, M = the token-region mask resized to
  this layer). With an inner patch (IPAdapter...) the instruction chunk keeps the inner output
  plus the modulation's change (A' V - A V), so the inner patch's own contribution survives.

Split batches: when ComfyUI splits the three branches over several UNet calls (not enough
memory for one), its batching runs the null-instruction chunk before or with the instruction
chunk (it takes conds from the end of the list), so the patch keeps the null chunk's q/k per
layer for the current guider call and uses them when the instruction chunk arrives alone. If
an instruction chunk arrives with no null q/k for the same call (not from memory splitting; only
when the positive carries something the negative lacks, e.g. a ControlNet on the positive alone,
so ComfyUI cannot batch them and runs the positive first), that call is not modulated and a
warning is logged once per run.
"""
import logging

import torch

from ..masks.foi import keyword_masks, token_region_mask, union_mask
from ..masks.validate import check_finite
from .foi_modulation import modulated_attention, token_alpha
from .layers import (ReplacePatch, comfy_attention, install_replace, level_grid, select_layers,
                     unet_attention_layers)
from .recorder import attention_probs, fold_tokens

INSTRUCTION, NULL_INSTRUCTION, UNCONDITIONAL = 0, 1, 2

log = logging.getLogger("attention_edit")


def _tile_tokens(x, n_keys):
    """[..., N] -> [..., n_keys] repeating the token axis (the inverse layout of recorder.fold_tokens)."""
    n = x.shape[-1]
    if n == n_keys:
        return x
    if n_keys % n:
        raise ValueError(f"cross-attention has {n_keys} keys, not a multiple of the instruction's {n} tokens")
    return x.repeat(*([1] * (x.ndim - 1)), n_keys // n)


class FoIState:
    """Everything the patches and the guider share during one sampling run."""

    def __init__(self, mask_level=2, mask_parts=("input", "output"), outside="union"):
        self.mask_level = mask_level
        self.mask_parts = tuple(mask_parts)
        self.outside = outside
        self.instructions = None  # attention.instructions.Instructions
        self.alphas = None  # one float per sub-instruction
        self.latent_hw = None
        self.begin(None)

    # ---- run life cycle -------------------------------------------------------------------
    def begin(self, latent_hw):
        """Forget the previous run (a guider can sample several times)."""
        self.latent_hw = None if latent_hw is None else tuple(int(s) for s in latent_hw)
        self._mask_grid = None if latent_hw is None else level_grid(*self.latent_hw, self.mask_level)
        self.phase = "extract"
        self.prob_sum = None
        self.prob_count = 0
        self.masks = None  # [B, K, h, w] float 0/1 at the mask layers' grid
        self.soft_maps = None  # [B, K, h, w] sharpened maps (previews)
        self.modulate_now = False
        self.xi = 0.0
        self.call_id = 0
        self._region_cache = {}
        self._alpha_cache = {}
        self._null_qk = {}
        self._warned_split = False
        self.stats = {"modulated": 0, "skipped_split": 0, "from_cache": 0, "recorded": 0}

    def next_call(self, modulate, xi_t):
        """Called by the guider before each calc_cond_batch."""
        self.call_id += 1
        self.modulate_now = bool(modulate) and self.phase == "edit"
        self.xi = xi_t
        self._null_qk = {}

    # ---- Sec. 4.1: mask extraction -------------------------------------------------------
    def record(self, q, k, rows, heads):
        probs = attention_probs(q.index_select(0, rows), k.index_select(0, rows), heads)
        probs = fold_tokens(probs, self.instructions.n_tokens)
        self.prob_sum = probs if self.prob_sum is None else self.prob_sum + probs
        self.prob_count += 1
        self.stats["recorded"] += 1

    def finish_extraction(self, gamma=3, tau=0.5, kernel_size=3, sigma=0.5):
        """Mean instruction-branch map over the mask layers -> per-keyword maps -> Eq. 2 masks."""
        if self.prob_sum is None:
            raise RuntimeError(
                "FoI recorded no instruction-branch cross-attention at the first step: the "
                "instruction conditioning must cover the whole image (no area / mask conditioning)")
        h, w = self._mask_grid
        mean = self.prob_sum / self.prob_count  # [B, h*w, N]
        maps = torch.stack([mean[..., list(pos)].mean(-1) for pos in self.instructions.keyword_positions],
                           dim=1)  # [B, K, h*w]
        maps = maps.reshape(maps.shape[0], maps.shape[1], h, w)
        check_finite(maps, "FoI's keyword attention at the first step")  # small; NaN gives empty masks
        self.masks, self.soft_maps = keyword_masks(maps, tau=tau, gamma=gamma, kernel_size=kernel_size,
                                                   sigma=sigma)
        self.prob_sum = None
        self.phase = "edit"
        warn_empty_masks(self.instructions.keywords, self.masks)
        return self.masks

    # ---- masks for Eq. 3 and Eq. 9 ---------------------------------------------------------
    def region_mask(self, grid, n_keys, device):
        """Eq. 3-6 M for one layer grid: [B, h*w, n_keys] (cached: masks are fixed after step 0)."""
        key = (grid, n_keys, device)
        if key not in self._region_cache:
            region = token_region_mask(self.masks, self.instructions.spans, self.instructions.n_tokens,
                                       grid, outside=self.outside)
            self._region_cache[key] = _tile_tokens(region, n_keys).to(device)
        return self._region_cache[key]

    def alpha_tokens(self, n_keys, device):
        key = (n_keys, device)
        if key not in self._alpha_cache:
            if self.alphas is None or all(a == 1.0 for a in self.alphas):
                self._alpha_cache[key] = None  # Eq. 6 with all-ones alpha
            else:
                alpha = token_alpha(self.alphas, self.instructions.spans, self.instructions.n_tokens)
                self._alpha_cache[key] = _tile_tokens(alpha, n_keys).to(device)
        return self._alpha_cache[key]

    def union(self, latent_hw, device):
        """Eq. 8 union mask at the latent size, [B, 1, H, W]."""
        key = ("union", tuple(latent_hw), device)
        if key not in self._region_cache:
            self._region_cache[key] = union_mask(self.masks, latent_hw).to(device)
        return self._region_cache[key]

    # ---- split batches ---------------------------------------------------------------------
    def keep_null(self, layer_key, q1, k1):
        self._null_qk[layer_key] = (q1, k1)

    def null_for(self, layer_key):
        return self._null_qk.get(layer_key)

    def warn_split(self):
        self.stats["skipped_split"] += 1
        if not self._warned_split:
            self._warned_split = True
            log.warning("FoI: the instruction branch ran in a UNet call without the null-instruction "
                        "branch, so cross-attention modulation was skipped for that call.")


UNET_EMPTY_HINT = "Try a lower tau or gamma."
# docs/foi.md, "The blur": a lower tau inside the paper's 0.4-0.7 changes little after Eq. 2's
# 8th power; a lower gamma keeps more of a moderately peaked map, a larger upsample keeps a
# region one token wide.
DIT_EMPTY_HINT = ("Lower gamma (1 or 2) keeps more of a weakly peaked map; raise mask_upsample above 8 (up to 16) "
                  "if the keyword's region is one token wide; a lower tau helps little.")


def warn_empty_masks(keywords, masks, hint=UNET_EMPTY_HINT):
    """Log the keywords whose first-step mask ([B, K, h, w]) is empty in any image."""
    empty = [kw for kw, m in zip(keywords, masks.flatten(2).amax(-1).amin(0)) if float(m) < 0.5]
    if empty:
        log.warning("FoI: the mask of keyword(s) %s is empty in at least one image; those "
                    "sub-instructions will barely edit there. %s", ", ".join(empty), hint)


def _rows(chunks, index, per_chunk, device):
    """Batch rows of the first chunk whose cond index is `index`, or None."""
    if index not in chunks:
        return None
    start = chunks.index(index) * per_chunk
    return torch.arange(start, start + per_chunk, device=device)


class FoIAttention(ReplacePatch):
    def __init__(self, state, layer, inner=None):
        super().__init__(inner)
        self.state = state
        self.layer = layer
        self.records = layer.level == state.mask_level and layer.part in state.mask_parts

    def __call__(self, q, k, v, extra_options):
        state = self.state
        chunks = list(extra_options.get("cond_or_uncond") or [])
        if not chunks or state.instructions is None or state.latent_hw is None:
            return self.attend(q, k, v, extra_options)
        h, w = self.layer.grid(*state.latent_hw)
        if q.shape[1] != h * w:
            return self.attend(q, k, v, extra_options)  # an area-conditioned chunk
        per_chunk = q.shape[0] // len(chunks)
        heads = extra_options["n_heads"]

        if state.phase == "extract":
            out = self.attend(q, k, v, extra_options)
            rows = _rows(chunks, INSTRUCTION, per_chunk, q.device)
            if self.records and rows is not None:
                state.record(q, k, rows, heads)
            return out

        if not state.modulate_now:
            return self.attend(q, k, v, extra_options)
        rows0 = _rows(chunks, INSTRUCTION, per_chunk, q.device)
        rows1 = _rows(chunks, NULL_INSTRUCTION, per_chunk, q.device)
        if rows0 is None:
            if rows1 is not None:  # split batch: the instruction chunk comes in a later call
                state.keep_null(self.layer.key, q.index_select(0, rows1), k.index_select(0, rows1))
            return self.attend(q, k, v, extra_options)
        q0, k0, v0 = (t.index_select(0, rows0) for t in (q, k, v))
        if rows1 is not None:
            q1, k1 = q.index_select(0, rows1), k.index_select(0, rows1)
        else:
            cached = state.null_for(self.layer.key)
            if cached is None or cached[0].shape != q0.shape or cached[1].shape != k0.shape:
                state.warn_split()
                return self.attend(q, k, v, extra_options)
            q1, k1 = cached
            state.stats["from_cache"] += 1

        region = state.region_mask((h, w), k.shape[1], q.device)
        modulated = modulated_attention(q0, k0, v0, q1, k1, region, state.alpha_tokens(k.shape[1], q.device),
                                        state.xi, heads)
        state.stats["modulated"] += 1
        if self.inner is not None:
            out = self.inner(q, k, v, extra_options)
            plain = comfy_attention(q0, k0, v0, extra_options)
            modulated = out.index_select(0, rows0) + (modulated - plain)
            return out.index_copy(0, rows0, modulated.to(out.dtype))
        # no inner patch: ComfyUI's attention for the other chunks only
        start = chunks.index(INSTRUCTION) * per_chunk
        others = torch.cat([torch.arange(start, device=q.device),
                            torch.arange(start + per_chunk, q.shape[0], device=q.device)])
        if others.numel() == 0:
            return modulated.to(q.dtype)
        rest = comfy_attention(q.index_select(0, others), k.index_select(0, others), v.index_select(0, others),
                               extra_options)
        out = rest.new_empty((q.shape[0],) + tuple(rest.shape[1:]))
        out.index_copy_(0, others, rest)
        out.index_copy_(0, rows0, modulated.to(rest.dtype))
        return out


def install_foi(model_clone, state):
    """Put an FoIAttention patch on every cross-attention layer of `model_clone` (a clone, never
    the caller's model), wrapping whatever replace patch each layer already has."""
    select_layers(model_clone, state.mask_level, state.mask_parts)  # clear error if the level is absent
    for layer, _ in unet_attention_layers(model_clone):
        install_replace(model_clone, "attn2", layer,
                        lambda inner, layer=layer: FoIAttention(state, layer, inner))
    return model_clone
