"""Find a UNet's attention layers and install replace patches on them, composing with others.

Layers are chosen by their resolution level (how many times the latent was downsampled before
them), not by block number, so one choice means the same thing on SD1.x, SD2.x and SDXL: level 2
is 1/4 of the latent (16x16 at 512 px on SD1.x, 32x32 at 1024 px on SDXL).
"""
import functools
import inspect
import math
from dataclasses import dataclass

BLOCK_PARTS = ("input", "middle", "output")


@dataclass(frozen=True)
class AttentionLayer:
    """One transformer block's attention, addressed as ComfyUI's patches_replace keys it."""

    part: str  # "input" | "middle" | "output"
    block: int  # index in input_blocks / output_blocks (0 for middle)
    index: int  # transformer_index inside the SpatialTransformer
    level: int  # downsampling level: the layer runs at latent / 2**level

    @property
    def key(self):
        return (self.part, self.block, self.index)

    def grid(self, latent_h, latent_w):
        return level_grid(latent_h, latent_w, self.level)


def level_grid(latent_h, latent_w, level):
    """(h, w) of the feature maps `level` downsamplings below a latent (stride-2 convs round up)."""
    h, w = latent_h, latent_w
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def _is(module, class_name):
    return type(module).__name__ == class_name


def _transformer_layers(block_module, part, block_index, level):
    for module in block_module:
        if _is(module, "SpatialTransformer"):
            for index, transformer in enumerate(module.transformer_blocks):
                yield AttentionLayer(part, block_index, index, level), transformer


def unet_attention_layers(model_patcher, cross_only=True):
    """All transformer blocks of the model's UNet as (AttentionLayer, BasicTransformerBlock).

    cross_only keeps blocks whose attn2 attends to the text context (SD/SDXL: all of them).
    """
    unet = model_patcher.model.diffusion_model
    if not hasattr(unet, "input_blocks"):
        raise TypeError(
            "attention-edit needs a UNet model (SD1.x, SD2.x, SDXL and their InstructPix2Pix or "
            f"inpainting variants); this model's diffusion_model is {type(unet).__name__}."
        )
    found = []
    level = 0
    for block_index, block in enumerate(unet.input_blocks):
        found.extend(_transformer_layers(block, "input", block_index, level))
        if any(_is(m, "Downsample") for m in block):
            level += 1
    found.extend(_transformer_layers(unet.middle_block, "middle", 0, level))
    for block_index, block in enumerate(unet.output_blocks):
        found.extend(_transformer_layers(block, "output", block_index, level))
        if any(_is(m, "Upsample") for m in block):
            level -= 1
    if cross_only:
        found = [(layer, t) for layer, t in found if getattr(t, "attn2", None) is not None]
    return found


def select_layers(model_patcher, level, parts=("input", "output")):
    """The cross-attention layers at one resolution level in the given UNet parts."""
    unknown = set(parts) - set(BLOCK_PARTS)
    if unknown:
        raise ValueError(f"unknown UNet part(s) {sorted(unknown)}; use any of {BLOCK_PARTS}")
    layers = [layer for layer, _ in unet_attention_layers(model_patcher) if layer.part in parts]
    chosen = [layer for layer in layers if layer.level == level]
    if not chosen and not layers:
        raise ValueError(
            f"this model has no cross-attention layers in the UNet parts {list(parts)}, so there is "
            "no text attention to read there: use a text-conditioned model (SD1.x, SD2.x, SDXL) or, "
            "in KSampler (Record Attention), other 'layers'")
    if not chosen:
        available = sorted({layer.level for layer in layers})
        raise ValueError(
            f"this model has no cross-attention at 1/{2 ** level} of the latent in the UNet parts "
            f"{list(parts)}; it has some at {', '.join(f'1/{2 ** lv}' for lv in available)} (in KSampler "
            "(Record Attention), set 'resolution' to one of those)"
        )
    return chosen


def existing_replace(model_patcher, kind, layer):
    """The replace patch another node already set on this layer (exact key first, as ComfyUI)."""
    patches = model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {})
    by_key = patches.get(kind, {})
    return by_key.get(layer.key, by_key.get(layer.key[:2]))


def install_replace(model_patcher, kind, layer, make_patch):
    """Set make_patch(inner) as the layer's `kind` ("attn1"/"attn2") replace patch.

    inner is the patch that was there before (IPAdapter, InstantID, ...) or None; the new patch
    must call it for the layer's output so it keeps working. Call only on a clone.
    """
    inner = existing_replace(model_patcher, kind, layer)
    model_patcher.set_model_patch_replace(make_patch(inner), kind, *layer.key)


@functools.lru_cache(maxsize=8)
def _takes_transformer_options(function):
    return any(p.kind is p.VAR_KEYWORD or p.name == "transformer_options"
               for p in inspect.signature(function).parameters.values())


def comfy_attention(q, k, v, extra_options):
    """What ComfyUI's CrossAttention computes for these projected q, k, v (its selected kernel;
    current ComfyUI also passes transformer_options, for attention overrides)."""
    from comfy.ldm.modules import attention

    function = attention.optimized_attention
    kwargs = {"attn_precision": extra_options.get("attn_precision")}
    if _takes_transformer_options(function):
        kwargs["transformer_options"] = extra_options
    return function(q, k, v, extra_options["n_heads"], **kwargs)


class ChainedPatch:
    """Base of the pack's patches and hooks that wrap what another node set (`inner`, or None):
    they compose with ComfyUI's device moves and model clones."""

    def __init__(self, inner=None):
        self.inner = inner

    def to(self, device):
        # ComfyUI moves patch objects that have .to(); forward it to the wrapped patch.
        if self.inner is not None and hasattr(self.inner, "to"):
            self.inner = self.inner.to(device)
        return self

    def models(self):
        # ComfyUI loads the extra models that the patches in transformer_options list (.models()):
        # the wrapped patch's must still load.
        listed = getattr(self.inner, "models", None)
        return list(listed()) if callable(listed) else []

    def cleanup(self):
        # Newer ComfyUI calls .cleanup() on every patch after sampling (FluxKVCache empties its
        # cache there): the wrapped patch's must still run.
        cleanup = getattr(self.inner, "cleanup", None)
        if callable(cleanup):
            cleanup()

    def __deepcopy__(self, memo):
        # ModelPatcher.clone() deep-copies model_options; a copy would record into a stranger.
        return self


class ReplacePatch(ChainedPatch):
    """Base for the pack's replace patches: composes with an inner patch and with ComfyUI's
    device moves and model clones.

    Subclasses implement __call__(q, k, v, extra_options) and use `self.attend` for the output
    the layer would give without them.
    """

    def attend(self, q, k, v, extra_options):
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        return comfy_attention(q, k, v, extra_options)
