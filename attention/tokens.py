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


@dataclass
class PromptTokens:
    """What later nodes need to find words in an encoded prompt, without re-tokenising."""

    text: str
    token_strings: list  # one per position: "<start>", "shi", "ba</w>", "<end>", "<pad>", "<embedding>"
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

    def occurrences(self, query):
        """Token positions of every occurrence of `query` (one or more consecutive words)."""
        wanted = [normalise_word(w) for w in query.split()]
        wanted = [w for w in wanted if w]
        if not wanted:
            raise PromptWordError(f"the word to look for is empty (got {query!r}); type a word of the prompt")
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
        if not found:
            raise PromptWordError(
                f"\"{query}\" is not a word of the prompt \"{_short(self.text)}\". Words of the prompt: "
                f"{', '.join(repr(w) for w in self.word_list())}. Use one of them (whole words, "
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


def _expected_words(text, sd_tokenizer):
    """(word, weight, token ids) in ComfyUI's tokenisation order."""
    from comfy import sd1_clip

    out = []
    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0):
        for word in sd1_clip.unescape_important(segment).split():
            ids = sd_tokenizer.tokenizer(word)["input_ids"][sd_tokenizer.tokens_start:-1]
            if ids:
                out.append((word, weight, ids))
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

    strings, content, end_positions = [], [], []
    for chunk_index, chunk in enumerate(chunks):
        ended = False
        for offset, entry in enumerate(chunk):
            token = entry[0]
            token = int(token) if not hasattr(token, "shape") else token
            position = chunk_index * len(chunk) + offset
            if offset == 0 and start_id is not None and token == start_id:
                strings.append("<start>")
            elif ended:
                strings.append("<pad>")
            elif isinstance(token, int) and token == end_id:
                strings.append("<end>")
                end_positions.append(position)
                ended = True
            else:
                strings.append(_token_string(hf, token))
                content.append((position, token))

    words, cursor = [], 0
    for word, weight, ids in _expected_words(text, sd_tokenizer):
        if cursor < len(content) and not isinstance(content[cursor][1], int):
            # A textual-inversion embedding: its vectors stand where the word was.
            count = 1
            while cursor + count < len(content) and not isinstance(content[cursor + count][1], int):
                count += 1
            words.append(Word(word, tuple(p for p, _ in content[cursor:cursor + count]), weight))
            cursor += count
            continue
        actual = [t for _, t in content[cursor:cursor + len(ids)]]
        if actual != list(ids):
            raise RuntimeError(
                f"could not align the word {word!r} with the tokens ComfyUI produced for "
                f"\"{_short(text)}\"; please report this prompt"
            )
        words.append(Word(word, tuple(p for p, _ in content[cursor:cursor + len(ids)]), weight))
        cursor += len(ids)
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


def tokens_of(conditioning, input_name="positive"):
    """The PromptTokens carried by a CONDITIONING, or a clear error naming the node to use."""
    tokens = annotation_of(conditioning)
    if tokens is not None:
        return tokens
    raise ValueError(
        f"the '{input_name}' conditioning does not say which tokens are which words. Encode the "
        "prompt with the 'Attention Text Encode' node (attention_edit) instead of CLIP Text Encode; "
        "it works anywhere CLIP Text Encode does, ControlNet nodes included. (Prompts joined by "
        "Conditioning Combine have no single word layout: use one prompt.)"
    )
