"""Flux.2 ([dev], [klein]): Flux's own model class (comfy.ldm.flux.model.Flux, image_model
"flux2", ComfyUI >= 0.3.72) with global modulation, 4-axis RoPE and **patch size 1** on a
128-channel latent (16x the pixels: one token per latent cell), on
[text tokens | generated image tokens | reference-image tokens], double then single blocks.

Told apart from Flux.1 by structure (Family.accepts: patch size 1), not by class. The text is
**left-padded**: model_base.Flux2 pads a conditioning shorter than 512 tokens with zero rows in
front (Mistral's [dev] prompt is not padded by its tokenizer), so the prompt's tokens are the last
ones of the 512; a Klein (Qwen3) prompt comes padded to 512 by its tokenizer and starts at 0.
The leading all-zero rows are counted per forward, on the recorded branch's rows only (the
positive and negative prompts are padded differently but batched together). They still become
keys (txt_in of zero is zero, then modulated and RoPE-rotated), so the model's own ("joint") rows
give them attention; like Wan's zeroed umT5 padding they are not the prompt, and "text" rows
renormalise over the prompt's keys only (Layout.key_start).
"""
import dataclasses
from dataclasses import dataclass

from .base import Family, layout_of

TEXT_LENGTH = 512  # model_base.Flux2's target_text_len


def leading_zero_rows(context):
    """How many rows at the start of `context` ([B, L, C]) are zero in every batch row: the
    padding model_base.Flux2 puts in front of a prompt shorter than 512 tokens."""
    used = context.detach().abs().amax(dim=(0, 2)).nonzero()
    return int(used[0]) if len(used) else 0


@dataclass(frozen=True)
class Flux2Family(Family):
    """Flux.2: the base joint layout at patch 1, the prompt after the left padding."""

    patch = 1

    def layout(self, x, context, diffusion_model, kwargs):
        start = leading_zero_rows(context)  # the prompt's keys follow the zero left-padding
        return dataclasses.replace(layout_of(x, context, diffusion_model, self.patch), prompt_start=start,
                                   key_start=start)

    def pixel_scale(self, diffusion_model):
        return 16  # Flux.2's VAE: 8x, then 2x2 packed into the 128 channels

    def text_length(self, n_tokens):
        return max(n_tokens, TEXT_LENGTH)  # model_base.Flux2 left-pads shorter prompts


CLASSES = {
    "comfy.ldm.flux.model.Flux": Flux2Family("Flux.2", "double_blocks", "single_blocks"),
}
