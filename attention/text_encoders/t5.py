"""T5-XXL (Flux, Kontext, Chroma, SD3's T5 part) and umT5-XXL (Wan): no start token, '</s>'
after the prompt, then '<pad>' tokens that are keys of the attention. No 77-token chunks."""
from .mapping import (EMBEDDING, Encoder, EncoderPromptTokens, TokenAlignmentError, map_pieces, check_ids,
                      offset_tokenizer, plain_id, spots_of, weighted_pieces, words_of)


def t5_tokens(clip, text, key, sd_tokenizer, encoder, offset=0):
    """(token strings, word names, word index -> positions, end positions) of a T5 part: no start
    token, '</s>' after the prompt, then '<pad>' tokens up to ComfyUI's minimum length (Flux 256,
    SD3 77) that are real keys of the attention. No 77-token chunks."""
    names = []
    ids, owners = map_pieces(sd_tokenizer, weighted_pieces(text), names, encoder)
    end_id = sd_tokenizer.end_token
    hf = offset_tokenizer(sd_tokenizer.tokenizer)
    strings, content, content_positions, end_positions = [], [], [], []
    position = offset
    for chunk in clip.tokenize(text)[key]:
        ended = False
        for entry in chunk:
            token = plain_id(entry)
            if not isinstance(token, int):
                raise TokenAlignmentError(
                    f"{encoder}: textual-inversion embeddings ('{EMBEDDING}...') in a T5 prompt are not "
                    "supported by Attention Text Encode; remove them from the prompt.")
            if ended:
                strings.append("<pad>")
            elif token == end_id:
                strings.append("<end>")
                end_positions.append(position)
                ended = True
            else:
                strings.append(hf.convert_ids_to_tokens(token))
                content.append(token)
                content_positions.append(position)
            position += 1
    check_ids(ids, content, owners, names, text, encoder)
    return strings, names, spots_of(owners, content_positions), end_positions


def _t5_prompt(clip, text, encoder, key, sd_tokenizer):
    strings, names, spots, ends = t5_tokens(clip, text, key, sd_tokenizer, encoder)
    return EncoderPromptTokens(text=text, token_strings=strings, words=words_of(names, spots),
                               end_positions=tuple(ends), encoder=encoder, parts=(("T5-XXL", 0, len(strings)),))


def _flux(clip, text, encoder):
    return _t5_prompt(clip, text, encoder, "t5xxl", clip.tokenizer.t5xxl)


def _chroma(clip, text, encoder):
    return _t5_prompt(clip, text, encoder, "t5xxl", clip.tokenizer.clip_t5xxl)


def _wan(clip, text, encoder):
    """umT5 (Wan 2.1 / 2.2): T5's layout, '</s>' then '<pad>' to 512, and ComfyUI zeroes the pads'
    embeddings (the recorder leaves them out of the maps' normalisation)."""
    strings, names, spots, ends = t5_tokens(clip, text, "umt5xxl", clip.tokenizer.clip_umt5xxl, encoder)
    return EncoderPromptTokens(text=text, token_strings=strings, words=words_of(names, spots),
                               end_positions=tuple(ends), encoder=encoder, parts=(("umT5-XXL", 0, len(strings)),))


FLUX = Encoder("Flux / Flux Kontext (T5-XXL context, CLIP-L pooled)", frozenset({"clip_l", "t5xxl"}), _flux)
CHROMA = Encoder("Chroma (T5-XXL)", frozenset({"clip_t5xxl"}), _chroma)
WAN = Encoder("Wan 2.1 / 2.2 (umT5-XXL)", frozenset({"clip_umt5xxl"}), _wan)
