"""Word <-> token positions for the text encoders of DiT models (Flux, Kontext, Chroma, SD3.x,
Qwen-Image, Qwen-Image-Edit). docs/text_encoders.md describes each layout.

Positions index the conditioning's token axis, which is the text keys of the model's joint
attention in order. One small adapter per encoder family reads ComfyUI's own tokenization
(`clip.tokenize`) and places the prompt's words on it with one shared mapping:
`_map_pieces` tokenises each piece of text ComfyUI tokenised in one call (a weight segment; for
Qwen the whole templated prompt) with character offsets, assigns every token to the whitespace
word its characters fall in, and checks that these tokens are exactly ComfyUI's (else
TokenAlignmentError names the word). SD1.x/SD2.x/SDXL CLIP stays on attention/tokens.py's path.
"""
import functools
import re
from dataclasses import dataclass

from .tokens import CHUNK, PromptLengthError, PromptTokens, Word, _short, normalise_word, prompt_tokens

CLIP_PARTS = {"clip_l", "clip_g", "clip_h"}  # attention/tokens.py's CLIP path reads these
_EMBEDDING = "embedding:"
_WORD_START = "\u2581"  # SentencePiece's '▁' (T5)
IM_START, IMAGE_PAD = 151644, 151655  # Qwen2.5-VL's <|im_start|> and <|image_pad|>
QWEN_USER, QWEN_NEWLINE = 872, 198  # "user", "\n": the template tokens ComfyUI strips after <|im_start|>


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
            f"(75 words/pieces + start and end tokens), but \"{_short(self.text)}\" has {count} content "
            "tokens there (its T5 part takes long prompts, the CLIP part does not). Shorten the prompt."
        )


# ---------------------------------------------------------------- the shared segment mapping

@dataclass(frozen=True)
class _Piece:
    text: str  # what ComfyUI hands the tokenizer in one call
    weight: float = 1.0
    words_from: int = 0  # the user's words are the whitespace words of text[words_from:words_to]
    words_to: int = None


def _comfy_pieces(text, weight=1.0, words_from=0, words_to=None):
    """Split like ComfyUI's SDTokenizer: a new tokenizer call at each ' embedding:' / '\\nembedding:'
    (the space or newline dropped). Word ranges are carried over into each piece's own offsets."""
    words_to = len(text) if words_to is None else words_to
    starts = [0] + [m.start() + 1 for m in re.finditer(f"[ \n]{_EMBEDDING}", text)]
    stops = [s - 1 for s in starts[1:]] + [len(text)]
    return [_Piece(text[a:b], weight, max(words_from - a, 0), max(min(words_to, b) - a, 0))
            for a, b in zip(starts, stops) if b > a]


@functools.lru_cache(maxsize=None)
def _fast_tokenizer(cls, path):
    import transformers

    return getattr(transformers, cls.__name__ + "Fast").from_pretrained(path)


class _SentencePieceOffsets:
    """ComfyUI's SPieceTokenizer (Wan's umT5: the SentencePiece model from the checkpoint) seen as
    a tokenizer with offsets. SentencePiece splits at white space and marks each word's first
    piece with '▁', so every piece is given the span of the whitespace word it belongs to
    (what _map_pieces needs: which word owns a token). Its own offset output needs protobuf,
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
            if boundary or piece.startswith(_WORD_START):
                word += 1
            boundary = False
            if word >= len(words):
                raise TokenAlignmentError(f"umT5: the tokens of \"{_short(text)}\" do not follow its words; "
                                          "please report this prompt.")
            offsets.append(words[word])
        # ComfyUI's SPieceTokenizer encodes with the end token (add_eos): so does this call
        return {"input_ids": ids + [self.sp.eos_id()], "offset_mapping": offsets + [(len(text), len(text))]}

    @staticmethod
    def is_space(piece):
        """A piece that is only white space: '▁'s, or byte pieces ('<0x09>') of white space."""
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            return chr(int(piece[3:5], 16)).isspace()
        return piece.replace(_WORD_START, " ").isspace()

    def convert_ids_to_tokens(self, token):
        return self.sp.id_to_piece(int(token))


def _offset_tokenizer(hf):
    """A tokenizer that returns character offsets: ComfyUI's own where it can (transformers 5.x,
    T5TokenizerFast), the SentencePiece model itself for ComfyUI's SPieceTokenizer (umT5), else
    the fast class on the same files (transformers 4.x Qwen2Tokenizer)."""
    if getattr(hf, "is_fast", False):
        return hf
    if type(hf).__name__ == "SPieceTokenizer":
        return _SentencePieceOffsets(hf)
    return _fast_tokenizer(type(hf), hf.name_or_path)


def _map_pieces(sd_tokenizer, pieces, words, encoder):
    """Tokenise each piece as ComfyUI does, with offsets. Appends the pieces' words to `words`
    ([text, weight]) and returns (ids, owners): per token its id and the index of its word in
    `words` (None for tokens outside the user's words: template, whitespace-only tokens)."""
    hf = _offset_tokenizer(sd_tokenizer.tokenizer)
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
            if owners[i] is None and hf.convert_ids_to_tokens(ids[i]) == _WORD_START:
                owners[i] = owners[i + 1]
    return ids, owners


def _check_ids(expected, actual, owners, words, text, encoder):
    """ComfyUI's tokens must be the ones the mapping tokenised, or positions would be wrong."""
    if expected == actual:
        return
    first = next((i for i, (e, a) in enumerate(zip(expected, actual)) if e != a), min(len(expected), len(actual)))
    owner = next((owners[i] for i in range(min(first, len(owners) - 1), -1, -1) if owners[i] is not None), None)
    word = repr(words[owner][0]) if owner is not None else "a word"
    raise TokenAlignmentError(
        f"{encoder}: could not align {word} of \"{_short(text)}\" with the tokens ComfyUI produced (the "
        f"encoder split it differently: token {first} is {actual[first:first + 3]} in ComfyUI's tokens, "
        f"{expected[first:first + 3]} when the prompt's words are tokenised). Please report this prompt.")


def _weighted_pieces(text):
    """ComfyUI's weight segments of a prompt ('(red:1.2)' -> 'red' at 1.2), escapes resolved."""
    from comfy import sd1_clip

    pieces = []
    for segment, weight in sd1_clip.token_weights(sd1_clip.escape_important(text), 1.0):
        pieces += _comfy_pieces(sd1_clip.unescape_important(segment), weight)
    return pieces


def _spots(owners, positions):
    """word index -> its token positions, in order."""
    spots = {}
    for owner, position in zip(owners, positions):
        if owner is not None:
            spots.setdefault(owner, []).append(position)
    return spots


def _words(names, spots):
    """The prompt's words that have tokens, in order."""
    return [Word(text, tuple(spots[i]), weight) for i, (text, weight) in enumerate(names) if spots.get(i)]


def _plain_id(entry):
    token = entry[0]
    if isinstance(token, dict):
        return token  # an image ComfyUI put in place of its placeholder token
    return int(token) if not hasattr(token, "shape") else token


# ---------------------------------------------------------------- T5 (Flux, Kontext, Chroma, SD3's T5 part)

def _t5_tokens(clip, text, key, sd_tokenizer, encoder, offset=0):
    """(token strings, word names, word index -> positions, end positions) of a T5 part: no start
    token, '</s>' after the prompt, then '<pad>' tokens up to ComfyUI's minimum length (Flux 256,
    SD3 77) that are real keys of the attention. No 77-token chunks."""
    names = []
    ids, owners = _map_pieces(sd_tokenizer, _weighted_pieces(text), names, encoder)
    end_id = sd_tokenizer.end_token
    hf = _offset_tokenizer(sd_tokenizer.tokenizer)
    strings, content, content_positions, end_positions = [], [], [], []
    position = offset
    for chunk in clip.tokenize(text)[key]:
        ended = False
        for entry in chunk:
            token = _plain_id(entry)
            if not isinstance(token, int):
                raise TokenAlignmentError(
                    f"{encoder}: textual-inversion embeddings ('{_EMBEDDING}...') in a T5 prompt are not "
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
    _check_ids(ids, content, owners, names, text, encoder)
    return strings, names, _spots(owners, content_positions), end_positions


def _t5_prompt(clip, text, encoder, key, sd_tokenizer):
    strings, names, spots, ends = _t5_tokens(clip, text, key, sd_tokenizer, encoder)
    return EncoderPromptTokens(text=text, token_strings=strings, words=_words(names, spots),
                               end_positions=tuple(ends), encoder=encoder, parts=(("T5-XXL", 0, len(strings)),))


def _flux(clip, text, encoder):
    return _t5_prompt(clip, text, encoder, "t5xxl", clip.tokenizer.t5xxl)


def _chroma(clip, text, encoder):
    return _t5_prompt(clip, text, encoder, "t5xxl", clip.tokenizer.clip_t5xxl)


def _wan(clip, text, encoder):
    """umT5 (Wan 2.1 / 2.2): T5's layout, '</s>' then '<pad>' to 512, and ComfyUI zeroes the pads'
    embeddings (the recorder leaves them out of the maps' normalisation)."""
    strings, names, spots, ends = _t5_tokens(clip, text, "umt5xxl", clip.tokenizer.clip_umt5xxl, encoder)
    return EncoderPromptTokens(text=text, token_strings=strings, words=_words(names, spots),
                               end_positions=tuple(ends), encoder=encoder, parts=(("umT5-XXL", 0, len(strings)),))


# ---------------------------------------------------------------- SD3 / SD3.5

class _Without:
    """A tokenizer seen without some of its parts (attribute lookups fall through otherwise)."""

    def __init__(self, inner, hidden):
        self._inner, self._hidden = inner, hidden

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(name)
        return getattr(self._inner, name)


class _ClipPart:
    """SD3's CLIP-L/G half as a CLIP object, so attention/tokens.py's CLIP path maps it exactly as
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
        clip_tokens = prompt_tokens(_ClipPart(clip), text)
        strings, ends = list(clip_tokens.token_strings), list(clip_tokens.end_positions)
        clip_words = clip_tokens.words
        clip_length = len(strings)
        parts.append(("CLIP-L/G", 0, clip_length))
    words = clip_words
    if has_t5:
        offset = len(strings)
        t5_strings, names, spots, t5_ends = _t5_tokens(clip, text, "t5xxl", clip.tokenizer.t5xxl, encoder, offset)
        strings += t5_strings
        ends += t5_ends
        parts.append(("T5-XXL", offset, len(strings)))
        words = (_words(names, spots) if clip_words is None
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
            f"{encoder}: could not match the word {clip_words[k].text!r} of \"{_short(text)}\" between the "
            "CLIP part and the T5 part (the encoders split the prompt differently). Please report this prompt.")
    return words


# ---------------------------------------------------------------- Qwen-Image / Qwen-Image-Edit

def _qwen_template_end(ids):
    """Where ComfyUI's QwenImageTEModel cuts the template prefix off the encoded sequence: at the
    second <|im_start|>, and past its 'user' '\\n' when they follow (the same rule, on the ids)."""
    end, seen = -1, 0
    for i, token in enumerate(ids):
        if token == IM_START and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == QWEN_USER and ids[end + 2] == QWEN_NEWLINE:
        end += 3
    return end


def qwen_prompt_tokens(clip, text, images=(), vision_tokens=None, template=None, preamble=""):
    """PromptTokens of a Qwen-Image prompt. `images` as given to clip.tokenize (Qwen-Image-Edit:
    the template with <|vision_start|><|image_pad|><|vision_end|>); `vision_tokens`: how many
    embeddings the vision encoder put in place of each <|image_pad|>, one count or one per image
    (the caller measures them; None counts each placeholder as one token). `template` /
    `preamble`: what TextEncodeQwenImageEditPlus passes, its llama_template and the
    "Picture i: <|vision_start|><|image_pad|><|vision_end|>" text before the prompt (template
    text to us, not the user's words)."""
    from comfy import sd1_clip

    encoder = ENCODERS["qwen_image"][0]
    if encoder_family(clip) != "qwen_image":
        raise UnsupportedEncoderError(
            f"this node needs Qwen-Image's text encoder ({encoder}); got {type(clip.tokenizer).__name__}. "
            "Load the Qwen-Image CLIP (qwen_2.5_vl_7b), or use Attention Text Encode for other models.")
    tokenizer = clip.tokenizer
    sd_tokenizer = tokenizer.qwen25_7b
    images = list(images)
    given = {"llama_template": template} if template else {}  # tokenize as the caller's node does
    if (preamble + text).startswith(("<|im_start|>", "<|start_header_id|>")):
        template = "{}"  # the user wrote the whole template; ComfyUI adds none
    elif template is None:
        template = tokenizer.llama_template_images if images else tokenizer.llama_template
    unescape = lambda s: sd1_clip.unescape_important(sd1_clip.escape_important(s))  # noqa: E731
    prefix, suffix = (unescape(s) for s in template.split("{}", 1))
    prefix += unescape(preamble)
    body = unescape(text)
    full = prefix + body + suffix
    names = []
    ids, owners = _map_pieces(sd_tokenizer, _comfy_pieces(full, 1.0, len(prefix), len(prefix) + len(body)),
                              names, encoder)
    tokenized = clip.tokenize(preamble + text, images=images, **given)["qwen25_7b"]
    comfy_tokens = [_plain_id(entry) for chunk in tokenized for entry in chunk]
    comfy_ids = [IMAGE_PAD if isinstance(t, dict) else t for t in comfy_tokens]
    _check_ids(ids, comfy_ids, owners, names, text, encoder)

    cut = _qwen_template_end(comfy_ids)
    hf = sd_tokenizer.tokenizer
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    strings, positions, parts, ends = [], [], [], []
    counts = iter(vision_tokens if isinstance(vision_tokens, (list, tuple)) else [])
    for token in comfy_tokens[cut:]:
        positions.append(len(strings))
        if isinstance(token, dict):
            count = vision_tokens if isinstance(vision_tokens, int) else next(counts, 1)
            parts.append(("vision", len(strings), len(strings) + count))
            strings += ["<image>"] * count
        else:
            if token == im_end and not ends:
                ends.append(len(strings))
            strings.append(hf.convert_ids_to_tokens(token))
    words = _words(names, _spots(owners[cut:], positions))
    return EncoderPromptTokens(text=text, token_strings=strings, words=words, end_positions=tuple(ends),
                               encoder=encoder, parts=tuple(parts) + (("Qwen2.5-VL", 0, len(strings)),))


def _qwen_image(clip, text, encoder):
    return qwen_prompt_tokens(clip, text)


# ---------------------------------------------------------------- dispatch

# family -> (name in messages, the tokenizer's parts, adapter)
ENCODERS = {
    "flux": ("Flux / Flux Kontext (T5-XXL context, CLIP-L pooled)", {"clip_l", "t5xxl"}, _flux),
    "sd3": ("SD3 / SD3.5 (CLIP-L + CLIP-G + T5-XXL)", {"clip_l", "clip_g", "t5xxl"}, _sd3),
    "chroma": ("Chroma (T5-XXL)", {"clip_t5xxl"}, _chroma),
    "qwen_image": ("Qwen-Image / Qwen-Image-Edit (Qwen2.5-VL)", {"qwen25_7b"}, _qwen_image),
    "wan": ("Wan 2.1 / 2.2 (umT5-XXL)", {"clip_umt5xxl"}, _wan),
}


def tokenizer_parts(tokenizer):
    """Names of the per-encoder tokenizers inside a ComfyUI tokenizer ({'clip_l', 't5xxl'} for Flux)."""
    return {name for name, value in vars(tokenizer).items() if hasattr(value, "tokenize_with_weights")}


def encoder_family(clip):
    """'flux', 'sd3', 'chroma', 'qwen_image', 'wan'; None for the CLIP encoders of SD1.x/SD2.x/SDXL
    (attention/tokens.py's path). Feature-detected from the tokenizer's parts."""
    if isinstance(clip, _ClipPart):
        return None
    tokenizer = clip.tokenizer
    parts = tokenizer_parts(tokenizer)
    if parts and parts <= CLIP_PARTS:
        return None
    for family, (_, wanted, _) in ENCODERS.items():
        if parts == wanted and (family != "qwen_image" or hasattr(tokenizer, "llama_template_images")):
            return family
    supported = ["SD1.x / SD2.x / SDXL (CLIP)"] + [name for name, _, _ in ENCODERS.values()]
    raise UnsupportedEncoderError(
        f"attention-edit cannot map words for this text encoder ({type(tokenizer).__name__} with "
        f"{', '.join(sorted(parts)) or 'no known'} parts). Supported text encoders: {'; '.join(supported)}.")


def dit_prompt_tokens(clip, text):
    """The prompt's PromptTokens for a DiT text encoder; None for the CLIP path."""
    family = encoder_family(clip)
    if family is None:
        return None
    name, _, adapter = ENCODERS[family]
    return adapter(clip, text, name)
