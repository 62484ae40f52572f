"""Record text-token attention of DiT models (Flux, Chroma, SD3, Qwen-Image, Z-Image, HunyuanImage; Wan video) while sampling.

Installed on the sampling clone through three public hooks, each chaining to what is there:
- an APPLY_MODEL wrapper reads each forward's token layout (text length, image grid), its batch
  rows (`cond_or_uncond`) and step, and marks the forward recordable;
- `patches_replace["dit"]` block patches on the chosen blocks say which block is running, and call
  the block patch that was there before (or the original block); a family without that hook
  (Z-Image) says it through the transformer_options the model writes (Family.running_block);
- `transformer_options["optimized_attention_override"]` sees every attention call; inside a
  chosen block of a recordable forward it adds the image queries' text probabilities to a running
  sum on the device (attention/dit_kernel.py), and returns the attention output the model would
  have computed without it, bit for bit.
Which call of a block holds the prompt, and where the image queries sit, are family facts
(families.Family.layout / text_calls): joint attention for the image families, Wan's separate
text cross-attention for video.
"""
import math
from dataclasses import dataclass

import torch

from .families import parse_blocks, require_family
from .dit_kernel import (bind_attention_args, fused_attention, fused_available, heads_first,
                         logsumexp_rows, text_probabilities)
from .layers import ChainedPatch
from .recorder import AttentionRecorder, branch_rows

NORMALISATIONS = ("text", "joint")
WRAPPER_KEY = "attention_edit_record"


@dataclass
class _Forward:
    """What one model forward needs recorded."""

    layout: object  # families.Layout
    rows: object  # slice or index tensor of the batch rows of the recorded branch
    chunks: int  # how many cond chunks of that branch the rows hold
    text_calls: dict = None  # block key -> the prompt's call index in it (Wan); None: joint attention
    block_of: object = None  # transformer_options -> chosen block key or None (Z-Image); None: BlockTag


class _Shared(ChainedPatch):
    """Base of the pack's DiT hooks: each wraps what was there before and records into `recorder`."""

    def __init__(self, recorder, inner):
        super().__init__(inner)
        self.recorder = recorder


class BlockTag(ChainedPatch):
    """patches_replace["dit"] patch: sets `owner.block` to `key` while the block runs (the pack's
    DiT hooks read it), runs the block as before."""

    def __init__(self, owner, key, inner):
        super().__init__(inner)
        self.owner, self.key = owner, key

    def __call__(self, args, extra):
        owner = self.owner
        previous = owner.block, getattr(owner, "call", 0)  # FoI's state has no call count
        owner.block, owner.call = self.key, 0  # attention calls inside this block are counted from 0
        try:
            if self.inner is not None:
                return self.inner(args, extra)
            return extra["original_block"](args)
        finally:
            owner.block, owner.call = previous


def tag_blocks(model_clone, keys, owner):
    """A BlockTag on each ("double_block" / "single_block", i) of a clone, chained to the patch
    there before; returns {key: tag}."""
    existing = model_clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    tags = {key: BlockTag(owner, key, existing.get(key)) for key in keys}
    for key, tag in tags.items():
        model_clone.set_model_patch_replace(tag, "dit", *key)  # copies transformer_options, as ComfyUI does
    return tags


class _AttentionOverride(_Shared):
    """optimized_attention_override: records inside chosen blocks, returns the usual output."""

    def _run(self, func, args, kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    def __call__(self, func, *args, **kwargs):
        recorder = self.recorder
        forward = recorder.forward
        if forward is not None and forward.block_of is not None:  # the model says which block runs (Z-Image)
            block = forward.block_of(kwargs.get("transformer_options"))
            if block is None:
                return self._run(func, args, kwargs)
        elif forward is None or recorder.block is None:
            return self._run(func, args, kwargs)
        index, recorder.call = recorder.call, recorder.call + 1
        call = bind_attention_args(args, kwargs)
        q, k, v, mask = heads_first(call)
        layout = forward.layout
        if forward.text_calls is not None:  # Wan: the block's text cross-attention call only
            if index != forward.text_calls.get(recorder.block) or k.shape[2] != layout.n_txt:
                return self._run(func, args, kwargs)  # self-attention, I2V's CLIP-image call
        elif q.shape[2] < layout.n_txt + layout.n_img:
            return self._run(func, args, kwargs)  # an image-only attention (SD3.5 x_block_self_attn)
        rows = forward.rows
        lse = None
        if recorder.normalise == "joint" and self.inner is None and fused_available(func, call):
            out, lse = fused_attention(call)  # the kernel SDPA would run, with its lse
            lse = lse[rows][:, :, layout.image_rows]
        else:
            out = self._run(func, args, kwargs)
        # the branch's rows: a view when they are contiguous, else one copy (index tensor), made once
        q_rows, k_rows = q[rows], k[rows]
        mask_rows = None if mask is None else (mask[rows] if mask.shape[0] > 1 else mask)
        if recorder.normalise == "joint" and lse is None:
            lse = logsumexp_rows(q_rows, k_rows, v[rows], mask_rows, layout.image_rows)
        recorder.observe_joint(forward, q_rows, k_rows, mask_rows, lse)
        return out


class DiTRecorder(AttentionRecorder):
    """Running mean of the generated image's attention on the prompt's tokens in chosen DiT blocks.

    blocks: families.parse_blocks spec ('' = the family default).
    normalise: "text" (default) renormalises over the text keys only (each pixel's row sums to 1,
    like UNet maps; sharper word masks, docs/recording.md); "joint" records the model's own row
    (softmax over all keys, text mass < 1).
    """

    def __init__(self, branch="cond", steps=None, n_tokens=None, blocks="", normalise="text"):
        super().__init__(level=1, parts=(), branch=branch, steps=steps, n_tokens=n_tokens)
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        self.blocks_spec = blocks
        self.normalise = normalise
        self.blocks = []
        self.forward = None  # _Forward of the model call running now, None outside / not recorded
        self.block = None  # patches_replace key of the chosen block running now
        self.call = 0  # attention calls so far inside that block

    @property
    def grid(self):
        return self._family.map_grid(self.latent_dims)

    def install(self, model_clone, latent_hw, schedule=None):
        """Hook `model_clone` (a ModelPatcher.clone(), never the caller's model) and return it.
        latent_hw: the latent's dims after batch and channels ((H, W), or (F, H, W) for video)."""
        import comfy.patcher_extension

        family = require_family(model_clone)
        self._family = family
        self.family = family.name
        self.diffusion_model = model_clone.model.diffusion_model
        self.blocks = parse_blocks(self.blocks_spec, family, self.diffusion_model)
        self._text_calls = family.text_calls(self.diffusion_model, self.blocks)
        self.latent_dims = tuple(int(d) for d in latent_hw)
        self.latent_hw = self.latent_dims[-2:]
        self.level = family.level  # the map grid is the latent / 2**level (Flux.2's patch 1: the latent)
        self.pixel_scale = family.pixel_scale(self.diffusion_model)
        if family.video:
            self.frames = self.grid[0]
        self.schedule = None if schedule is None else schedule.detach().float().cpu()
        # blocks without a patches_replace["dit"] hook (Z-Image) are told apart in the override instead
        self._tags = tag_blocks(model_clone, self.blocks, self) if family.blocks_by_patch else {}
        options = model_clone.model_options.setdefault("transformer_options", {})
        options["optimized_attention_override"] = _AttentionOverride(self, options.get("optimized_attention_override"))
        self._dit_keys = set(options.get("patches_replace", {}).get("dit", {}))
        model_clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                         self._apply_model)
        self.watch_conds(model_clone)
        return model_clone

    def _ordinary_pass(self, transformer_options):
        """False for a guidance's extra pass that swaps block patches (SkipLayerGuidanceDiT)."""
        dit = transformer_options.get("patches_replace", {}).get("dit", {})
        return set(dit) == self._dit_keys and all(dit.get(key) is tag for key, tag in self._tags.items())

    def _plan(self, x, context, transformer_options, kwargs):
        if context is None or not self._ordinary_pass(transformer_options):
            return None
        if self.steps is not None:
            step = self._current_step(transformer_options)
            if step is None or step not in self.steps:
                return None
            self.steps_seen.add(step)
        rows, chunks = branch_rows(transformer_options.get("cond_or_uncond") or [0], self.branch,
                                    x.shape[0], x.device, self.chunks_kept(transformer_options))
        if rows is None:
            return None
        layout = self._family.layout(x, context[rows], self.diffusion_model, kwargs)
        if layout.n_img != math.prod(self.grid):
            return None  # an area-conditioned chunk (ComfyUI crops x to the area), not the whole image
        n_prompt = layout.n_txt - layout.prompt_start  # the context's tokens (+ HunyuanImage's byT5 tokens)
        if self.n_tokens is None:
            self.n_tokens = n_prompt
        if n_prompt < self.n_tokens:
            return None  # another, shorter conditioning (its words are not the recorded prompt's)
        block_of = None if self._family.blocks_by_patch else self._chosen_block
        return _Forward(layout, rows, chunks, self._text_calls, block_of)

    def _chosen_block(self, transformer_options):
        block = self._family.running_block(transformer_options)
        return block if block in self.blocks else None

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                     transformer_options={}, **kwargs):
        previous, self.forward = self.forward, self._plan(x, c_crossattn, transformer_options, kwargs)
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.forward = previous  # a nested model call (some wrappers make one) restores ours

    def observe_joint(self, forward, q, k, mask, lse):
        """Add one attention call's image->prompt probabilities ([B, H, L, D] q, k of the
        recorded rows) to the running sum."""
        layout = forward.layout
        rows = layout.image_rows
        # Wan: umT5's zeroed padding keys (past n_real) are not the prompt. Only the real keys'
        # probabilities are computed ("text" rows renormalise over them, "joint" rows keep the
        # model's row through lse); the padding columns are zeros. 20 real tokens of 512: ~25x less work.
        # Flux.2: the zero rows model_base puts in front of a short prompt are keys too, but not the
        # prompt: its keys start at key_start (0 elsewhere; SD3's registers count as they always did)
        n_keys = layout.n_txt if layout.n_real is None else min(layout.n_real, layout.n_txt)
        first = layout.text_start + layout.key_start  # HunyuanImage on 0.3.64: the text keys follow the image
        keys = slice(first, layout.text_start + n_keys)
        mask_block = None if mask is None else mask[..., rows, keys]
        probs = text_probabilities(q[:, :, rows], k[:, :, keys], lse, mask_block)
        if n_keys < layout.n_txt:
            probs = torch.nn.functional.pad(probs, (0, layout.n_txt - n_keys))
        start = layout.prompt_start - layout.key_start
        probs = probs[..., start:start + self.n_tokens]
        probs = probs.reshape(forward.chunks, -1, *probs.shape[1:]).sum(0)
        if self.total is None:
            self.total = torch.zeros_like(probs)
        self.total += probs
        self.count += forward.chunks
