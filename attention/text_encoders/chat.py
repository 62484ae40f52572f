"""The chat-template encoders' shared mapping (Qwen2.5-VL for Qwen-Image, Qwen3 for Z-Image and
Flux.2 [klein]): ComfyUI's tokenizer formats the prompt into its `llama_template` and tokenises the
whole text in one call. The template's text around the prompt is tokenised with it (the user's
words are the whitespace words of the prompt's stretch), checked against ComfyUI's own tokens, and
what the encoder then keeps of the sequence (a cut prefix, trailing padding) is applied by the
encoder's reader.
"""
from .mapping import TokenAlignmentError, check_ids, comfy_pieces, map_pieces, plain_id, spots_of, words_of
from ..tokens import short


class TemplateError(ValueError):
    """The chat template leaves (some of) the prompt's words out of the conditioning."""


def writes_own_template(text):
    """A prompt that starts with a chat turn: Qwen-Image's tokenizer then adds no template."""
    return text.startswith(("<|im_start|>", "<|start_header_id|>"))


def map_chat(clip, part, text, template, encoder, preamble="", images=(), given=None, image_pad=None, pad=None):
    """Tokenise `text` inside `template` ('{}' where the prompt goes) as ComfyUI does, with each
    token's word. `part`: the tokenizer part (qwen25_7b, qwen3_4b, ...); `preamble`: template text
    put before the prompt (Qwen-Image-Edit Plus's 'Picture i: ...'); `images` / `given`: what the
    calling node passes to clip.tokenize; `image_pad`: the id standing for an image ComfyUI put in
    place of its placeholder; `pad`: the padding id ComfyUI may append (Klein's min_length 512).
    Returns (comfy_tokens, owners, names): ComfyUI's tokens (ints, or dicts for images), per token
    the index of its word in `names` ([text, weight]) or None (template, padding)."""
    from comfy import sd1_clip

    if "{}" not in template:
        raise TemplateError(f"{encoder}: the chat template {template!r} has no '{{}}' for the prompt, so none of "
                            f"the words of \"{short(text)}\" would be in the conditioning.")
    sd_tokenizer = getattr(clip.tokenizer, part)
    unescape = lambda s: sd1_clip.unescape_important(sd1_clip.escape_important(s))  # noqa: E731
    prefix, suffix = (unescape(s) for s in template.split("{}", 1))
    prefix += unescape(preamble)
    body = unescape(text)
    names = []
    ids, owners = map_pieces(sd_tokenizer, comfy_pieces(prefix + body + suffix, 1.0, len(prefix), len(prefix) + len(body)),
                             names, encoder)
    kwargs = dict(given or {})
    if images:
        kwargs["images"] = list(images)
    tokenized = clip.tokenize(preamble + text, **kwargs)[part]
    comfy_tokens = [plain_id(entry) for chunk in tokenized for entry in chunk]
    comfy_ids = [image_pad if isinstance(t, dict) else t for t in comfy_tokens]
    if pad is not None and len(comfy_ids) > len(ids) and all(t == pad for t in comfy_ids[len(ids):]):
        comfy_ids = comfy_ids[:len(ids)]  # the tokenizer's padding (min_length), after the template
        owners = owners + [None] * (len(comfy_tokens) - len(ids))
    check_ids(ids, comfy_ids, owners[:len(comfy_ids)], names, text, encoder)
    return comfy_tokens, owners, names


def words_after_cut(names, owners, positions, cut, text, encoder, strict=True):
    """The prompt's words on the conditioning axis when the encoder drops the first `cut` tokens
    (`positions`: each kept token's position on the axis). strict: a word that the cut drops is a
    TemplateError naming it (the maps and masks would silently lack it); not strict: such words are
    left out (Qwen-Image: a prompt that writes its own template keeps only its last user turn)."""
    hidden = sorted({owner for owner in owners[:cut] if owner is not None})
    if strict and hidden:
        raise TemplateError(
            f"{encoder}: the chat template drops the start of the encoded sequence, and with it the words "
            f"{[names[i][0] for i in hidden][:8]} of \"{short(text)}\": they would have no attention map. "
            "Put the words in the prompt's own turn.")
    if len(owners[cut:]) != len(positions):
        raise TokenAlignmentError(f"{encoder}: {len(positions)} positions for {len(owners[cut:])} tokens")
    return words_of(names, spots_of(owners[cut:], positions))
