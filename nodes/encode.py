"""Attention Text Encode: CLIP Text Encode whose output also says which tokens are which words
(CLIP, T5, SD3's CLIP+T5, Qwen2.5-VL; docs/text_encoders.md), and its Qwen-Image-Edit form."""
from ..attention.text_encoders import qwen_prompt_tokens
from ..attention.tokens import annotate, prompt_tokens
from .common import CATEGORY


def encode(clip, text):
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):  # current ComfyUI (hooks, schedules)
        conditioning = clip.encode_from_tokens_scheduled(tokens)
    else:
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        conditioning = [[cond, {"pooled_output": pooled}]]
    return conditioning


def check_layout(conditioning, tokens, node):
    """The word layout must cover the conditioning's token axis exactly, or positions are wrong."""
    for cond, _ in conditioning:
        if cond.shape[1] != tokens.n_tokens:
            raise RuntimeError(
                f"{node}: the text encoder produced {cond.shape[1]} tokens but the word layout of "
                f"\"{tokens.text[:60]}\" has {tokens.n_tokens}; this text encoder's layout is not the one "
                "attention-edit knows (docs/text_encoders.md). Please report it with the model's name.")
    return conditioning


class AttentionTextEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip":
                     "The prompt. Weights like (word:1.2) work as in CLIP Text Encode."}),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Encodes a prompt like CLIP Text Encode and records which token positions each "
                   "word occupies, so attention_edit nodes can find words in the attention maps. "
                   "Works with the CLIP encoders of SD1.x/SD2.x/SDXL and the text encoders of Flux, "
                   "Flux Kontext, Chroma, SD3/SD3.5 and Qwen-Image.")

    def run(self, clip, text):
        tokens = prompt_tokens(clip, text)  # first: an unsupported encoder fails before encoding
        return (annotate(check_layout(encode(clip, text), tokens, "Attention Text Encode"), tokens),)


class AttentionTextEncodeQwenImageEdit:
    """ComfyUI's TextEncodeQwenImageEdit (the same conditioning, reference latent included) whose
    output also says where the words are: after <|vision_start|>, the image's vision tokens and
    <|vision_end|>. Their count depends on the image size; it is read off the conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True}),
        }, "optional": {
            "vae": ("VAE",),
            "image": ("IMAGE",),
        }}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("TextEncodeQwenImageEdit that also records which token positions each word occupies "
                   "(the reference image's vision tokens come first), for attention_edit nodes.")

    def run(self, clip, prompt, vae=None, image=None):
        name = "Attention Text Encode (Qwen-Image-Edit)"
        images = [] if image is None else [image]
        tokens = qwen_prompt_tokens(clip, prompt, images)  # one token per image placeholder
        try:
            from comfy_extras.nodes_qwen import TextEncodeQwenImageEdit
        except ImportError as error:
            raise RuntimeError(f"{name} needs a ComfyUI with Qwen-Image-Edit support "
                               f"(comfy_extras.nodes_qwen): {error}") from error
        conditioning = TextEncodeQwenImageEdit.execute(clip, prompt, vae=vae, image=image)[0]
        if images:  # the vision encoder put this many embeddings where the placeholder was
            vision = conditioning[0][0].shape[1] - tokens.n_tokens + 1
            tokens = qwen_prompt_tokens(clip, prompt, images, vision_tokens=vision)
        return (annotate(check_layout(conditioning, tokens, name), tokens),)


NODE_CLASS_MAPPINGS = {"AttentionEditTextEncode": AttentionTextEncode,
                       "AttentionEditTextEncodeQwenImageEdit": AttentionTextEncodeQwenImageEdit}
NODE_DISPLAY_NAME_MAPPINGS = {"AttentionEditTextEncode": "Attention Text Encode",
                              "AttentionEditTextEncodeQwenImageEdit": "Attention Text Encode (Qwen-Image-Edit)"}
