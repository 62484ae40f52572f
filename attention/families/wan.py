"""Wan 2.1 / 2.2 video DiTs: a separate text cross-attention per block, frame-major video
queries, umT5's 512 keys with zeroed padding."""
from dataclasses import dataclass

from .base import Family, Layout, token_grid


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
# InstDiffEdit's start map: umT5's zeroed padding still becomes keys (505 copies of one key for a
# short prompt) that take the attention the words leave; '</s>' alone picked the wrong word under
# per-token noise, the padding's share (1 - the prompt's) did not (docs/instdiffedit.md, "Wan video")
CLASSES = {
    "comfy.ldm.wan.model.WanModel": WanFamily("Wan", "blocks", start_map="text_mass"),
    "comfy.ldm.wan.model.VaceWanModel": WanFamily("Wan VACE", "blocks", start_map="text_mass"),
}
