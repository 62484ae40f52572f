"""Qwen3 (Z-Image / Z-Image Turbo: Qwen3-4B; Flux.2 [klein]: Qwen3-4B or Qwen3-8B): the prompt
inside ComfyUI's chat template, the whole templated sequence kept as the conditioning.

Both models' tokenizers have the same part (`qwen3_4b`; Klein 9B: `qwen3_8b`) and differ by class
and template (comfy/text_encoders/z_image.py, flux.py):
- ZImageTokenizer: "<|im_start|>user\\n{}<|im_end|>\\n<|im_start|>assistant\\n", no padding
  (min_length 1); ZImageTEModel keeps every token (hidden state -2).
- KleinTokenizer / KleinTokenizer8B: the same turn plus an empty "<think>\\n\\n</think>\\n\\n", padded
  with <|endoftext|> (151643) to min_length 512; Flux2TEModel keeps every token (3 hidden states
  joined along the channels), padding included.
Neither cuts the template off (unlike Qwen-Image's Qwen2.5-VL), so positions index ComfyUI's
tokens directly; ComfyUI passes the prompt as text (no weights: '(red:1.5)' is a word).
"""
from .chat import map_chat, words_after_cut
from .mapping import Encoder, EncoderPromptTokens

PAD = 151643  # <|endoftext|>, the Qwen3 tokenizers' padding


def _has_class(tokenizer, names):
    return any(cls.__name__ in names for cls in type(tokenizer).__mro__)


def qwen3_prompt_tokens(clip, text, encoder, template=None):
    """PromptTokens of a Z-Image / Flux.2 [klein] prompt; `template`: a node's llama_template
    (ComfyUI's own by default)."""
    tokenizer = clip.tokenizer
    (part,) = encoder.parts
    given = {"llama_template": template} if template else {}
    template = template or tokenizer.llama_template
    comfy_tokens, owners, names = map_chat(clip, part, text, template, encoder.name, given=given, pad=PAD)
    hf = getattr(tokenizer, part).tokenizer
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    padding = len(comfy_tokens) - next((i + 1 for i in range(len(comfy_tokens) - 1, -1, -1)
                                        if comfy_tokens[i] != PAD or owners[i] is not None), 0)
    strings = [hf.convert_ids_to_tokens(token) for token in comfy_tokens[:len(comfy_tokens) - padding]]
    strings += ["<pad>"] * padding
    ends = tuple(i for i, token in enumerate(comfy_tokens) if token == im_end and owners[i] is None)[:1]  # the template's
    words = words_after_cut(names, owners, list(range(len(comfy_tokens))), 0, text, encoder.name)
    return EncoderPromptTokens(text=text, token_strings=strings, words=words, end_positions=ends,
                               encoder=encoder.name, parts=(("Qwen3", 0, len(strings)),))


def _read(clip, text, name):
    encoder = next(e for e in (Z_IMAGE, KLEIN, KLEIN_8B) if e.name == name)
    return qwen3_prompt_tokens(clip, text, encoder)


Z_IMAGE = Encoder("Z-Image (Qwen3-4B)", frozenset({"qwen3_4b"}), _read,
                  accepts=lambda tokenizer: _has_class(tokenizer, {"ZImageTokenizer"}))
KLEIN = Encoder("Flux.2 [klein] 4B (Qwen3-4B)", frozenset({"qwen3_4b"}), _read,
                accepts=lambda tokenizer: _has_class(tokenizer, {"KleinTokenizer"}))
KLEIN_8B = Encoder("Flux.2 [klein] 9B (Qwen3-8B)", frozenset({"qwen3_8b"}), _read,
                   accepts=lambda tokenizer: _has_class(tokenizer, {"KleinTokenizer", "KleinTokenizer8B"}))
