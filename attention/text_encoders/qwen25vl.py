"""Qwen2.5-VL (Qwen-Image, Qwen-Image-Edit 2509 / 2511): the prompt inside ComfyUI's chat
template, the template prefix cut off the encoded sequence, vision tokens in place of each
<|image_pad|> for the Edit models."""
from ..tokens import PromptWordError, short
from .mapping import (Encoder, EncoderPromptTokens, UnsupportedEncoderError, check_ids, comfy_pieces, map_pieces,
                      plain_id, spots_of, words_of)

IM_START, IMAGE_PAD = 151644, 151655  # Qwen2.5-VL's <|im_start|> and <|image_pad|>
QWEN_USER, QWEN_NEWLINE = 872, 198  # "user", "\n": the template tokens ComfyUI strips after <|im_start|>


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


def qwen_prompt_tokens(clip, text, images=(), vision_tokens=None, template=None, preamble="", encoder=None,
                       template_end=_qwen_template_end):
    """PromptTokens of a Qwen-Image prompt. `images` as given to clip.tokenize (Qwen-Image-Edit:
    the template with <|vision_start|><|image_pad|><|vision_end|>); `vision_tokens`: how many
    embeddings the vision encoder put in place of each <|image_pad|>, one count or one per image
    (the caller measures them; None counts each placeholder as one token). `template` /
    `preamble`: what TextEncodeQwenImageEditPlus passes, its llama_template and the
    "Picture i: <|vision_start|><|image_pad|><|vision_end|>" text before the prompt (template
    text to us, not the user's words). `encoder` / `template_end`: another model's Qwen2.5-VL part
    (HunyuanImage 2.1: its Encoder and its cut rule, ids -> first kept token); there a word the
    cut would hide is an error, not a silent loss."""
    from comfy import sd1_clip

    other = encoder is not None
    encoder = (encoder or QWEN_IMAGE).name
    if not other and not QWEN_IMAGE.matches(clip.tokenizer):
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
    ids, owners = map_pieces(sd_tokenizer, comfy_pieces(full, 1.0, len(prefix), len(prefix) + len(body)),
                              names, encoder)
    tokenized = clip.tokenize(preamble + text, images=images, **given)["qwen25_7b"]
    comfy_tokens = [plain_id(entry) for chunk in tokenized for entry in chunk]
    comfy_ids = [IMAGE_PAD if isinstance(t, dict) else t for t in comfy_tokens]
    check_ids(ids, comfy_ids, owners, names, text, encoder)

    cut = template_end(comfy_ids)
    hidden = [names[owner][0] for owner in owners[:max(cut, 0)] if owner is not None]
    if other and hidden:
        raise PromptWordError(
            f"{encoder}: ComfyUI cuts the first {cut} tokens of \"{short(text)}\" off as template, and with "
            f"them the words {', '.join(repr(w) for w in dict.fromkeys(hidden))}: the model never sees "
            "them. Write the prompt without a template of your own (ComfyUI adds the model's).")
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
    words = words_of(names, spots_of(owners[cut:], positions))
    return EncoderPromptTokens(text=text, token_strings=strings, words=words, end_positions=tuple(ends),
                               encoder=encoder, parts=tuple(parts) + (("Qwen2.5-VL", 0, len(strings)),))


def _qwen_image(clip, text, encoder):
    return qwen_prompt_tokens(clip, text)


QWEN_IMAGE = Encoder("Qwen-Image / Qwen-Image-Edit (Qwen2.5-VL)", frozenset({"qwen25_7b"}), _qwen_image,
                     marker="llama_template_images")
