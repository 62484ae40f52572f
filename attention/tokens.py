"""What an encoded prompt's words are: Word / PromptTokens (which token positions each word holds
on the conditioning's token axis, so on the last axis of the attention probabilities too), the
errors for words not in a prompt, and the annotation that carries them in a CONDITIONING.
attention/text_encoders/ makes them, one reader per text encoder."""
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
                f"tokens), but \"{short(self.text)}\" has {self.content_token_count} content "
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
                f"\"{query}\" is not a word of the prompt: the prompt \"{short(self.text)}\" has no "
                "words. Type the prompt in the text encode node.")
        if not found:
            raise PromptWordError(
                f"\"{query}\" is not a word of the prompt \"{short(self.text)}\". Words of the prompt: "
                f"{', '.join(repr(w) for w in self.shown_words())}. Use one of them (whole words, "
                "case and surrounding punctuation ignored)."
            )
        return sorted({p for positions in found for p in positions})


def short(text, limit=80):
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


# conds whose tokens the model appends to the context's as text keys: HunyuanImage 2.1's byT5
# glyph tokens (the quoted text of the prompt), after the Qwen2.5-VL tokens
APPENDED_TEXT = ("conditioning_byt5small",)


def text_length(cond, options):
    """The text keys one cond gives the model: its context's tokens and any APPENDED_TEXT tokens."""
    return cond.shape[1] + sum(options[key].shape[1] for key in APPENDED_TEXT if options.get(key) is not None)


def recorded_length(conditioning):
    """The token count of the prompt a recorder records from a CONDITIONING: the annotated cond's
    (Conditioning Combine may put a plain, longer prompt first), else the first cond's."""
    for cond, options in conditioning:
        if ANNOTATION_KEY in options:
            return text_length(cond, options)
    return text_length(*conditioning[0])


def no_words_reason(conditioning, input_name="positive"):
    """Why `annotation_of(conditioning)` is None, and what to do: the error text of every node
    that needs words from it (or from the maps recorded with it)."""
    texts = list(dict.fromkeys(options[ANNOTATION_KEY].text for _, options in conditioning
                               if ANNOTATION_KEY in options))
    if len(texts) > 1:
        joined = " + ".join(f'"{short(text, 40)}"' for text in texts)
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
