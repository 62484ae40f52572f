"""The DiT families the recorder knows: their blocks, the default blocks to record, and the token
layout of their joint attention.

All supported families run joint attention on [text tokens | generated image tokens (patch 2,
row-major, padded: ceil(h/2) * ceil(w/2)) | reference-image tokens (Kontext, Qwen-Image-Edit)],
in double/joint blocks and in Flux's single blocks alike, and ComfyUI calls their blocks through
patches_replace["dit"] keys ("double_block", i) / ("single_block", i).
"""
import math
import re
from dataclasses import dataclass

PATCH = 2  # every supported family patchifies the latent 2x2


@dataclass(frozen=True)
class Family:
    """An image DiT with joint attention: [text | image | reference] queries and keys in one call."""

    name: str
    double: str  # attribute holding the double / joint blocks
    single: str = None  # attribute holding Flux-style single blocks, if any
    patch = PATCH  # the diffusion model's patch_size for this token layout
    video = False  # maps have a frame axis (WanFamily)

    def depth(self, diffusion_model, kind):
        attribute = self.double if kind == "double" else self.single
        return len(getattr(diffusion_model, attribute)) if attribute else 0

    def layout(self, x, context, diffusion_model, kwargs):
        """The token layout of one forward, from the APPLY_MODEL inputs."""
        return layout_of(x, context, diffusion_model)

    def map_grid(self, latent_dims):
        """The recorded map's shape for a latent's dims after batch and channels."""
        return token_grid(latent_dims[-2:])

    def text_calls(self, diffusion_model, keys):
        """{block key: index of the prompt's attention call inside the block}, or None where every
        call long enough to hold text and image tokens is joint attention (the image families)."""
        return None

    def pixel_scale(self, diffusion_model):
        return 8  # every image family's VAE downscales 8x


# the diffusion_model's exact class -> family. Exact, not isinstance: subclasses with another
# token layout exist (Chroma Radiance patchifies pixels 16x16), and AuraFlow's class is also "MMDiT".
FAMILIES = {  # (WanFamily entries are added below its class)
    "comfy.ldm.flux.model.Flux": Family("Flux", "double_blocks", "single_blocks"),
    "comfy.ldm.chroma.model.Chroma": Family("Chroma", "double_blocks", "single_blocks"),
    "comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper": Family("SD3", "joint_blocks"),
    "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel": Family("Qwen-Image", "transformer_blocks"),
}
SUPPORTED = "Flux (dev, schnell, Kontext), Chroma, SD3 / SD3.5, Qwen-Image (incl. Edit) and Wan 2.1 / 2.2 video"

# Default: the double / joint blocks at 79-95 % of their depth. ConceptAttention (Helbling et al.,
# ICML 2025) finds Flux's sharpest text-image maps in its late double blocks and averages 15-18 of
# 19; the same relative depth is used for SD3 (24 blocks: 19-22; SD3.5 Large 38: 30-36) and
# Qwen-Image (60: 47-57), whose blocks are all joint. The last blocks are left out: SD3's last
# block has no text output and late text tokens serve the image's final detail, not its layout.
DEFAULT_SPAN = (0.79, 0.95)


def family_of(model_patcher):
    """The Family of a ModelPatcher's diffusion model, or None for a UNet / unknown model."""
    diffusion_model = model_patcher.model.diffusion_model
    kind = type(diffusion_model)
    family = FAMILIES.get(f"{kind.__module__}.{kind.__qualname__}")
    if family is not None and _as_tuple(getattr(diffusion_model, "patch_size", family.patch)) != _as_tuple(family.patch):
        return None  # another token layout in a known class: Flux.2 (0.3.72+) runs in Flux's class, patch 1
    return family


def _as_tuple(patch):
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch,)


# The oldest ComfyUI tested with DiT models (CI runs 0.3.64 and 0.19.3, README "Supported ComfyUI").
OLDEST_DIT_HOST = "0.3.64"


def require_family(model_patcher):
    family = family_of(model_patcher)
    if family is None:
        diffusion_model = model_patcher.model.diffusion_model
        kind = type(diffusion_model)
        if f"{kind.__module__}.{kind.__qualname__}" in FAMILIES:  # family_of saw another token layout
            raise TypeError(
                "attention recording, InstDiffEdit and FoI do not support this model yet: this is Flux.2 (or "
                f"another model in {kind.__name__}'s class with patch size {diffusion_model.patch_size}; the "
                f"pack reads patch-{PATCH} token grids). They support SD1.x, SD2.x and SDXL UNets and the DiT "
                f"models {SUPPORTED}.")
        raise TypeError(
            f"attention recording, InstDiffEdit and FoI do not support this model ({kind.__name__}); they support SD1.x, SD2.x and "
            f"SDXL UNets and the DiT models {SUPPORTED}."
        )
    require_attention_override()
    return family


def dit_family(model_patcher):
    """None for a UNet (SD1.x, SD2.x, SDXL), the Family of a supported DiT, a clear error for any
    other model (Flux.2 included): what the methods branch on."""
    if hasattr(model_patcher.model.diffusion_model, "input_blocks"):
        return None
    return require_family(model_patcher)


def require_attention_override():
    """Every DiT capture goes through transformer_options["optimized_attention_override"]
    (ComfyUI 0.3.60+, in wrap_attn). An older ComfyUI never calls it: without this check its maps
    would come back empty, without an error."""
    import comfy.ldm.modules.attention as attention

    if not hasattr(attention, "wrap_attn"):
        raise RuntimeError(
            f"attention-edit on DiT models ({SUPPORTED}) needs ComfyUI {OLDEST_DIT_HOST} or newer: this "
            "ComfyUI has no attention override hook (transformer_options['optimized_attention_override'], "
            "added in 0.3.60). Update ComfyUI (git pull, or Manager > Update ComfyUI); SD1.x, SD2.x and "
            "SDXL models work on this version."
        )


def default_blocks(family, diffusion_model):
    depth = family.depth(diffusion_model, "double")
    first = min(depth - 1, round(DEFAULT_SPAN[0] * depth))
    last = max(first, min(depth - 1, int(DEFAULT_SPAN[1] * depth)))
    return [("double_block", i) for i in range(first, last + 1)]


_ITEM = re.compile(r"^(?:(double|joint|single)\s*)?(all|\d+(?:\s*-\s*\d+)?)$")


def parse_blocks(spec, family, diffusion_model, input_name="dit_blocks"):
    """'' -> the family default; else comma-separated items such as '15-18', 'double 3',
    'single 0-9', 'all', 'single all' ('joint' = 'double'; a bare range means double blocks).
    input_name: the node input the spec came from, for errors."""
    if not spec.strip():
        return default_blocks(family, diffusion_model)
    chosen = []
    for item in (part.strip().lower() for part in spec.split(",")):
        match = _ITEM.match(item)
        if not match:
            raise ValueError(f"{input_name}: cannot read {item!r}; write e.g. '15-18', 'double 3', "
                             "'single 0-9' or 'all', comma-separated (empty for the default)")
        kind = "single" if match.group(1) == "single" else "double"
        depth = family.depth(diffusion_model, kind)
        if not depth:
            raise ValueError(f"{input_name}: {family.name} has no single blocks; it has "
                             f"{family.depth(diffusion_model, 'double')} joint blocks (0-"
                             f"{family.depth(diffusion_model, 'double') - 1})")
        if match.group(2) == "all":
            indices = range(depth)
        else:
            bounds = [int(b) for b in match.group(2).replace(" ", "").split("-")]
            indices = range(bounds[0], bounds[-1] + 1)
            if bounds[0] > bounds[-1]:
                raise ValueError(f"{input_name}: {item!r} runs backwards; write the lower block first "
                                 f"('{bounds[-1]}-{bounds[0]}')")
            if bounds[-1] >= depth:
                raise ValueError(f"{input_name}: {item!r} is outside {family.name}'s {kind} blocks 0-{depth - 1}")
        chosen.extend((f"{kind}_block", i) for i in indices if (f"{kind}_block", i) not in chosen)
    return chosen


@dataclass(frozen=True)
class Layout:
    """Where one forward's tokens sit in the joint sequence."""

    prompt_start: int  # first conditioning token (after SD3's learned register tokens, if any)
    n_txt: int  # all text tokens (registers + conditioning)
    n_img: int  # the generated image's tokens; reference-image tokens follow them
    query_start: int = None  # first generated-image query row; None: right after the text (joint)
    n_real: int = None  # Wan: text keys before umT5's zeroed padding; None: every text key counts

    @property
    def image_rows(self):
        start = self.n_txt if self.query_start is None else self.query_start
        return slice(start, start + self.n_img)


def token_grid(latent_hw):
    """The generated image's token grid (patch 2, padded) for a latent (h, w)."""
    return (math.ceil(int(latent_hw[0]) / PATCH), math.ceil(int(latent_hw[1]) / PATCH))


def layout_of(x, context, diffusion_model):
    """The token layout of one forward, from the APPLY_MODEL inputs (noisy latent, context)."""
    if x.ndim == 5 and x.shape[2] > 1:
        raise TypeError(
            f"this latent has {x.shape[2]} frames (Qwen-Image Layered in newer ComfyUI, or a video "
            "latent): attention recording, InstDiffEdit and FoI read one image's token grid and do not "
            "support multi-frame latents yet. Use a one-image latent (EmptySD3LatentImage / VAE Encode).")
    height, width = token_grid(x.shape[-2:])
    registers = getattr(diffusion_model, "register_length", 0)
    return Layout(registers, registers + context.shape[1], height * width)


# ---------------------------------------------------------------- Wan 2.1 / 2.2 (video)

@dataclass(frozen=True)
class WanFamily(Family):
    """Wan video DiTs. Unlike the image families the prompt is not in a joint attention: each
    block runs self-attention on the video tokens, then a separate text cross-attention
    (q: video tokens, frame-major F' x H' x W', k: umT5's 512 keys, zero padding included). 2.1
    I2V blocks make a CLIP-image cross-attention call first (257 keys) and add the outputs."""

    patch = (1, 2, 2)
    video = True

    def layout(self, x, context, diffusion_model, kwargs):
        frames, height, width = self.map_grid(x.shape[2:])
        # Fun-Control's reference image is prepended as H' x W' tokens (ref_conv, 2x2 stride);
        # Phantom's frames are appended after the video: the image rows skip the one, end before the other
        reference = kwargs.get("reference_latent")
        n_ref = 0
        if getattr(diffusion_model, "ref_conv", None) is not None and reference is not None:
            n_ref = (reference.shape[-2] // 2) * (reference.shape[-1] // 2)
        # ComfyUI zeroes umT5's padding rows (zero_out_masked); they still become keys (text_embedding
        # of zero is its bias), but are not the prompt: the rows past the last non-zero one
        used = context.detach().abs().amax(dim=(0, 2)).nonzero()
        n_real = int(used[-1]) + 1 if len(used) else context.shape[1]
        return Layout(0, context.shape[1], frames * height * width, query_start=n_ref, n_real=n_real)

    def map_grid(self, latent_dims):
        frames = int(latent_dims[0]) if len(latent_dims) == 3 else 1
        return (frames, *token_grid(latent_dims[-2:]))

    def text_calls(self, diffusion_model, keys):
        # calls inside a block: self-attention (0), [I2V: CLIP-image cross-attention (1)], text
        blocks = getattr(diffusion_model, self.double)
        return {key: 2 if type(blocks[key[1]].cross_attn).__name__ == "WanI2VCrossAttention" else 1
                for key in keys}

    def pixel_scale(self, diffusion_model):
        return 16 if getattr(diffusion_model, "out_dim", 16) == 48 else 8  # Wan 2.2's 48-channel VAE: 16x


# VACE's extra blocks (vace_blocks) run outside the blocks' patches_replace["dit"] calls, so they
# are never inside a tagged block and never recorded. Wan 2.2 5B, 14B experts, I2V, Fun-Control
# and Phantom run in WanModel.
FAMILIES["comfy.ldm.wan.model.WanModel"] = WanFamily("Wan", "blocks")
FAMILIES["comfy.ldm.wan.model.VaceWanModel"] = WanFamily("Wan VACE", "blocks")
