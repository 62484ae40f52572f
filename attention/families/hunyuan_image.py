"""HunyuanImage 2.1 (ComfyUI's HunyuanVideo class with a 2-D patch of 1): 20 double blocks, then
40 single blocks (Flux's block classes), on the 64-channel latent of its 32x VAE.

The text keys are the Qwen2.5-VL tokens (after the token refiner, `txt_in`: two small self-attention
blocks over the text alone, run before any block, so never inside a tagged block and never as long
as text + image: not recorded), then, when the prompt quotes glyph text and the checkpoint has
`byt5_in`, the byT5 tokens (`txt_byt5`, the cond ComfyUI passes beside the context). Their order
with the image changed between ComfyUI 0.3.64 and 0.19.3: 0.3.64's blocks run [image | text]
(DoubleStreamBlock's `flipped_img_txt`, single blocks on cat(img, txt)), 0.19.3's [text | image]. The layout is read
from the block the host built (its `flipped_img_txt`), not from the version.

HunyuanVideo, HunyuanVideo 1.5 and the HunyuanImage 2.1 refiner run in the same class with a 3-D
patch ([1, 2, 2] / [1, 1, 1]) on a frame axis; family_of refuses them by that patch size.
"""
from dataclasses import dataclass

from .base import Family, Layout


@dataclass(frozen=True)
class HunyuanImageFamily(Family):
    patch = (1, 1)  # one token per latent cell: the map grid is the latent itself (level 0)

    def layout(self, x, context, diffusion_model, kwargs):
        if x.ndim != 4:
            raise TypeError(f"HunyuanImage 2.1 takes a 4-D image latent, got {tuple(x.shape)}")
        n_img = int(x.shape[-2]) * int(x.shape[-1])
        n_txt = context.shape[1]
        byt5 = kwargs.get("txt_byt5")
        if byt5 is not None and getattr(diffusion_model, "byt5_in", None) is not None:
            n_txt += byt5.shape[1]  # forward_orig: txt = cat(txt, byt5_in(txt_byt5))
        if image_first(diffusion_model):
            return Layout(0, n_txt, n_img, query_start=0, text_start=n_img)
        return Layout(0, n_txt, n_img)

    def map_grid(self, latent_dims):
        return (int(latent_dims[-2]), int(latent_dims[-1]))

    def pixel_scale(self, diffusion_model):
        return 32  # latent_formats.HunyuanImage21: spacial_downscale_ratio 32

    def refusal(self, diffusion_model):
        return (f"this is HunyuanVideo, HunyuanVideo 1.5 or the HunyuanImage 2.1 refiner (patch size "
                f"{list(diffusion_model.patch_size)} on a video latent); of this model class the pack reads "
                "HunyuanImage 2.1 (patch [1, 1]) only")


def image_first(diffusion_model):
    """True where the host's blocks run [image | text] (ComfyUI 0.3.64; 0.19.3 runs [text | image])."""
    blocks = diffusion_model.double_blocks
    return bool(len(blocks) and getattr(blocks[0], "flipped_img_txt", False))


# its prompt keeps a single token of no word (<|im_end|>; ComfyUI cuts the template's prefix and it
# has no closing turn), whose map alone failed under per-token noise: InstDiffEdit's start map is
# 1 - the text's share of the joint row (docs/instdiffedit.md, "HunyuanImage 2.1")
CLASSES = {
    "comfy.ldm.hunyuan_video.model.HunyuanVideo": HunyuanImageFamily(
        "HunyuanImage", "double_blocks", "single_blocks", start_map="text_mass",
        # FoI's key slicing also assumes text keys first, which 0.3.64's order is not
        refusals=(("FoI", "HunyuanImage 2.1 generates images from text; it is not an instruction-editing model"),)),
}
