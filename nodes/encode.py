"""Attention Text Encode: CLIP Text Encode whose output also says which tokens are which words."""
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
                   "word occupies, so attention_edit nodes can find words in the attention maps.")

    def run(self, clip, text):
        return (annotate(encode(clip, text), prompt_tokens(clip, text)),)


NODE_CLASS_MAPPINGS = {"AttentionEditTextEncode": AttentionTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"AttentionEditTextEncode": "Attention Text Encode"}
