"""Composite instructions for FoI: sub-instructions, one marked keyword each, and their tokens.

Syntax (one text box): sub-instructions are separated by ';' or new lines, and each has exactly one
keyword marked with asterisks, which may cover several words:

    put a *hat* on the dog; make the *sky* a sunset
    turn the *red car* blue

The asterisks are removed and the rest is encoded exactly as typed, as ONE prompt (separators
included: a ';' is a token of the prompt, a new line is whitespace). ComfyUI's weight syntax
`(word:1.2)` and escapes work as in CLIP Text Encode. Asterisks are always markers.

Token bookkeeping (positions index the conditioning's token axis, like attention/tokens.py):
- a sub-instruction's span = the positions of every token of its words (the keyword included);
  separator tokens (';'), the start token, the end token and padding belong to no sub-instruction
  (masks.foi.token_region_mask decides how those are treated);
- a keyword's positions = the tokens of the marked text only: in "*hat*," the ',' is in the
  sub-instruction's span but not in the keyword.
"""
import re
from dataclasses import dataclass, field

from .text_encoders import encoder_family, prompt_tokens
from .text_encoders.clip import primary_tokenizer, prompt_words, word_ids
from .tokens import PromptTokens, short

INSTRUCTIONS_KEY = "attention_edit_instructions"
SEPARATORS = ";\n"
_KW = "\ue000"  # stands for a '*' while ComfyUI's weight parser runs (private-use characters)
_SEP = "\ue001"  # marks the start of a separator run between two sub-instructions


class InstructionSyntaxError(ValueError):
    """The instruction text does not follow the sub-instruction / keyword syntax."""


@dataclass(frozen=True)
class SubInstruction:
    text: str  # as typed, without markers and surrounding whitespace
    keyword: str  # the marked text
    span: tuple  # token positions of the sub-instruction (keyword included)
    keyword_positions: tuple  # token positions of the keyword


@dataclass
class Instructions:
    """What FoI needs to know about an encoded composite instruction."""

    text: str  # the prompt that was encoded (markers removed)
    tokens: PromptTokens
    subinstructions: list = field(default_factory=list)

    @property
    def n_tokens(self):
        return self.tokens.n_tokens

    @property
    def spans(self):
        return [sub.span for sub in self.subinstructions]

    @property
    def keyword_positions(self):
        return [sub.keyword_positions for sub in self.subinstructions]

    @property
    def keywords(self):
        return [sub.keyword for sub in self.subinstructions]

    def __len__(self):
        return len(self.subinstructions)


# --------------------------------------------------------------------------------------------
# Text level: sub-instructions and markers
# --------------------------------------------------------------------------------------------

def split_instructions(text):
    """'put a *hat* on the dog; make the *sky* a sunset' -> [(sub-instruction, keyword), ...].

    Validates the syntax and raises InstructionSyntaxError with a message that says how to fix it.
    """
    pieces = [p.strip() for p in re.split(f"[{SEPARATORS}]", text)]
    pieces = [p for p in pieces if p]
    if not pieces:
        raise InstructionSyntaxError(
            "the instruction is empty. Type one or more sub-instructions separated by ';' or new "
            "lines, each with its keyword between asterisks, e.g. 'put a *hat* on the dog'.")
    out = []
    for number, piece in enumerate(pieces, 1):
        count = piece.count("*")
        where = f"sub-instruction {number} \"{short(piece, 60)}\""
        if count == 0:
            raise InstructionSyntaxError(
                f"{where} has no keyword. Mark the object it edits (or adds) with asterisks, "
                "e.g. 'put a *hat* on the dog'.")
        if count % 2:
            raise InstructionSyntaxError(
                f"{where} has an unpaired '*'. A keyword must lie inside its sub-instruction: close "
                "it before the next ';' or line break, e.g. 'put a *hat* on the dog; make the *sky* "
                "a sunset'.")
        if count > 2:
            raise InstructionSyntaxError(
                f"{where} marks {count // 2} keywords; FoI takes exactly one keyword per "
                "sub-instruction. Keep one marked phrase, or split it into two sub-instructions "
                "with ';'.")
        keyword = piece.split("*")[1].strip()
        if not keyword:
            raise InstructionSyntaxError(f"{where} has an empty keyword '**'; put a word between the asterisks.")
        out.append((piece.replace("*", "").strip(), keyword))
    return out


def _marked_text(text):
    """The text with '*' -> _KW and a _SEP before each separator run that lies between two
    sub-instructions; removing both gives exactly the prompt that is encoded."""
    parts = re.split(f"([{SEPARATORS}]+)", text.replace("*", _KW))
    content_since_sep = False
    out = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            content_since_sep = content_since_sep or bool(part.replace(_KW, "").strip())
            out.append(part)
            continue
        later = "".join(parts[index + 1:]).replace(_KW, "").strip(SEPARATORS + " \t\r")
        if content_since_sep and later:
            out.append(_SEP)
            content_since_sep = False
        out.append(part)
    return "".join(out)


def encoded_text(text):
    """The prompt FoI encodes for an instruction text: the text without its asterisks."""
    return text.replace("*", "")


# --------------------------------------------------------------------------------------------
# Token level
# --------------------------------------------------------------------------------------------

def _char_labels(word, state):
    """Per visible character of a marked word: (sub-instruction index or None, in keyword).
    `state` = [sub-instruction index, inside keyword] carries across words."""
    labels, chars = [], []
    for ch in word:
        if ch == _SEP:
            state[0] += 1
        elif ch == _KW:
            state[1] = not state[1]
        else:
            chars.append(ch)
            labels.append((None, False) if ch in SEPARATORS else (state[0], state[1]))
    return "".join(chars), labels


def _runs(chars, labels):
    """Consecutive characters with the same label -> [(text, label)]."""
    runs = []
    for ch, label in zip(chars, labels):
        if runs and runs[-1][1] == label:
            runs[-1][0].append(ch)
        else:
            runs.append(([ch], label))
    return [("".join(text), label) for text, label in runs]


def _token_labels(word, positions, chars, labels, sd_tokenizer, strings):
    """Label each token position of one prompt word. Each run of equally labelled characters is
    tokenised on its own; when the pieces give exactly the word's tokens (CLIP splits letters
    from punctuation, so 'hat,' = 'hat' + ','), each token gets its run's label. Otherwise the
    whole word takes the label of its first non-separator character, keyword if any part is."""
    hf = sd_tokenizer.tokenizer
    pieces = []
    for text, label in _runs(chars, labels):
        pieces.extend((hf.convert_ids_to_tokens(i), label) for i in word_ids(sd_tokenizer, text))
    if [s for s, _ in pieces] == [strings[p] for p in positions]:
        return [(p, label) for p, (_, label) in zip(positions, pieces)]
    owners = [label[0] for label in labels if label[0] is not None]
    owner = owners[0] if owners else None
    keyword = any(label[1] for label in labels)
    return [(p, (owner, keyword)) for p in positions]


def parse_instructions(clip, text):
    """Tokenise a composite instruction with the CLIP's tokenizer -> Instructions.

    Errors (InstructionSyntaxError / tokens.PromptLengthError): no sub-instruction, a
    sub-instruction without keyword or with several, a keyword marker that does not close inside
    its sub-instruction, a keyword without tokens, a prompt longer than one 77-token chunk.
    """
    subs = split_instructions(text)
    prompt = encoded_text(text)
    if encoder_family(clip) is not None:  # T5 (Flux, Kontext) / Qwen2.5-VL: word-level labels
        return instructions_from_tokens(text, prompt_tokens(clip, prompt))
    tokens = prompt_tokens(clip, prompt)
    tokens.require_single_chunk("FoI (Focus on Your Instruction)")
    _, sd_tokenizer = primary_tokenizer(clip)

    spans = [[] for _ in subs]
    keyword_positions = [[] for _ in subs]
    by_index = {word.index: word for word in tokens.words}
    state = [0, False]
    word_index = 0
    for marked, _weight in prompt_words(_marked_text(text)):
        chars, labels = _char_labels(marked, state)
        if not chars:
            continue  # a word of markers only: not a word of the encoded prompt
        word = by_index.get(word_index)
        word_index += 1
        if word is None:
            continue  # no tokens (a missing embedding, which ComfyUI skips): no positions to label
        if word.text != chars:
            raise RuntimeError(f"could not align the instruction \"{short(text)}\" with its tokens; "
                               "please report this instruction")
        for position, (owner, in_keyword) in _token_labels(word, word.positions, chars, labels,
                                                           sd_tokenizer, tokens.token_strings):
            if owner is None:
                continue
            spans[owner].append(position)
            if in_keyword:
                keyword_positions[owner].append(position)

    out = []
    for number, ((sub_text, keyword), span, kw) in enumerate(zip(subs, spans, keyword_positions), 1):
        if not kw:
            raise InstructionSyntaxError(
                f"the keyword '{keyword}' of sub-instruction {number} has no tokens of its own "
                "(punctuation or an embedding only?); mark a word.")
        out.append(SubInstruction(sub_text, keyword, tuple(sorted(span)), tuple(sorted(kw))))
    return Instructions(text=prompt, tokens=tokens, subinstructions=out)


def _dit_words(marked, qwen):
    """The whitespace words of a marked instruction as a DiT word layout splits them
    (attention/text_encoders/): T5 within ComfyUI's weight segments, Qwen2.5-VL on the text as
    typed (escapes resolved)."""
    from comfy import sd1_clip

    if qwen:
        segments = [sd1_clip.unescape_important(sd1_clip.escape_important(marked))]
    else:
        segments = [sd1_clip.unescape_important(segment)
                    for segment, _ in sd1_clip.token_weights(sd1_clip.escape_important(marked), 1.0)]
    return [word for segment in segments for word in re.findall(r"\S+", segment)]


def instructions_from_tokens(text, tokens):
    """Instructions of a composite instruction from the word layout (PromptTokens) of its encoded
    text, for the DiT text encoders (T5, Qwen2.5-VL). Labels are per word: a word belongs to the
    sub-instruction of its first character that is not a separator and is part of the keyword if
    any of its characters is ('*hat*,' makes the whole word 'hat,' the keyword: T5 and Qwen's BPE
    split punctuation differently from CLIP, so per-token labels within a word are not drawn)."""
    subs = split_instructions(text)
    prompt = encoded_text(text)
    qwen = "Qwen" in getattr(tokens, "encoder", "")
    spans = [[] for _ in subs]
    keyword_positions = [[] for _ in subs]
    state = [0, False]
    words = list(tokens.words)
    cursor = 0
    for marked in _dit_words(_marked_text(text), qwen):
        chars, labels = _char_labels(marked, state)
        if not chars:
            continue
        if cursor >= len(words) or words[cursor].text != chars:
            continue  # a word without tokens (the layout leaves those out)
        word = words[cursor]
        cursor += 1
        owners = [label[0] for label in labels if label[0] is not None]
        if not owners:
            continue  # a separator word (';')
        spans[owners[0]].extend(word.positions)
        if any(label[1] for label in labels):
            keyword_positions[owners[0]].extend(word.positions)
    if cursor != len(words):
        raise RuntimeError(f"could not align the instruction \"{short(text)}\" with its tokens (at the word "
                           f"{words[cursor].text!r}); please report this instruction")
    out = []
    for number, ((sub_text, keyword), span, kw) in enumerate(zip(subs, spans, keyword_positions), 1):
        if not kw:
            raise InstructionSyntaxError(
                f"the keyword '{keyword}' of sub-instruction {number} has no tokens of its own; mark a word.")
        out.append(SubInstruction(sub_text, keyword, tuple(sorted(set(span))), tuple(sorted(set(kw)))))
    return Instructions(text=prompt, tokens=tokens, subinstructions=out)


def annotate_instructions(conditioning, instructions):
    """A copy of a CONDITIONING list whose cond dicts carry the Instructions (and, under
    attention/tokens.ANNOTATION_KEY, the prompt's PromptTokens, so word-based nodes work too)."""
    from .tokens import ANNOTATION_KEY

    return [[cond, {**options, ANNOTATION_KEY: instructions.tokens, INSTRUCTIONS_KEY: instructions}]
            for cond, options in conditioning]


def instructions_of(conditioning, input_name="positive"):
    """The Instructions carried by a CONDITIONING, or a clear error naming the node to use."""
    for _, options in conditioning:
        if INSTRUCTIONS_KEY in options:
            return options[INSTRUCTIONS_KEY]
    raise ValueError(
        f"the '{input_name}' conditioning carries no FoI sub-instructions. Encode the instruction "
        "with the 'Instruction Text Encode' node (attention_edit), marking one keyword per "
        "sub-instruction with asterisks, e.g. 'put a *hat* on the dog; make the *sky* a sunset', "
        "then pass it through InstructPixToPixConditioning (InstructPix2Pix) or ReferenceLatent (Flux "
        "Kontext); for Qwen-Image-Edit use 'Instruction Text Encode (Qwen-Image-Edit)'.")
