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
    # InstDiffEdit's start map, measured per family (docs/instdiffedit.md): "no_word", the mean of
    # the prompt's tokens of no word; "text_mass", 1 - the prompt's share of the model's joint row
    start_map: str = "no_word"
    padded_prompt: bool = False  # prompts padded to a fixed length (Flux's T5, SD3): long ones leave few pads
    refusals: tuple = ()  # ((method, why it does not run here), ...): see refuses()
    patch = PATCH  # the diffusion model's patch_size for this token layout
    video = False  # maps have a frame axis (WanFamily)
    # how the running block is told apart: a patches_replace["dit"] BlockTag on each chosen block
    # (True), or running_block() on the attention call's transformer_options (Z-Image)
    blocks_by_patch = True

    def refusal(self, diffusion_model):
        """Why a model in the family's class that accepts() turns down is refused (None: the
        patch-size message)."""
        return None

    def running_block(self, transformer_options):
        """The ("double_block", i) key of the block running now, from an attention call's
        transformer_options; only where not blocks_by_patch."""
        return None

    def refuses(self, method):
        """Why `method` ("FoI", "InstDiffEdit") does not run on this family, or None."""
        return dict(self.refusals).get(method)

    @property
    def spatial_patch(self):
        """Latent pixels per token along height and width (2; Flux.2: 1)."""
        return self.patch[-1] if isinstance(self.patch, (tuple, list)) else self.patch

    @property
    def level(self):
        """The map grid is the latent / 2**level (patch 2: 1; Flux.2's patch 1: 0)."""
        return int(self.spatial_patch).bit_length() - 1

    def accepts(self, model_patcher):
        """Whether this adapter reads the model (of one of its CLASSES): several families can share
        a class (Flux.1 and Flux.2 run in Flux's), told apart by structure."""
        diffusion_model = model_patcher.model.diffusion_model
        return _as_tuple(getattr(diffusion_model, "patch_size", self.patch)) == _as_tuple(self.patch)

    def depth(self, diffusion_model, kind):
        attribute = self.double if kind == "double" else self.single
        return len(getattr(diffusion_model, attribute)) if attribute else 0

    def layout(self, x, context, diffusion_model, kwargs):
        """The token layout of one forward, from the APPLY_MODEL inputs."""
        return layout_of(x, context, diffusion_model, self.spatial_patch)

    def map_grid(self, latent_dims):
        """The recorded map's shape for a latent's dims after batch and channels."""
        return token_grid(latent_dims[-2:], self.spatial_patch)

    def text_calls(self, diffusion_model, keys):
        """{block key: index of the prompt's attention call inside the block}, or None where every
        call long enough to hold text and image tokens is joint attention (the image families)."""
        return None

    def pixel_scale(self, diffusion_model):
        return 8  # the VAE's downscale: 8x for these families

    def text_length(self, n_tokens):
        """The text length the model runs a conditioning of n_tokens at (Flux.2 pads to 512)."""
        return n_tokens


@dataclass(frozen=True)
class Layout:
    """Where one forward's tokens sit in the joint sequence."""

    prompt_start: int  # first conditioning token (after SD3's learned register tokens, if any)
    n_txt: int  # all text tokens (registers + conditioning)
    n_img: int  # the generated image's tokens; reference-image tokens follow them
    query_start: int = None  # first generated-image query row; None: right after the text (joint)
    n_real: int = None  # Wan: text keys before umT5's zeroed padding; None: every text key counts
    key_start: int = 0  # Flux.2: first text key that counts (its zero left-padding precedes it)
    # first text key of the sequence: 0, or n_img where the image comes first (HunyuanImage 2.1 on 0.3.64)
    text_start: int = 0

    @property
    def image_rows(self):
        start = self.n_txt if self.query_start is None else self.query_start
        return slice(start, start + self.n_img)


def _as_tuple(patch):
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch,)


def token_grid(latent_hw, patch=PATCH):
    """The generated image's token grid (patch x patch tokens, padded) for a latent (h, w)."""
    return (math.ceil(int(latent_hw[0]) / patch), math.ceil(int(latent_hw[1]) / patch))


def layout_of(x, context, diffusion_model, patch=PATCH):
    """The token layout of one forward, from the APPLY_MODEL inputs (noisy latent, context)."""
    if x.ndim == 5 and x.shape[2] > 1:
        raise TypeError(
            f"this latent has {x.shape[2]} frames (Qwen-Image Layered in newer ComfyUI, or a video "
            "latent): attention recording, InstDiffEdit and FoI read one image's token grid and do not "
            "support multi-frame latents yet. Use a one-image latent (EmptySD3LatentImage / VAE Encode).")
    height, width = token_grid(x.shape[-2:], patch)
    registers = getattr(diffusion_model, "register_length", 0)
    return Layout(registers, registers + context.shape[1], height * width)
