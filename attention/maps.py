"""ATTENTION_MAPS: the object recorded attention travels in between nodes."""
from dataclasses import dataclass

import torch

from .tokens import PromptWordError


@dataclass
class AttentionMaps:
    probs: torch.Tensor  # [batch, h, w, tokens]: mean over recorded layers, heads and steps
    tokens: object  # PromptTokens of the prompt whose attention this is, or None
    latent_hw: tuple  # latent (H, W); the image is 8x that
    level: int  # maps are latent / 2**level

    @property
    def batch(self):
        return self.probs.shape[0]

    def positions(self, word):
        if self.tokens is None:
            raise PromptWordError(
                "these attention maps carry no prompt words; encode the prompt with the "
                "'Attention Text Encode' node so words can be found"
            )
        positions = self.tokens.positions(word)
        if max(positions) >= self.probs.shape[-1]:
            raise PromptWordError(f"\"{word}\" lies beyond the recorded tokens ({self.probs.shape[-1]})")
        return positions

    def word_map(self, word):
        """Mean attention over the word's tokens: [batch, h, w]."""
        return self.probs[..., self.positions(word)].mean(dim=-1)
