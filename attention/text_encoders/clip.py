"""Word <-> token positions for SD1.x / SD2.x / SDXL's CLIP encoders.

Words are the whitespace-separated words of the prompt after ComfyUI's weight syntax
`(word:1.2)` and escapes `\\(` are parsed, each tokenised on its own exactly as ComfyUI does,
then placed on the positions ComfyUI actually produced (start token, content, end, padding, and
77-token chunks for long prompts).
"""
import re

from ..tokens import PromptTokens, Word, short

CLIP_PARTS = {"clip_l", "clip_g", "clip_h"}


def primary_tokenizer(clip):
    """The SDTokenizer whose positions the conditioning follows (CLIP-L where there is one)."""
    tokenizer = clip.tokenizer
    for name in ("clip_l", getattr(tokenizer, "clip", None), "clip_g", "clip_h"):
        if name and hasattr(tokenizer, name):
            return name[len("clip_"):], getattr(tokenizer, name)
    raise TypeError(
        f"attention-edit supports CLIP text encoders (SD1.x, SD2.x, SDXL); got {type(tokenizer).__name__}"
    )


def prompt_words(text):
    """(word, weight) of every word of a prompt, split where ComfyUI's SD tokenizer splits it:
    weights `(word:1.2)` and escapes parsed, then at spaces and new lines."""
    from comfy import sd1_clip

    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0):
        for word in re.split("[ \n]", sd1_clip.unescape_important(segment)):
            if word:
                yield word, weight


def word_ids(sd_tokenizer, text):
    return sd_tokenizer.tokenizer(text)["input_ids"][sd_tokenizer.tokens_start:-1]


def _embedding(sd_tokenizer, word):
    """(vector count, text after the name that ComfyUI tokenises) for a word ComfyUI reads as
    `embedding:name`; count 0 when the embedding does not exist (ComfyUI then skips it with a
    warning, as CLIP Text Encode). None for any other word. Uses the tokenizer's own look-up, so
    each host's rules apply."""
    identifier = getattr(sd_tokenizer, "embedding_identifier", None)
    finder = getattr(sd_tokenizer, "_try_get_embedding", None)
    if (not identifier or finder is None or getattr(sd_tokenizer, "embedding_directory", None) is None
            or not word.startswith(identifier)):
        return None
    embed, leftover = finder(word[len(identifier):].strip("\n"))
    count = 0 if embed is None else (1 if embed.dim() == 1 else embed.shape[0])
    return count, leftover.strip()


def _expected_words(text, sd_tokenizer):
    """(word index, word, weight, embedding vector count, token ids) in ComfyUI's tokenisation
    order; the index counts the words of `prompt_words`, so callers can find a word again."""
    out = []
    for index, (word, weight) in enumerate(prompt_words(text)):
        embedding = _embedding(sd_tokenizer, word)
        count, rest = embedding if embedding is not None else (0, word)
        ids = word_ids(sd_tokenizer, rest) if rest else []
        if count or ids:
            out.append((index, word, weight, count, ids))
    return out


def _token_string(hf_tokenizer, token):
    if not isinstance(token, int):
        return "<embedding>"
    return hf_tokenizer.convert_ids_to_tokens(token)


def clip_prompt_tokens(clip, text):
    """Tokenise `text` with the CLIP's tokenizer and map each word to its token positions."""
    key, sd_tokenizer = primary_tokenizer(clip)
    chunks = clip.tokenize(text)[key]
    start_id = getattr(sd_tokenizer, "start_token", None)
    end_id = sd_tokenizer.end_token
    hf = sd_tokenizer.tokenizer

    expected = _expected_words(text, sd_tokenizer)
    # The content token stream ComfyUI should have produced (None: an embedding vector). An end
    # token is a chunk's end unless the prompt itself holds one there (a typed <|endoftext|>).
    stream = [t for _, _, _, count, ids in expected for t in [None] * count + list(ids)]
    strings, content, end_positions = [], [], []
    for chunk_index, chunk in enumerate(chunks):
        ended = False
        for offset, entry in enumerate(chunk):
            token = entry[0]
            token = int(token) if not hasattr(token, "shape") else token
            position = chunk_index * len(chunk) + offset
            typed_end = len(content) < len(stream) and stream[len(content)] == end_id
            if offset == 0 and start_id is not None and token == start_id:
                strings.append("<start>")
            elif ended:
                strings.append("<pad>")
            elif isinstance(token, int) and token == end_id and not typed_end:
                strings.append("<end>")
                end_positions.append(position)
                ended = True
            else:
                strings.append(_token_string(hf, token))
                content.append((position, token))

    words, cursor = [], 0
    for index, word, weight, count, ids in expected:
        vectors = content[cursor:cursor + count]
        actual = [t for _, t in content[cursor + count:cursor + count + len(ids)]]
        if any(isinstance(t, int) for _, t in vectors) or actual != list(ids):
            raise RuntimeError(
                f"could not align the word {word!r} with the tokens ComfyUI produced for "
                f"\"{short(text)}\"; please report this prompt")
        span = content[cursor:cursor + count + len(ids)]
        words.append(Word(word, tuple(p for p, _ in span), weight, index))
        cursor += len(span)
    return PromptTokens(text=text, token_strings=strings, words=words, end_positions=tuple(end_positions))
