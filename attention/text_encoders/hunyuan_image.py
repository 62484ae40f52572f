"""HunyuanImage 2.1: Qwen2.5-VL inside HunyuanImage's chat template (qwen25vl's mapping with its
cut rule), then byT5 glyph tokens for the prompt's quoted text.

ComfyUI's HunyuanImageTokenizer collects the text inside "...", '...' and "..." quotes (each kind
in turn, in that order), and byT5 encodes 'Text "<quote>". ' for each; the model appends those
tokens after the Qwen2.5-VL ones as text keys (conditioning_byt5small -> txt_byt5, both ComfyUI
0.3.x and 0.19). A quoted word therefore has positions in both parts. Neither part has a length
limit in ComfyUI (no truncation), so no word is lost to length.
"""
import re

from ..tokens import short
from .mapping import Encoder, EncoderPromptTokens, TokenAlignmentError, plain_id
from .qwen25vl import _qwen_template_end, qwen_prompt_tokens

# ComfyUI's patterns, in the order it collects them
QUOTES = (r'\"(.*?)\"', r'‘(.*?)’', r'“(.*?)”')
REFINER_START, REFINER_CUT = 27, 36  # HunyuanImageTEModel: a prompt tokenised from '<' is cut at 36


def _hunyuan_template_end(ids):
    """HunyuanImageTEModel.encode_token_weights' cut: 36 for a prompt whose first token is '<'
    (27: a template the user wrote that is not Qwen's <|im_start|>), else Qwen-Image's rule."""
    if ids and ids[0] == REFINER_START and len(ids) > REFINER_CUT:
        return REFINER_CUT
    return _qwen_template_end(ids)


def glyph_text(text):
    """(byT5 text, [(start, stop) of each quoted segment in it]) as ComfyUI builds it."""
    quotes = [found for pattern in QUOTES for found in re.findall(pattern, text)]
    out, spans = "", []
    for quote in quotes:
        out += 'Text "'
        spans.append((len(out), len(out) + len(quote)))
        out += quote + '". '
    return out, spans


def _byt5_part(clip, text, offset, encoder):
    """(token strings, words, end positions) of the byT5 glyph part, its positions from `offset`.
    byT5 is byte-level (a token per UTF-8 byte, id = byte + 3, then the end token): token i is
    byte i of the glyph text, checked against ComfyUI's own tokens."""
    from ..tokens import Word

    glyphs, spans = glyph_text(text)
    comfy = [plain_id(entry) for chunk in clip.tokenize(text).get("byt5", []) for entry in chunk]
    if not spans:
        return [], [], []
    owner_of_byte = [i for i, char in enumerate(glyphs) for _ in char.encode("utf-8")]
    expected = [byte + 3 for byte in glyphs.encode("utf-8")] + [clip.tokenizer.byt5.end_token]
    if comfy != expected:
        raise TokenAlignmentError(f"{encoder}: the byT5 glyph tokens of the quoted text of \"{short(text)}\" are not "
                                  "its bytes as expected; please report this prompt.")
    # the quoted segments' whitespace words, with their character spans in the glyph text
    words = [(m.group(), lo + m.start(), lo + m.end()) for lo, hi in spans for m in re.finditer(r"\S+", glyphs[lo:hi])]
    hf = clip.tokenizer.byt5.tokenizer
    strings = [hf.convert_ids_to_tokens(token) for token in comfy[:-1]] + ["<end>"]
    positions = {}
    for index, char in enumerate(owner_of_byte):
        for number, (_, a, b) in enumerate(words):
            if a <= char < b:
                positions.setdefault(number, []).append(offset + index)
    found = [Word(name, tuple(positions[i])) for i, (name, _, _) in enumerate(words) if i in positions]
    return strings, found, [offset + len(comfy) - 1]


def hunyuan_prompt_tokens(clip, text):
    """PromptTokens of a HunyuanImage 2.1 prompt: the Qwen2.5-VL part, then the byT5 glyph part."""
    encoder = HUNYUAN_IMAGE.name
    qwen = qwen_prompt_tokens(clip, text, encoder=HUNYUAN_IMAGE, template_end=_hunyuan_template_end)
    n_qwen = len(qwen.token_strings)
    # the single CLIPLoader builds the encoder without byT5 (comfy.sd: te(byt5=False)): no glyph cond,
    # so no byT5 keys in the model, though the tokenizer still makes byT5 tokens
    has_byt5 = getattr(clip.cond_stage_model, "byt5_small", None) is not None
    strings, words, ends = _byt5_part(clip, text, n_qwen, encoder) if has_byt5 else ([], [], [])
    parts = (("Qwen2.5-VL", 0, n_qwen),) + ((("byT5", n_qwen, n_qwen + len(strings)),) if strings else ())
    return EncoderPromptTokens(text=text, token_strings=list(qwen.token_strings) + strings,
                               words=list(qwen.words) + words, end_positions=tuple(qwen.end_positions) + tuple(ends),
                               encoder=encoder, parts=parts)


def _hunyuan_image(clip, text, encoder):
    return hunyuan_prompt_tokens(clip, text)


HUNYUAN_IMAGE = Encoder("HunyuanImage 2.1 (Qwen2.5-VL + byT5 glyph text)", frozenset({"qwen25_7b", "byt5"}),
                        _hunyuan_image)
