"""Mistral tekken (Flux.2 [dev]'s Mistral-Small-3.1, ComfyUI's Flux2Tokenizer, part
`mistral3_24b`): the prompt inside ComfyUI's system-prompt template, one byte-level BPE sequence
with the start token <s> in front, no weights (ComfyUI tokenizes with disable_weights), no end
or padding tokens. model_base.Flux2 later pads the conditioning with zero rows on the left, up
to 512 (the Flux.2 family adapter reads the prompt after them), so positions here index the
conditioning as CLIP Text Encode returns it."""
from .mapping import (Encoder, EncoderPromptTokens, TokenAlignmentError, UnsupportedEncoderError, check_ids,
                      comfy_pieces, map_pieces, plain_id, spots_of, words_of)

PART = "mistral3_24b"
TEMPLATE_TOKENS = ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]", "<s>", "</s>")


def tekken_prompt_tokens(clip, text, template=None):
    """PromptTokens of a Flux.2 [dev] prompt. `template`: the llama_template a node passes to
    clip.tokenize (None: Flux2Tokenizer's own)."""
    from comfy import sd1_clip

    encoder = TEKKEN.name
    if not TEKKEN.matches(clip.tokenizer):
        raise UnsupportedEncoderError(
            f"this reader needs Flux.2 [dev]'s text encoder ({encoder}); got {type(clip.tokenizer).__name__}.")
    hidden = [marker for marker in TEMPLATE_TOKENS if marker in text]
    if hidden:
        raise ValueError(
            f"the prompt contains {', '.join(repr(m) for m in hidden)}: Flux.2 [dev]'s tokenizer reads "
            "these as the chat template's control tokens, so the words around them would be template to the "
            "text encoder, not a prompt. Remove them (ComfyUI adds the template itself).")
    tokenizer = clip.tokenizer
    sd_tokenizer = getattr(tokenizer, PART)
    given = {"llama_template": template} if template else {}
    template = template or tokenizer.llama_template
    if "{}" not in template:
        raise ValueError(f"{encoder}: the template {template[:60]!r}... has no '{{}}' for the prompt, so it hides "
                         "every word of it; word positions cannot be found.")
    unescape = lambda s: sd1_clip.unescape_important(sd1_clip.escape_important(s))  # noqa: E731
    prefix, suffix = (unescape(s) for s in template.split("{}", 1))
    body = unescape(text)
    names = []
    ids, owners = map_pieces(sd_tokenizer, comfy_pieces(prefix + body + suffix, 1.0, len(prefix),
                                                        len(prefix) + len(body)), names, encoder)
    tokenized = clip.tokenize(text, **given)[PART]
    if len(tokenized) != 1:
        raise TokenAlignmentError(f"{encoder}: expected one token sequence, ComfyUI gave {len(tokenized)}")
    comfy_ids = [plain_id(entry) for entry in tokenized[0]]
    if any(not isinstance(token, int) for token in comfy_ids):
        raise TokenAlignmentError(f"{encoder}: textual-inversion embeddings in a Flux.2 prompt are not supported "
                                  "by Attention Text Encode; remove them from the prompt.")
    start = 1 if comfy_ids[:1] == [sd_tokenizer.start_token] else 0  # ComfyUI puts <s> in front
    check_ids(ids, comfy_ids[start:], owners, names, text, encoder)
    hf = sd_tokenizer.tokenizer
    strings = [hf.convert_ids_to_tokens(token) for token in comfy_ids]
    positions = list(range(start, len(comfy_ids)))
    words = words_of(names, spots_of(owners, positions))
    if names and not words:
        raise ValueError(f"{encoder}: no word of \"{text[:60]}\" kept a token of its own in the templated prompt.")
    last_word = max((p for word in words for p in word.positions), default=start - 1)
    closing = hf.convert_tokens_to_ids("[/INST]")
    ends = tuple(i for i in range(last_word + 1, len(comfy_ids)) if comfy_ids[i] == closing)[:1]
    return EncoderPromptTokens(text=text, token_strings=strings, words=words, end_positions=ends,
                               encoder=encoder, parts=(("Mistral", 0, len(strings)),))


def _tekken(clip, text, encoder):
    return tekken_prompt_tokens(clip, text)


TEKKEN = Encoder("Flux.2 [dev] (Mistral-Small-3.1, tekken)", frozenset({PART}), _tekken)
