"""Z-Image / Z-Image Turbo (ComfyUI's Lumina2 NextDiT, `supported_models.ZImage`): 30 single-stream
layers on [Qwen3 caption tokens, padded | image tokens, padded], after two refiner stages.

What ComfyUI 0.19.3's `comfy/ldm/lumina/model.py` runs, per forward:
- `context_refiner` layers: attention over the caption tokens alone, `noise_refiner` layers: over
  the image tokens alone. Both go through the attention override too; neither is the prompt's joint
  attention (their sequences are shorter than caption + image), and neither is ever recorded.
- `layers` (the main joint blocks, kept in `self.layers`): one attention call each, on
  cat(caption, image): text first. The caption (the conditioning's tokens, `cap_embedder`) is padded
  with a learned `cap_pad_token` to a multiple of `pad_tokens_multiple` (32), the image tokens
  (patch 2, row-major, `x_embedder`) with `x_pad_token` likewise. No attention mask (cap_mask is
  dropped): the pad tokens are keys like any other, so they count in the joint row's normalisation
  but are not the prompt (the text-only row renormalises over the conditioning's own tokens).
- no `patches_replace["dit"]` hook: the model writes `transformer_options["block_index"]` (and
  `block_type` "double") before each main layer instead, which the attention override receives.
"""
from dataclasses import dataclass

from .base import Family, Layout, token_grid


@dataclass(frozen=True)
class ZImageFamily(Family):
    blocks_by_patch = False  # blocks are told apart by the transformer_options the model writes

    def accepts(self, model_patcher):
        """Z-Image only: Lumina Image 2.0 and NewBie run in the same class (Gemma text encoders,
        no caption padding), which the pack has no word positions for."""
        import comfy.supported_models

        z_image = getattr(comfy.supported_models, "ZImage", None)  # ComfyUI 0.3.75+
        return (z_image is not None and super().accepts(model_patcher)
                and isinstance(model_patcher.model.model_config, z_image))

    def refusal(self, diffusion_model):
        return ("this is Lumina Image 2.0 / NewBie (Lumina2's NextDiT with a Gemma text encoder); in "
                "that model class the pack reads Z-Image / Z-Image Turbo only")

    def running_block(self, transformer_options):
        # written by NextDiT._forward right before each main layer; the refiners run before the first
        # (in a fresh transformer_options per forward), so they see no block_index
        options = transformer_options or {}
        if options.get("block_type") != "double" or "block_index" not in options:
            return None
        return ("double_block", int(options["block_index"]))

    def layout(self, x, context, diffusion_model, kwargs):
        if kwargs.get("ref_latents"):
            raise TypeError(
                "this Z-Image forward has reference images (Z-Image Omni / edit conditioning): attention "
                "recording and InstDiffEdit read a text-to-image Z-Image forward only, for now.")
        height, width = token_grid(x.shape[-2:])
        n_ctx = context.shape[1]
        multiple = getattr(diffusion_model, "pad_tokens_multiple", None)
        n_txt = n_ctx + (-n_ctx) % multiple if multiple else n_ctx
        return Layout(0, n_txt, height * width, n_real=n_ctx)


CLASSES = {
    "comfy.ldm.lumina.model.NextDiT": ZImageFamily(
        "Z-Image", "layers", refusals=(("FoI", "FoI is not built for Z-Image yet (its blocks have no "
                                               "patches_replace['dit'] hook, which FoI's masked attention needs)"),)),
}
