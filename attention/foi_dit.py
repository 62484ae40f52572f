"""FoI on DiT instruction-editing models (Flux Kontext, Flux.2, Qwen-Image-Edit): keyword masks from the
joint attention at the first step (Sec. 4.1, Eq. 2) and the cross-condition attention modulation
(Sec. 4.2, Eq. 3-7) on the image -> text scores of joint attention. docs/foi.md ("DiT models")
maps every adaptation to its equation.

Installed on the sampling clone through ComfyUI's public hooks, each chaining to what was there
(the same three the DiT recorder uses, attention/dit_recorder.py):
- an APPLY_MODEL wrapper reads each forward's token layout [text | generated image | reference
  image] (families.Layout), its chunks (`cond_or_uncond`) and numbers its attention calls;
- `patches_replace["dit"]` tags on the mask blocks say when a mask block runs (step 0 recording);
- `transformer_options["optimized_attention_override"]` sees every joint attention call.

The guider (samplers/foi_dit.py) orders the conds so that the null instruction's forward runs
before or with the instruction's, and tells the state which chunk index is which
(`state.branches`). Kontext's two branches have contexts of one length (T5 padded to 256) and run
in one forward; when memory is short ComfyUI splits such a batch taking conds from the END of the
list, so the order is [instruction, null, (neither)]. Qwen-Image-Edit's contexts differ in length,
so ComfyUI runs one forward per branch in list order: [null, instruction, (neither)]. A null
forward alone keeps its image queries per attention call for the instruction's forward of the
same model call.
"""
import logging

import torch

from ..masks.foi import DIT_MASK_UPSAMPLE, dit_keyword_masks, token_masks_to_latent, token_region_mask
from ..masks.validate import check_finite
from .families import PATCH, parse_blocks, require_family, token_grid
from .dit_kernel import bind_attention_args, heads_first, sdpa_runs_cpu_flash, text_probabilities
from .dit_recorder import tag_blocks
from .foi_modulation import modulate_scores, token_alpha
from .foi_patch import DIT_EMPTY_HINT, warn_empty_masks
from .layers import ChainedPatch

INSTRUCTION_FIRST = {"instruction": 0, "null": 1, "neither": 2}  # contexts of one length (batched)
NULL_FIRST = {"null": 0, "instruction": 1, "neither": 2}  # contexts of different lengths (one forward each)
WRAPPER_KEY = "attention_edit_foi_dit"
LOGITS_BUDGET = 64 * 2 ** 20  # bytes of float32 image x key logits built at once

log = logging.getLogger("attention_edit")


def _rows(chunks, index, per_chunk):
    if index not in chunks:
        return None
    start = chunks.index(index) * per_chunk
    return slice(start, start + per_chunk)


# --------------------------------------------------------------------------------------------
# Eq. 3 on joint attention: only the image -> text logits change
# --------------------------------------------------------------------------------------------

def _attend_lse(q, k, v, bias):
    """softmax(q k^T / sqrt(d) + bias) v and its row log-sum-exp, without a full logits matrix
    where a fused kernel applies; q [B, H, I, D], k/v [B, H, R, D], bias [B or 1, 1 or H, I, R]."""
    if sdpa_runs_cpu_flash(q, k, v, bias):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, dropout_p=0.0, is_causal=False, attn_mask=bias)
        return out.float(), lse.float()
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
        try:
            attn_bias = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, attn_bias, True, 0.0, False)[:2]
            return out.float(), lse[..., :q.shape[2]].float()
        except RuntimeError:
            pass  # an unsupported shape / dtype: the chunked path below
    scale = q.shape[-1] ** -0.5
    chunk = max(1, LOGITS_BUDGET // (q.shape[0] * q.shape[1] * k.shape[2] * 4))
    outs, lses = [], []
    for start in range(0, q.shape[2], chunk):
        logits = q[:, :, start:start + chunk].float() @ k.float().transpose(-1, -2) * scale
        if bias is not None:
            logits = logits + bias[..., start:start + chunk, :].float()
        lse = torch.logsumexp(logits, -1)
        outs.append((logits - lse[..., None]).exp_() @ v.float())
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def modulated_image_rows(q_img, k, v, q_null_img, n_txt, region, alpha=None, xi_t=0.0, bias=None,
                         bias_null=None):
    """The instruction branch's joint-attention output for its generated-image queries with FoI's
    Eq. 3 on the image -> text logits (float32, [B, H, I, D]).

    q_img [B, H, I, D]: the instruction's image queries; k, v [B, H, L, D]: all its keys / values
    ([text | image | reference]); q_null_img: the null instruction's image queries (same shape as
    q_img). region [B, I, n_txt] (Eq. 3's M at the token grid), alpha [n_txt] or None, xi_t float.
    bias: the call's attention-mask rows [B or 1, 1 or H, I, L] or None (bias_null: the null rows').

    Scores are the scaled logits s = q k^T / sqrt(d) (+ mask bias): X = s(Q_{I,T}, K_{I,T}) (Eq. 4),
    Y = s(Q_{I,0}, K_{I,T}) (Eq. 5 with the instruction's text keys, docs/foi.md), mixed as
    (X + dX) M + Y (1 - M) (Eq. 3, 6) on the text columns only; the image / reference columns keep
    the instruction's own logits. The row is normalised over all keys as the model does: the
    text block's softmax and the rest's (a fused kernel with its lse) are joined by their lse.
    """
    scale = q_img.shape[-1] ** -0.5
    k_txt, v_txt = k[:, :, :n_txt].float(), v[:, :, :n_txt].float()
    X = q_img.float() @ k_txt.transpose(-1, -2) * scale  # Eq. 4
    Y = q_null_img.float() @ k_txt.transpose(-1, -2) * scale  # Eq. 5
    if bias is not None:
        X = X + bias[..., :n_txt].float()
    if bias_null is not None:
        Y = Y + bias_null[..., :n_txt].float()
    M = region[:, None].to(X.device, X.dtype)
    a = None if alpha is None else alpha.to(X.device, X.dtype)
    text_logits = modulate_scores(X, Y, M, a, xi_t)  # Eq. 3 numerator, already scaled
    lse_txt = torch.logsumexp(text_logits, -1)
    out_txt = (text_logits - lse_txt[..., None]).exp_() @ v_txt
    rest_bias = None if bias is None else bias[..., n_txt:]
    out_rest, lse_rest = _attend_lse(q_img, k[:, :, n_txt:], v[:, :, n_txt:], rest_bias)
    lse = torch.logaddexp(lse_txt, lse_rest)
    return (out_txt * (lse_txt - lse).exp_()[..., None] + out_rest * (lse_rest - lse).exp_()[..., None])


# --------------------------------------------------------------------------------------------
# shared state and hooks
# --------------------------------------------------------------------------------------------

class FoIDiTState:
    """What the hooks and the guider share during one sampling run."""

    def __init__(self, mask_blocks="", outside="union"):
        self.mask_blocks_spec = mask_blocks
        self.outside = outside
        self.instructions = None
        self.alphas = None
        self.mask_blocks = []
        self.branches = dict(NULL_FIRST)  # cond index of each branch (the guider sets it)
        self.patch = PATCH  # latent pixels per token (install_foi_dit sets the family's: Flux.2 1)
        self.begin(None)

    def begin(self, latent_hw):
        self.latent_hw = None if latent_hw is None else tuple(int(s) for s in latent_hw)
        self.grid = None if latent_hw is None else token_grid(latent_hw, self.patch)
        self.shift = 0  # the instruction's first token among the recorded keys (Flux.2's left padding)
        self.phase = "extract"
        self.prob_sum = None
        self.prob_count = 0
        self.masks = None  # [B, K, gh, gw] float 0/1 at the token grid
        self.soft_maps = None
        self.modulate_now = False
        self.xi = 0.0
        self.forward = None
        self.block = None
        self._null_q = {}
        self._cache = {}
        self._warned = False
        self.stats = {"modulated": 0, "skipped": 0, "recorded": 0}

    def next_call(self, modulate, xi_t):
        """Before each calc_cond_batch of the guider."""
        self.modulate_now = bool(modulate) and self.phase == "edit"
        self.xi = float(xi_t)
        self._null_q = {}

    # ---- Sec. 4.1 -----------------------------------------------------------------------
    def record(self, q_img, k_txt, mask_block):
        probs = text_probabilities(q_img, k_txt, None, mask_block)  # [B, I, n_txt], rows sum to 1
        self.prob_sum = probs if self.prob_sum is None else self.prob_sum + probs
        self.prob_count += 1
        self.stats["recorded"] += 1

    def keyword_maps(self):
        """[B, K, gh, gw]: the mean text-normalised map of each keyword's tokens."""
        if self.prob_sum is None:
            raise RuntimeError(
                "FoI recorded no instruction attention at the first step: the instruction "
                "conditioning must cover the whole image (no area conditioning), and the mask blocks "
                "must run (mask_blocks).")
        mean = self.prob_sum / self.prob_count
        maps = torch.stack([mean[..., [p + self.shift for p in pos]].mean(-1)
                            for pos in self.instructions.keyword_positions], 1)
        return maps.reshape(maps.shape[0], maps.shape[1], *self.grid)

    def finish_extraction(self, gamma=3, tau=0.5, kernel_size=3, sigma=0.5, upsample=DIT_MASK_UPSAMPLE):
        maps = self.keyword_maps()
        check_finite(maps, "FoI's keyword attention at the first step")
        self.masks, self.soft_maps = dit_keyword_masks(maps, tau, gamma, kernel_size, sigma, upsample)
        self.prob_sum = None
        self.phase = "edit"
        warn_empty_masks(self.instructions.keywords, self.masks, DIT_EMPTY_HINT)
        return self.masks

    # ---- Eq. 3-6 inputs ------------------------------------------------------------------
    def spans(self, start):
        """The sub-instructions' token positions among the text keys, the prompt starting at `start`
        (Flux.2: after the left padding; 0 elsewhere)."""
        return [tuple(p + start for p in span) for span in self.instructions.spans]

    def region(self, n_txt, device, start=0):
        key = ("region", n_txt, device, start)
        if key not in self._cache:
            self._cache[key] = token_region_mask(self.masks, self.spans(start), n_txt, self.grid,
                                                 outside=self.outside).to(device)
        return self._cache[key]

    def alpha_tokens(self, n_txt, device, start=0):
        key = ("alpha", n_txt, device, start)
        if key not in self._cache:
            if self.alphas is None or all(a == 1.0 for a in self.alphas):
                self._cache[key] = None
            else:
                self._cache[key] = token_alpha(self.alphas, self.spans(start), n_txt).to(device)
        return self._cache[key]

    def union(self, latent_hw, device):
        """Eq. 8: OR of the keyword masks, each token's 2x2 latent cells (cropped to the latent)."""
        key = ("union", tuple(latent_hw), device)
        if key not in self._cache:
            union = (self.masks > 0.5).any(1, keepdim=True)
            self._cache[key] = token_masks_to_latent(union, latent_hw, self.patch).to(device)
        return self._cache[key]

    def warn_unpaired(self):
        self.stats["skipped"] += 1
        if not self._warned:
            self._warned = True
            log.warning("FoI: the instruction branch ran without the null instruction's queries of the "
                        "same model call, so the attention modulation was skipped for that call.")


class _Forward:
    def __init__(self, layout, chunks, per_chunk):
        self.layout = layout
        self.chunks = chunks
        self.per_chunk = per_chunk
        self.calls = 0  # attention calls so far in this forward (the same order in every branch)


class _FoIOverride(ChainedPatch):
    """optimized_attention_override: step-0 recording in the mask blocks, Eq. 3 after."""

    def __init__(self, state, inner):
        super().__init__(inner)
        self.state = state

    def _run(self, func, args, kwargs):
        return self.inner(func, *args, **kwargs) if self.inner is not None else func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        state, forward = self.state, self.state.forward
        if forward is None or (state.phase == "edit" and not state.modulate_now):
            return self._run(func, args, kwargs)
        call = bind_attention_args(args, kwargs)
        q, k, v, mask = heads_first(call)
        layout = forward.layout
        if q.shape[2] < layout.n_txt + layout.n_img:
            return self._run(func, args, kwargs)
        index = forward.calls
        forward.calls += 1
        img = layout.image_rows
        inst = _rows(forward.chunks, state.branches["instruction"], forward.per_chunk)
        null = _rows(forward.chunks, state.branches["null"], forward.per_chunk)

        def mask_rows(rows):
            if mask is None:
                return None
            return (mask[rows] if mask.shape[0] > 1 else mask)[..., img, :]

        if state.phase == "extract":
            out = self._run(func, args, kwargs)
            if inst is not None and state.block in state.mask_blocks:
                # Flux.2: the keys from key_start (its zero left-padding is not the instruction)
                bias, first = mask_rows(inst), layout.key_start
                state.shift = layout.prompt_start - first
                state.record(q[inst][:, :, img], k[inst][:, :, first:layout.n_txt],
                             None if bias is None else bias[..., first:layout.n_txt])
            return out

        if inst is None:
            if null is not None:  # a forward of the null branch alone: its queries for the instruction's
                # a copy of the image rows only: a view would keep the whole call's q alive
                bias = mask_rows(null)
                state._null_q[index] = (q[null][:, :, img].clone(), None if bias is None else bias.clone())
            return self._run(func, args, kwargs)
        if null is not None:
            q_null, bias_null = q[null][:, :, img], mask_rows(null)
        else:
            kept = state._null_q.get(index)
            if kept is None or kept[0].shape != q[inst][:, :, img].shape:
                state.warn_unpaired()
                return self._run(func, args, kwargs)
            q_null, bias_null = kept
        modulated = modulated_image_rows(
            q[inst][:, :, img], k[inst], v[inst], q_null, layout.n_txt,
            state.region(layout.n_txt, q.device, layout.prompt_start),
            state.alpha_tokens(layout.n_txt, q.device, layout.prompt_start), state.xi,
            mask_rows(inst), bias_null)
        state.stats["modulated"] += 1
        if self.inner is None:
            out = _rest_of_call(func, call, mask, inst, img, q.shape[2])
        else:  # another override (an attention backend...): it computes the call, we replace our rows
            out = self._run(func, args, kwargs).clone()
        if call["skip_output_reshape"]:  # [B, H, L, D]
            out[inst, :, img] = modulated.to(out.dtype)
        else:  # [B, L, H * D]
            b, h, n, d = modulated.shape
            out[inst, img] = modulated.transpose(1, 2).reshape(b, n, h * d).to(out.dtype)
        return out


def _kernel(func, call, q, k, v, mask):
    """ComfyUI's attention function on (a part of) the call: q, k, v in the call's own layout."""
    return func(q, k, v, call["heads"], mask=mask, attn_precision=call["attn_precision"],
                skip_reshape=call["skip_reshape"], skip_output_reshape=call["skip_output_reshape"],
                **(call.get("kwargs") or {}))


def _rest_of_call(func, call, mask, inst, img, length):
    """The call's output with everything but the instruction chunk's image rows computed by the
    model's own kernel, those rows left empty: the other chunks' rows in one call, the
    instruction's text and reference rows in another. So no attention row is computed twice
    (the modulated rows replace work, they do not add to it)."""
    q, k, v = call["q"], call["k"], call["v"]
    batch = q.shape[0]
    row_axis = 2 if call["skip_reshape"] else 1
    keep = torch.cat([torch.arange(0, img.start), torch.arange(img.stop, length)]).to(q.device)
    others = [i for i in range(batch) if not inst.start <= i < inst.stop]

    def rows_of(m, batch_rows, query_rows=None):
        if m is None:
            return None
        m = m[batch_rows] if m.shape[0] > 1 else m
        return m if query_rows is None else m.index_select(2, query_rows)

    part = _kernel(func, call, q[inst].index_select(row_axis, keep), k[inst], v[inst], rows_of(mask, inst, keep))
    if call["skip_output_reshape"]:
        out = part.new_empty((batch, part.shape[1], length, part.shape[3]))
        out[inst, :, keep] = part
    else:
        out = part.new_empty((batch, length, part.shape[2]))
        out[inst, keep] = part
    if others:
        index = torch.tensor(others, device=q.device)
        rest = _kernel(func, call, q[index], k[index], v[index], rows_of(mask, index))
        out[index] = rest.to(out.dtype)
    return out


def install_foi_dit(model_clone, state):
    """Hook a clone (never the caller's model) for FoI; returns it."""
    import comfy.patcher_extension

    family = require_family(model_clone)
    if family.refuses("FoI"):
        raise TypeError(f"{family.refuses('FoI')}. FoI runs on Flux Kontext, Flux.2, Qwen-Image-Edit and SD1.x / "
                        "SD2.x / SDXL InstructPix2Pix UNets.")
    diffusion_model = model_clone.model.diffusion_model
    state.patch = family.spatial_patch
    state.mask_blocks = parse_blocks(state.mask_blocks_spec, family, diffusion_model, "mask_blocks")
    tag_blocks(model_clone, state.mask_blocks, state)  # says when a mask block runs
    options = model_clone.model_options["transformer_options"]
    options["optimized_attention_override"] = _FoIOverride(state, options.get("optimized_attention_override"))

    def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                    **kwargs):
        chunks = list(transformer_options.get("cond_or_uncond") or [])
        forward = None
        if c_crossattn is not None and chunks and state.grid is not None and state.instructions is not None:
            per_chunk = x.shape[0] // len(chunks)
            # the instruction's rows give the text layout (Flux.2 pads each prompt by its own length)
            rows = _rows(chunks, state.branches["instruction"], per_chunk) or slice(None)
            layout = family.layout(x[rows], c_crossattn[rows], diffusion_model, kwargs)
            if layout.n_img == state.grid[0] * state.grid[1]:  # not an area-cropped forward
                forward = _Forward(layout, chunks, per_chunk)
        previous, state.forward = state.forward, forward
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            state.forward = previous

    model_clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model)
    return model_clone
