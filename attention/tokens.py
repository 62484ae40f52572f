"""Word <-> token positions for a prompt encoded by a ComfyUI CLIP object.

Words are the whitespace-separated words of the prompt after ComfyUI's weight syntax
`(word:1.2)` and escapes `\\(` are parsed, each tokenised on its own exactly as ComfyUI does,
then placed on the positions ComfyUI actually produced (start token, content, end, padding, and
77-token chunks for long prompts). Positions index the conditioning's token axis, so they index
the last axis of the cross-attention probabilities too.
"""
import re
from dataclasses import dataclass, field

CHUNK = 77
_EDGE_PUNCTUATION = re.compile(r"^[^\w]+|[^\w]+$")


class PromptWordError(ValueError):
    """A word the user asked for is not in the prompt (the message lists the prompt's words)."""


class PromptLengthError(ValueError):
    """The prompt needs more than one 77-token chunk where a method needs one."""


def split_words(text):
    """'cat, red hat' -> ['cat', 'red hat']: commas separate the words or phrases a user types."""
    return [w.strip() for w in str(text).split(",") if w.strip()]


def normalise_word(text):
    """Lower-case, without punctuation at the ends: 'Cat,' and 'cat' name the same word."""
    return _EDGE_PUNCTUATION.sub("", text.strip().lower())


@dataclass(frozen=True)
class Word:
    text: str  # as written, weights and escapes removed ("shiba," keeps its comma)
    positions: tuple  # token positions on the conditioning's token axis
    weight: float = 1.0
    index: int = -1  # which word of `prompt_words(text)` it is (words without tokens have none)


@dataclass
class PromptTokens:
    """What later nodes need to find words in an encoded prompt, without re-tokenising."""

    text: str
    token_strings: list  # one per position: "<start>", "shi", "ba</w>", "<end>", "<pad>", "<embedding>"
    # words: an `embedding:name` word holds its vectors' positions (plus a trailing ',' ComfyUI
    # tokenises); a missing embedding has no tokens, as CLIP Text Encode ignores it
    words: list = field(default_factory=list)
    end_positions: tuple = ()  # first end token of each chunk

    @property
    def n_tokens(self):
        return len(self.token_strings)

    @property
    def n_chunks(self):
        return self.n_tokens // CHUNK

    @property
    def content_token_count(self):
        return sum(len(word.positions) for word in self.words)

    def require_single_chunk(self, purpose):
        if self.n_chunks > 1:
            raise PromptLengthError(
                f"{purpose} needs the prompt in one 77-token chunk (75 words/pieces + start and end "
                f"tokens), but \"{_short(self.text)}\" has {self.content_token_count} content "
                "tokens. Shorten the prompt."
            )

    def word_list(self):
        return [word.text for word in self.words]

    def shown_words(self):
        """The words a user can look up: without punctuation-only words such as a lone ','."""
        return [text for text in self.word_list() if normalise_word(text)]

    def occurrences(self, query):
        """Token positions of every occurrence of `query` (one or more consecutive words)."""
        wanted = [normalise_word(w) for w in query.split()]
        wanted = [w for w in wanted if w]
        if not wanted:
            raise PromptWordError(f"the word to look for is empty (got {query!r}; punctuation around "
                                  "words is ignored): type a word of the prompt")
        names = [normalise_word(word.text) for word in self.words]
        found = []
        for start in range(len(names) - len(wanted) + 1):
            if names[start:start + len(wanted)] == wanted:
                span = self.words[start:start + len(wanted)]
                found.append([p for word in span for p in word.positions])
        return found

    def positions(self, query):
        """All token positions of `query` in the prompt; a clear error when it is not there."""
        found = self.occurrences(query)
        if not found and not self.shown_words():
            raise PromptWordError(
                f"\"{query}\" is not a word of the prompt: the prompt \"{_short(self.text)}\" has no "
                "words. Type the prompt in the text encode node.")
        if not found:
            raise PromptWordError(
                f"\"{query}\" is not a word of the prompt \"{_short(self.text)}\". Words of the prompt: "
                f"{', '.join(repr(w) for w in self.shown_words())}. Use one of them (whole words, "
                "case and surrounding punctuation ignored)."
            )
        return sorted({p for positions in found for p in positions})


def _short(text, limit=80):
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _primary_tokenizer(clip):
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


def _ids(sd_tokenizer, text):
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
        ids = _ids(sd_tokenizer, rest) if rest else []
        if count or ids:
            out.append((index, word, weight, count, ids))
    return out


def _token_string(hf_tokenizer, token):
    if not isinstance(token, int):
        return "<embedding>"
    return hf_tokenizer.convert_ids_to_tokens(token)


def prompt_tokens(clip, text):
    """Tokenise `text` with the CLIP's tokenizer and map each word to its token positions."""
    from .text_encoders import dit_prompt_tokens  # T5 / SD3 / Qwen2.5-VL (imported late: it builds on this module)

    dit = dit_prompt_tokens(clip, text)
    if dit is not None:
        return dit
    key, sd_tokenizer = _primary_tokenizer(clip)
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
                f"\"{_short(text)}\"; please report this prompt")
        span = content[cursor:cursor + count + len(ids)]
        words.append(Word(word, tuple(p for p, _ in span), weight, index))
        cursor += len(span)
    return PromptTokens(text=text, token_strings=strings, words=words, end_positions=tuple(end_positions))


ANNOTATION_KEY = "attention_edit_tokens"


def annotate(conditioning, tokens):
    """A copy of a CONDITIONING list whose cond dicts carry the prompt's PromptTokens."""
    return [[cond, {**options, ANNOTATION_KEY: tokens}] for cond, options in conditioning]


def annotation_of(conditioning):
    """The PromptTokens carried by a CONDITIONING; None for plain CLIP Text Encode output, and
    None when Conditioning Combine joined different prompts (the maps would mix their words)."""
    found = [options[ANNOTATION_KEY] for _, options in conditioning if ANNOTATION_KEY in options]
    if not found or any(tokens.text != found[0].text for tokens in found):
        return None
    return found[0]


def recorded_length(conditioning):
    """The token count of the prompt a recorder records from a CONDITIONING: the annotated cond's
    (Conditioning Combine may put a plain, longer prompt first), else the first cond's."""
    for cond, options in conditioning:
        if ANNOTATION_KEY in options:
            return cond.shape[1]
    return conditioning[0][0].shape[1]


def no_words_reason(conditioning, input_name="positive"):
    """Why `annotation_of(conditioning)` is None, and what to do: the error text of every node
    that needs words from it (or from the maps recorded with it)."""
    texts = list(dict.fromkeys(options[ANNOTATION_KEY].text for _, options in conditioning
                               if ANNOTATION_KEY in options))
    if len(texts) > 1:
        joined = " + ".join(f'"{_short(text, 40)}"' for text in texts)
        return (f"the '{input_name}' conditioning joins {len(texts)} different prompts ({joined}), e.g. by "
                "Conditioning Combine; their attention mixes their word layouts, so no word can be "
                "found in it. Record (or edit) with one prompt: one Attention Text Encode, without "
                "Conditioning Combine")
    return (f"the '{input_name}' conditioning does not say which tokens are which words. Encode the "
            "prompt with the 'Attention Text Encode' node (attention_edit) instead of CLIP Text Encode; "
            "it works anywhere CLIP Text Encode does, ControlNet nodes included")


def tokens_of(conditioning, input_name="positive"):
    """The PromptTokens carried by a CONDITIONING, or a clear error saying why there are none."""
    tokens = annotation_of(conditioning)
    if tokens is not None:
        return tokens
    raise ValueError(no_words_reason(conditioning, input_name) + ".")
