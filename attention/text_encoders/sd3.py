"""SD3 / SD3.5: CLIP-L and CLIP-G joined on channels (77-token chunks), then T5-XXL along the
sequence. The CLIP half is mapped by the CLIP path (clip.py), the T5 half by t5.py."""
from ..tokens import CHUNK, Word, normalise_word, short
from .clip import clip_prompt_tokens
from .mapping import Encoder, EncoderPromptTokens, TokenAlignmentError, words_of
from .t5 import t5_tokens


class _Without:
    """A tokenizer seen without some of its parts (attribute lookups fall through otherwise)."""

    def __init__(self, inner, hidden):
        self._inner, self._hidden = inner, hidden

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._inner, name)


class _ClipPart:
    """SD3's CLIP-L/G half as a CLIP object, so the CLIP path (clip.py) maps it exactly as
    it maps SDXL's CLIP-L/G (the same tokenizers, 77-token chunks with start and end tokens)."""

    def __init__(self, clip):
        self._clip = clip
        self.tokenizer = _Without(clip.tokenizer, {"t5xxl"})

    def tokenize(self, text, *args, **kwargs):
        return self._clip.tokenize(text, *args, **kwargs)


def _sd3(clip, text, encoder):
    """SD3's context: CLIP-L and CLIP-G joined on channels (77 tokens per chunk), then T5 along
    the sequence. A word sits in both parts; its positions are both (what the model attends to)."""
    model = clip.cond_stage_model
    has_clip = getattr(model, "clip_l", None) is not None or getattr(model, "clip_g", None) is not None
    has_t5 = getattr(model, "t5xxl", None) is not None
    strings, ends, parts, clip_words, clip_length = [], [], [], None, 0
    if has_clip:
        clip_tokens = clip_prompt_tokens(_ClipPart(clip), text)
        strings, ends = list(clip_tokens.token_strings), list(clip_tokens.end_positions)
        clip_words = clip_tokens.words
        clip_length = len(strings)
        parts.append(("CLIP-L/G", 0, clip_length))
    words = clip_words
    if has_t5:
        offset = len(strings)
        t5_strings, names, spots, t5_ends = t5_tokens(clip, text, "t5xxl", clip.tokenizer.t5xxl, encoder, offset)
        strings += t5_strings
        ends += t5_ends
        parts.append(("T5-XXL", offset, len(strings)))
        words = (words_of(names, spots) if clip_words is None
                 else _join_parts(names, spots, clip_words, text, encoder))
    return EncoderPromptTokens(text=text, token_strings=strings, words=words or [], end_positions=tuple(ends),
                               encoder=encoder, parts=tuple(parts), clip_chunks=clip_length // CHUNK)


def _join_parts(names, spots, clip_words, text, encoder):
    """The same words in the CLIP part and in the T5 part: each word gets its CLIP positions, then
    its T5 positions. ComfyUI's CLIP tokenizer splits words at spaces and new lines only, T5 at any
    white space: a CLIP word with a tab inside ('a\tb') holds several T5 words and stays one word of
    both parts' tokens. A word one tokenizer drops (a control character CLIP keeps and T5 removes,
    say) keeps the other's; which words a tokenizer drops depends on their text only."""
    words, i, k = [], 0, 0
    while i < len(names):
        if k < len(clip_words):
            clip_word = clip_words[k]
            pieces = [normalise_word(p) for p in clip_word.text.split()] or [normalise_word(clip_word.text)]
            if [normalise_word(name) for name, _ in names[i:i + len(pieces)]] == pieces:
                t5 = [p for j in range(i, i + len(pieces)) for p in spots.get(j, ())]
                label = names[i][0] if len(pieces) == 1 else clip_word.text
                words.append(Word(label, tuple(clip_word.positions) + tuple(t5), names[i][1]))
                i, k = i + len(pieces), k + 1
                continue
        if spots.get(i):
            words.append(Word(names[i][0], tuple(spots[i]), names[i][1]))
        i += 1
    if k != len(clip_words):
        raise TokenAlignmentError(
            f"{encoder}: could not match the word {clip_words[k].text!r} of \"{short(text)}\" between the "
            "CLIP part and the T5 part (the encoders split the prompt differently). Please report this prompt.")
    return words


SD3 = Encoder("SD3 / SD3.5 (CLIP-L + CLIP-G + T5-XXL)", frozenset({"clip_l", "clip_g", "t5xxl"}), _sd3)
