"""What every DiT family adapter is: its blocks, its token layout, its map grid.

The image families run joint attention on [text tokens | generated image tokens (patch 2,
row-major, padded: ceil(h/2) * ceil(w/2)) | reference-image tokens (Kontext, Qwen-Image-Edit)],
in double/joint blocks and in Flux's single blocks alike, and ComfyUI calls their blocks through
patches_replace["dit"] keys ("double_block", i) / ("single_block", i). A family whose layout
differs (Wan's separate text cross-attention) overrides the methods below in its own module.
"""
import math
from dataclasses import dataclass

PATCH = 2  # the image families patchify the latent 2x2


@dataclass(frozen=True)
class Family:
    """An image DiT with joint attention: [text | image | reference] queries and keys in one call."""

    name: str
    double: str  # attribute holding the double / joint blocks
    single: str = None  # attribute holding Flux-style single blocks, if any
    patch = PATCH  # the diffusion model's patch_size for this token layout
    video = False  # maps have a frame axis (WanFamily)
    level = 1  # the map grid is the latent / 2 ** level (patch 2); HunyuanImage's patch 1: 0

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
        return 8  # the VAE's downscale: 8x for these families

    def other_layout(self, diffusion_model):
        """Why a model of this family's class with another patch size is refused (family_of)."""
        return (f"this is Flux.2 (or another model in {type(diffusion_model).__name__}'s class with patch "
                f"size {diffusion_model.patch_size}; the pack reads patch-{PATCH} token grids)")


@dataclass(frozen=True)
class Layout:
    """Where one forward's tokens sit in the joint sequence."""

    prompt_start: int  # first conditioning token (after SD3's learned register tokens, if any)
    n_txt: int  # all text tokens (registers + conditioning)
    n_img: int  # the generated image's tokens; reference-image tokens follow them
    query_start: int = None  # first generated-image query row; None: right after the text (joint)
    n_real: int = None  # Wan: text keys before umT5's zeroed padding; None: every text key counts
    text_start: int = 0  # first text key of the sequence: 0, or n_img where the image comes first
    # (HunyuanImage 2.1 on ComfyUI 0.3.64)

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
