"""ATTENTION_MAPS: the object recorded attention travels in between nodes."""
from dataclasses import dataclass
from typing import Optional

import torch

from ..masks.validate import check_finite
from .tokens import PromptWordError

NO_WORDS = ("encode the prompt with the 'Attention Text Encode' node (attention_edit) instead of CLIP "
            "Text Encode, so words can be found")


@dataclass
class AttentionMaps:
    probs: torch.Tensor  # [batch, h, w, tokens] ([batch, frames, h, w, tokens] for video): mean over
    # recorded layers, heads and steps
    tokens: object  # PromptTokens of the prompt whose attention this is, or None
    latent_hw: tuple  # latent (H, W); the image is pixel_scale x that
    level: int  # maps are latent / 2**level
    no_words: Optional[str] = None  # why `tokens` is None (tokens.no_words_reason), for the errors
    family: Optional[str] = None  # the DiT family recorded (families.Family.name); None: a UNet
    normalise: Optional[str] = None  # DiT maps: "text" or "joint" rows (DiTRecorder); None: a UNet
    frames: Optional[int] = None  # video (Wan): latent frames, probs' frame axis; None: images
    pixel_scale: int = 8  # pixels per latent cell: 8; Flux.2, Wan 2.2 5B 16; HunyuanImage 2.1 32
    count: int = 0  # how many (call, chunk) maps the mean holds: a later sampler continues it

    def __post_init__(self):
        # Small maps, checked once: NaN maps would give empty masks and black heatmaps silently.
        check_finite(self.probs, "the recorded attention")

    @property
    def batch(self):
        return self.probs.shape[0]

    @property
    def covered(self):
        """(rows, cols) of map cells that lie on the latent: an odd latent's grid is rounded up
        (a DiT's 2x2 patches, a UNet's stride-2 layers), so the last cells hang over its edge."""
        return tuple(size / 2 ** self.level for size in self.latent_hw)

    def require_tokens(self):
        """The maps' PromptTokens, or a PromptWordError saying why they have none and what to do."""
        if self.tokens is None:
            raise PromptWordError(f"these attention maps carry no prompt words: {self.no_words or NO_WORDS}")
        return self.tokens

    def positions(self, word):
        positions = self.require_tokens().positions(word)
        if max(positions) >= self.probs.shape[-1]:
            raise PromptWordError(f"\"{word}\" lies beyond the recorded tokens ({self.probs.shape[-1]})")
        return positions

    def word_map(self, word):
        """Mean attention over the word's tokens: [batch, h, w] ([batch, frames, h, w] for video)."""
        return self.probs[..., self.positions(word)].mean(dim=-1)
