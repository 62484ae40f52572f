"""The shared word mapping of the DiT text encoders: tokenise each piece of text ComfyUI
tokenised in one call (a weight segment; for Qwen the whole templated prompt) with character
offsets, assign every token to the whitespace word its characters fall in, and check that these
tokens are exactly ComfyUI's (else TokenAlignmentError names the word). docs/text_encoders.md
describes each encoder's layout.
"""
import functools
import re
from dataclasses import dataclass

from ..tokens import PromptLengthError, PromptTokens, Word, short

EMBEDDING = "embedding:"
WORD_START = "\u2581"  # SentencePiece's '▁' (T5)


class TokenAlignmentError(RuntimeError):
    """A word's tokens could not be placed on the tokens ComfyUI produced (the encoder split it
    differently than a tokenisation of the word would): the positions would be wrong."""


class UnsupportedEncoderError(TypeError):
    """The CLIP object's text encoder is not one this pack maps words for."""


@dataclass
class EncoderPromptTokens(PromptTokens):
    """PromptTokens of a DiT text encoder: which encoder, and which stretch of the token axis is
    which part (SD3: the CLIP-L/G part, then the T5 part; Qwen-Image-Edit: the vision tokens)."""

    encoder: str = ""
    parts: tuple = ()  # ((name, start, stop), ...) along the token axis, in order
    clip_chunks: int = 0  # 77-token chunks of a CLIP part (SD3), 0 without one

    @property
    def n_chunks(self):
        """77-token CLIP chunks; T5 and Qwen2.5-VL encode the whole prompt as one sequence (1)."""
        return self.clip_chunks or 1

    def part(self, name):
        """(start, stop) of a part of the token axis, e.g. part("T5-XXL")."""
        for part_name, start, stop in self.parts:
            if part_name == name:
                return start, stop
        raise KeyError(f"{self.encoder} has no '{name}' part; its parts: {[p[0] for p in self.parts]}")

    def require_single_chunk(self, purpose):
        if self.clip_chunks <= 1:  # T5 / Qwen2.5-VL take long prompts in one sequence
            return
        start, stop = self.part("CLIP-L/G")
        count = sum(1 for word in self.words for p in word.positions if start <= p < stop)
        raise PromptLengthError(
            f"{purpose} needs the prompt in one 77-token chunk of {self.encoder}'s CLIP-L/G part "
            f"(75 words/pieces + start and end tokens), but \"{short(self.text)}\" has {count} content "
            "tokens there (its T5 part takes long prompts, the CLIP part does not). Shorten the prompt."
        )


# ---------------------------------------------------------------- the shared segment mapping

@dataclass(frozen=True)
class Piece:
    text: str  # what ComfyUI hands the tokenizer in one call
    weight: float = 1.0
    words_from: int = 0  # the user's words are the whitespace words of text[words_from:words_to]
    words_to: int = None


def comfy_pieces(text, weight=1.0, words_from=0, words_to=None):
    """Split like ComfyUI's SDTokenizer: a new tokenizer call at each ' embedding:' / '\\nembedding:'
    (the space or newline dropped). Word ranges are carried over into each piece's own offsets."""
    words_to = len(text) if words_to is None else words_to
    starts = [0] + [m.start() + 1 for m in re.finditer(f"[ \n]{EMBEDDING}", text)]
    stops = [s - 1 for s in starts[1:]] + [len(text)]
    return [Piece(text[a:b], weight, max(words_from - a, 0), max(min(words_to, b) - a, 0))
            for a, b in zip(starts, stops) if b > a]


@functools.lru_cache(maxsize=None)
def fast_tokenizer(cls, path):
    import transformers

    return getattr(transformers, cls.__name__ + "Fast").from_pretrained(path)


class SentencePieceOffsets:
    """ComfyUI's SPieceTokenizer (Wan's umT5: the SentencePiece model from the checkpoint) seen as
    a tokenizer with offsets. SentencePiece splits at white space and marks each word's first
    piece with '▁', so every piece is given the span of the whitespace word it belongs to
    (what map_pieces needs: which word owns a token). Its own offset output needs protobuf,
    which ComfyUI does not install."""

    def __init__(self, spiece):
        self.sp = spiece.tokenizer  # sentencepiece.SentencePieceProcessor

    def __call__(self, text, return_offsets_mapping=True):
        ids = list(self.sp.encode(text, add_bos=False, add_eos=False))
        words = [m.span() for m in re.finditer(r"\S+", text)]
        offsets, word, boundary = [], -1, True
        for token in ids:
            piece = self.sp.id_to_piece(token)
            if self.is_space(piece):  # '▁', '▁▁', a tab's byte piece: between words, nobody's
                offsets.append((0, 0))
                boundary = True
                continue
            if boundary or piece.startswith(WORD_START):
                word += 1
            boundary = False
            if word >= len(words):
                raise TokenAlignmentError(f"umT5: the tokens of \"{short(text)}\" do not follow its words; "
                                          "please report this prompt.")
            offsets.append(words[word])
        # ComfyUI's SPieceTokenizer encodes with the end token (add_eos): so does this call
        return {"input_ids": ids + [self.sp.eos_id()], "offset_mapping": offsets + [(len(text), len(text))]}

    @staticmethod
    def is_space(piece):
        """A piece that is only white space: '▁'s, or byte pieces ('<0x09>') of white space."""
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return chr(int(piece[3:5], 16)).isspace()
        return piece.replace(WORD_START, " ").isspace()

    def convert_ids_to_tokens(self, token):
        return self.sp.id_to_piece(int(token))


def offset_tokenizer(hf):
    """A tokenizer that returns character offsets: ComfyUI's own where it can (transformers 5.x,
    T5TokenizerFast), the SentencePiece model itself for ComfyUI's SPieceTokenizer (umT5), else
    the fast class on the same files (transformers 4.x Qwen2Tokenizer)."""
    if getattr(hf, "is_fast", False):
        return hf
    if type(hf).__name__ == "SPieceTokenizer":
        return SentencePieceOffsets(hf)
    return fast_tokenizer(type(hf), hf.name_or_path)


def map_pieces(sd_tokenizer, pieces, words, encoder):
    """Tokenise each piece as ComfyUI does, with offsets. Appends the pieces' words to `words`
    ([text, weight]) and returns (ids, owners): per token its id and the index of its word in
    `words` (None for tokens outside the user's words: template, whitespace-only tokens)."""
    hf = offset_tokenizer(sd_tokenizer.tokenizer)
    start = sd_tokenizer.tokens_start
    strip_end = getattr(sd_tokenizer, "tokenizer_adds_end_token", True)
    ids, owners = [], []
    for piece in pieces:
        first = len(ids)
        encoded = hf(piece.text, return_offsets_mapping=True)
        stop = len(encoded["input_ids"]) - 1 if strip_end else None
        spans = [(m.start() + piece.words_from, m.end() + piece.words_from, len(words) + i)
                 for i, m in enumerate(re.finditer(r"\S+", piece.text[piece.words_from:piece.words_to]))]
        words.extend([piece.text[lo:hi], piece.weight] for lo, hi, _ in spans)
        for token, (a, b) in zip(encoded["input_ids"][start:stop], encoded["offset_mapping"][start:stop]):
            while a < b and piece.text[a].isspace():
                a += 1
            while b > a and piece.text[b - 1].isspace():
                b -= 1
            hits = [index for lo, hi, index in spans if lo < b and a < hi]
            if len(hits) > 1 or (hits and not any(lo <= a and b <= hi for lo, hi, _ in spans)):
                raise TokenAlignmentError(
                    f"{encoder}: a token of \"{piece.text[a:b]}\" does not fit in one word of the prompt "
                    "(the encoder split the words differently); please report this prompt.")
            ids.append(int(token))
            owners.append(hits[0] if hits else None)
        # SentencePiece's word-start marker '▁' standing alone belongs to the word it starts (its
        # offsets cover that word's first character or the space before it, by tokenizers version)
        for i in range(len(ids) - 2, first - 1, -1):
            if owners[i] is None and hf.convert_ids_to_tokens(ids[i]) == WORD_START:
                owners[i] = owners[i + 1]
    return ids, owners


def check_ids(expected, actual, owners, words, text, encoder):
    """ComfyUI's tokens must be the ones the mapping tokenised, or positions would be wrong."""
    if expected == actual:
        return
    first = next((i for i, (e, a) in enumerate(zip(expected, actual)) if e != a), min(len(expected), len(actual)))
    owner = next((owners[i] for i in range(min(first, len(owners) - 1), -1, -1) if owners[i] is not None), None)
    word = repr(words[owner][0]) if owner is not None else "a word"
    raise TokenAlignmentError(
        f"{encoder}: could not align {word} of \"{short(text)}\" with the tokens ComfyUI produced (the "
        f"encoder split it differently: token {first} is {actual[first:first + 3]} in ComfyUI's tokens, "
        f"{expected[first:first + 3]} when the prompt's words are tokenised). Please report this prompt.")


def weighted_pieces(text):
    """ComfyUI's weight segments of a prompt ('(red:1.2)' -> 'red' at 1.2), escapes resolved."""
    from comfy import sd1_clip

    pieces = []
    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0):
        pieces += comfy_pieces(sd1_clip.unescape_important(segment), weight)
    return pieces


def spots_of(owners, positions):
    """word index -> its token positions, in order."""
    spots = {}
    for owner, position in zip(owners, positions):
        if owner is not None:
            spots.setdefault(owner, []).append(position)
    return spots


def words_of(names, spots):
    """The prompt's words that have tokens, in order."""
    return [Word(text, tuple(spots[i]), weight) for i, (text, weight) in enumerate(names) if spots.get(i)]


def plain_id(entry):
    token = entry[0]
    if isinstance(token, dict):
        return token  # an image ComfyUI put in place of its placeholder token
    return int(token) if not hasattr(token, "shape") else token


@dataclass(frozen=True)
class Encoder:
    """A text encoder the pack maps words for: found by its tokenizer's parts."""

    name: str  # in messages
    parts: frozenset  # the ComfyUI tokenizer's per-encoder tokenizers ({'clip_l', 't5xxl'} for Flux)
    read: object  # (clip, text, name) -> EncoderPromptTokens
    marker: str = None  # an attribute the tokenizer must also have (Qwen-Image's image template)
    accepts: object = None  # tokenizer -> bool, where encoders share their parts (Qwen3: Z-Image / Klein)

    def matches(self, tokenizer):
        return (tokenizer_parts(tokenizer) == self.parts and (self.marker is None or hasattr(tokenizer, self.marker))
                and (self.accepts is None or self.accepts(tokenizer)))

    def prompt_tokens(self, clip, text):
        return self.read(clip, text, self.name)


def tokenizer_parts(tokenizer):
    """Names of the per-encoder tokenizers inside a ComfyUI tokenizer ({'clip_l', 't5xxl'} for Flux)."""
    return {name for name, value in vars(tokenizer).items() if hasattr(value, "tokenize_with_weights")}
