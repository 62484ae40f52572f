"""Where InstDiffEdit reads its attention: one small adapter per model kind (UNet, DiT).

The mask refinement (masks/instdiffedit.py) takes maps over [start token, prompt tokens...] and
an EOS column, enlarges them 4x, blurs and thresholds. What changes between model kinds is only
which attention is recorded, what stands for CLIP's start token, and how the enlarged mask maps
onto the latent (docs/instdiffedit.md, "DiT models", has the measurements behind each choice):

- UNet (the official setting): cross-attention of the 1/4-size layers (down + up), the start token
  is column 0, and 4x the 1/4 grid is the latent (cropped where the grid rounded up).
- DiT (Flux, Flux.2, SD3 / SD3.5, Qwen-Image, Z-Image; Chroma is refused, Family.refuses): the joint
  attention's image -> text rows of the late double / joint blocks (families.default_blocks,
  the Record Attention default) at the token grid, latent / 2. The start map is the mean over the
  tokens that belong to **no word**: T5's </s> and padding (Flux), Qwen's closing template, the
  Mistral / Qwen3 chat templates (Flux.2, Z-Image), and on SD3 CLIP's start, end and padding tokens with T5's end and padding. Like CLIP's start
  token they carry no word and collect the attention the words leave, so 1 - their map marks
  the foreground; averaged over many tokens, one token's noise does not pick the word (SD3's
  single start-token column did: docs/instdiffedit.md measures both). The maps are enlarged 4x as the official code
  does (the blur then spans the same half map cell), which is 2x the latent; a latent pixel is
  edited when at least half of its 2 x 2 mask pixels are. Flux.2's token grid is the latent
  (patch 1): the 4x mask is 4x the latent, reduced by area the same way (4 x 4 pixels).
- HunyuanImage 2.1 and Wan (Family.start_map "text_mass"): HunyuanImage's prompt keeps a single token of no word,
  Wan's umT5 '</s>' and zeroed padding keys, so the start map is 1 - the prompt's share of the
  joint row. HunyuanImage's grid is the latent (patch 1); Wan runs the refinement per latent frame
  (VideoDiTCapture).
"""
import logging

import torch

from ..attention.families import BY_NAME, dit_family
from ..attention.dit_recorder import DiTRecorder
from ..attention.recorder import AttentionRecorder
from ..masks import instdiffedit as idm
from ..masks.foi import resize_mask

log = logging.getLogger("attention_edit")

UNET_LEVEL = 2  # 1/4 of the latent: 16x16 at 512 px on SD1.x, as the official res = 16
UNET_PARTS = ("input", "output")  # official from_where = ("up", "down"); the middle block is 8x8


def word_groups(tokens, input_name="positive"):
    """(token columns per word, EOS column) of an annotated prompt, as refine_mask takes them."""
    tokens.require_single_chunk(f"InstDiffEdit (input '{input_name}')")
    if not tokens.words:
        raise ValueError(
            f"the '{input_name}' prompt \"{tokens.text}\" has no words: InstDiffEdit finds the edit "
            "region from the words of the target prompt. Describe the edited image, e.g. "
            "\"a photo of a raccoon\".")
    groups = [list(word.positions) for word in tokens.words]
    eos = tokens.end_positions[0] if tokens.end_positions else groups[-1][-1] + 1
    return groups, eos


def _crop(mask, latent_hw):
    height, width = latent_hw
    return mask[..., :height, :width]


class UNetCapture:
    """The official capture: column 0 is CLIP's start token, the 4x mask is the latent."""

    level = UNET_LEVEL
    video = False  # masks have a frame axis (VideoDiTCapture)

    def __init__(self, tokens, input_name="positive"):
        self.groups, self.eos = word_groups(tokens, input_name)

    @staticmethod
    def recorder(n_tokens):
        return AttentionRecorder(level=UNET_LEVEL, parts=UNET_PARTS, branch="cond", n_tokens=n_tokens)

    def maps_and_columns(self, attn):
        """The maps refine_mask takes, with their word columns and EOS column."""
        return attn, self.groups, self.eos

    def refine(self, attn, thresholds, position=None, exact=True):
        maps, groups, eos = self.maps_and_columns(attn)
        return idm.refine_mask(maps, groups, eos, *thresholds, position=position, exact=exact)

    def to_latent(self, mask, latent_hw):
        """The refined mask at latent size: the 1/4 grid rounds up (stride-2 convolutions), so crop."""
        return _crop(mask, latent_hw)


DESCRIBED = {"text": "renormalised over the text keys", "joint": "over all keys (the model's own rows; "
             "the start map is 1 - the prompt's share)"}


class DiTCapture(UNetCapture):
    """Joint attention of a DiT: an end-token start map, the mask reduced from 4x the token grid
    (2x the latent at patch 2; Flux.2's patch 1: 4x the latent)."""

    def __init__(self, tokens, family, input_name="positive"):
        super().__init__(tokens, input_name)
        self.level = family.level  # the family's token grid: latent / 2 (patch 2), the latent (patch 1)
        self.text_mass = family.start_map == "text_mass"
        self.normalise = "joint" if self.text_mass else "text"  # the rows the recorder keeps
        self.start_columns = None if self.text_mass else start_columns(tokens)
        if family.padded_prompt:
            warn_if_padding_runs_short(tokens, self.start_columns)

    def recorder(self, n_tokens):
        return DiTRecorder(branch="cond", n_tokens=n_tokens, normalise=self.normalise)

    def maps_and_columns(self, attn):
        """[B, h, w, T] -> [B, h, w, 1 + T]: the start map in front of the prompt's columns."""
        if self.text_mass:  # joint rows: 1 - the text's share is the start map, the words renormalised
            mass = attn.sum(-1, keepdim=True)
            start, attn = 1 - mass, attn / mass.clamp_min(torch.finfo(attn.dtype).tiny)
        else:
            start = attn[..., self.start_columns].mean(-1, keepdim=True)
        shifted = [[c + 1 for c in columns] for columns in self.groups]
        return torch.cat([start, attn], dim=-1), shifted, self.eos + 1

    def to_latent(self, mask, latent_hw):
        """[B, 4h, 4w] (2x the latent at patch 2, padded grid; 4x at patch 1) -> [B, H, W]: a latent
        pixel is edited when at least half of its mask pixels (2 x 2; 4 x 4) are (HunyuanImage and Flux.2 are patch 1)."""
        height, width = latent_hw
        factor = 4 // 2 ** self.level
        return resize_mask(_crop(mask, (factor * height, factor * width)), latent_hw)  # area mean >= 0.5


def start_columns(tokens):
    """The tokens that stand in for CLIP's start token: every token of the context that belongs
    to no word (see the module docstring). One start token's map is noisy; their mean is not."""
    worded = {p for word in tokens.words for p in word.positions}
    free = [i for i in range(tokens.n_tokens) if i not in worded]
    if not free:
        raise ValueError(
            f"the prompt \"{tokens.text[:60]}\" fills the whole token axis: InstDiffEdit needs tokens "
            "that belong to no word (the text encoder's end or padding tokens). Shorten the prompt.")
    return free


# Families whose prompt is padded to a fixed length (Family.padded_prompt: Flux's T5 to 256 tokens, SD3's
# parts to 77),
# so a longer prompt leaves fewer end / padding tokens for the start map. Measured on Flux
# (docs/instdiffedit.md, "Long prompts"): the word pick holds while those tokens outnumber the
# prompt's word tokens (115 words: 132 vs 124) and fails at +4 logits once they do not (125 words:
# 122 vs 134, IoU 0.01). The start map's share of the attention then varies from pixel to pixel
# with how much the words as a whole take, which one word's region no longer outweighs.


def warn_if_padding_runs_short(tokens, start):
    worded = sum(len(word.positions) for word in tokens.words)
    if len(start) < worded:
        log.warning(
            "InstDiffEdit: the target prompt takes %d of the %d text tokens, leaving %d end / padding "
            "tokens for the start map; with fewer of those than word tokens the object word was often "
            "missed (the mask then covers the rest of the image, docs/instdiffedit.md 'Long prompts'). "
            "Describe the edited image in fewer words (on Flux it held up to about 115 words).",
            worded, tokens.n_tokens, len(start))


class VideoDiTCapture(DiTCapture):
    """Wan video: the DiT capture run on every latent frame. Maps [B, F', h, w, T] (frame-major,
    the recorder's video maps) are refined as B x F' images, so every latent frame gets the whole
    InstDiffEdit refinement of its own (start-map similarity, word pick and P, frozen at the first
    step per frame, blur, threshold); masks are [B, F', H, W] at latent size. The start map is the
    text-mass one (Family.start_map: 1 - the prompt keys' share of the model's own rows over all 512
    umT5 keys, i.e. the zeroed padding's share), measured against '</s>', the tokens of no word and
    column 0 in docs/instdiffedit.md "Wan video"."""

    video = True

    def refine(self, attn, thresholds, position=None, exact=True):
        batch, frames = attn.shape[:2]
        result = super().refine(attn.flatten(0, 1), thresholds, position, exact)
        return result._replace(mask=result.mask.reshape(batch, frames, *result.mask.shape[1:]))

    def to_latent(self, mask, latent_hw):
        """[B, F', 4h, 4w] -> [B, F', H, W] (latent_hw: (F', H, W) or (H, W))."""
        flat = super().to_latent(mask.flatten(0, 1), tuple(latent_hw)[-2:])
        return flat.reshape(*mask.shape[:2], *flat.shape[1:])


def _dit_capture(family, tokens, input_name):
    reason = family.refuses("InstDiffEdit")
    if reason:
        raise TypeError(f"InstDiffEdit does not support {family.name} yet: {reason}. Use Flux (dev, schnell), Flux.2, "
                        "SD3 / SD3.5, Qwen-Image, Z-Image, HunyuanImage 2.1, Wan 2.1 / 2.2 (video) or an SD1.x / "
                        "SD2.x / SDXL UNet.")
    return (VideoDiTCapture if family.video else DiTCapture)(tokens, family, input_name)


def capture_for(model, tokens):
    """The adapter for this model (a ModelPatcher): DiTCapture for a supported DiT (VideoDiTCapture
    for Wan), else UNet's."""
    family = dit_family(model)
    return UNetCapture(tokens) if family is None else _dit_capture(family, tokens, "positive")


def capture_for_maps(maps):
    """The adapter that reads these ATTENTION_MAPS (recorded from a DiT or a UNet)."""
    tokens = maps.require_tokens()
    if maps.family is None:
        return UNetCapture(tokens, "attention_maps")
    capture = _dit_capture(BY_NAME[maps.family], tokens, "attention_maps")
    if maps.normalise != capture.normalise:  # the start map and thresholds were measured on these rows
        wanted = {"text": "'text keys only' (the default)", "joint": "'joint (all keys)'"}[capture.normalise]
        raise ValueError(
            f"these {maps.family} attention maps were recorded with normalisation '{maps.normalise}'; "
            f"InstDiffEdit on {maps.family} reads the rows {DESCRIBED[capture.normalise]}. Set 'normalisation' "
            f"to {wanted} in KSampler (Record Attention).")
    return capture
