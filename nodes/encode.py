"""Attention Text Encode: CLIP Text Encode whose output also says which tokens are which words
(CLIP, T5, SD3's CLIP+T5, Qwen2.5-VL; docs/text_encoders.md), and its Qwen-Image-Edit form."""
import math

import torch

from ..attention.text_encoders import prompt_tokens
from ..attention.text_encoders.qwen25vl import qwen_prompt_tokens
from ..attention.tokens import annotate, text_length
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
    for cond, options in conditioning:
        if text_length(cond, options) != tokens.n_tokens:
            raise RuntimeError(
                f"{node}: the text encoder produced {text_length(cond, options)} tokens but the word layout of "
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
                   "Flux Kontext, Flux.2, Chroma, SD3/SD3.5, Qwen-Image, Z-Image, HunyuanImage 2.1 and Wan.")

    def run(self, clip, text):
        tokens = prompt_tokens(clip, text)  # first: an unsupported encoder fails before encoding
        return (annotate(check_layout(encode(clip, text), tokens, "Attention Text Encode"), tokens),)


def qwen_edit_inputs(*images):
    """The inputs of ComfyUI's Qwen-Image-Edit encode nodes: clip, prompt, and optional vae and images."""
    return {"required": {
        "clip": ("CLIP",),
        "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True}),
    }, "optional": {"vae": ("VAE",), **{name: ("IMAGE",) for name in images}}}


class AttentionTextEncodeQwenImageEdit:
    """ComfyUI's TextEncodeQwenImageEdit (the same conditioning, reference latent included) whose
    output also says where the words are: after <|vision_start|>, the image's vision tokens and
    <|vision_end|>. Their count depends on the image size; it is read off the conditioning."""

    @classmethod
    def INPUT_TYPES(cls):
        return qwen_edit_inputs("image")

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


def plus_vision_counts(images):
    """How many vision embeddings TextEncodeQwenImageEditPlus's prompt holds for each image: it
    rescales each to about 384 x 384 px for the vision encoder, whose preprocessing
    (process_qwen2vl_images) cuts 14 px patches and merges them 2 x 2."""
    from comfy.text_encoders.qwen_vl import process_qwen2vl_images

    counts = []
    for image in images:
        scale = math.sqrt(384 * 384 / (image.shape[2] * image.shape[1]))
        size = (round(image.shape[1] * scale), round(image.shape[2] * scale))
        _, grid = process_qwen2vl_images(torch.zeros(1, *size, 3))
        counts.append(int(grid.prod()) // 4)
    return counts


class AttentionTextEncodeQwenImageEditPlus:
    """ComfyUI's TextEncodeQwenImageEditPlus (Qwen-Image-Edit 2509 / 2511: up to three images, each
    as vision tokens in the prompt and as a reference latent) whose output also says where the
    words are: after "Picture i: <|vision_start|>", image i's vision tokens, "<|vision_end|>"."""

    @classmethod
    def INPUT_TYPES(cls):
        return qwen_edit_inputs("image1", "image2", "image3")

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = ("TextEncodeQwenImageEditPlus (Qwen-Image-Edit 2509 / 2511, up to three images) that also "
                   "records which token positions each word occupies (the images' vision tokens come "
                   "first), for attention_edit nodes.")

    def run(self, clip, prompt, vae=None, image1=None, image2=None, image3=None):
        name = "Attention Text Encode (Qwen-Image-Edit Plus)"
        try:
            from comfy_extras.nodes_qwen import TextEncodeQwenImageEditPlus
        except ImportError as error:
            raise RuntimeError(f"{name} needs a ComfyUI with Qwen-Image-Edit 2509 support "
                               f"(comfy_extras.nodes_qwen.TextEncodeQwenImageEditPlus): {error}") from error
        images = [(i, image) for i, image in enumerate((image1, image2, image3)) if image is not None]
        # the node builds its template and "Picture i: ..." text inside execute(), so they are copied
        # here; check_layout refuses a token count that differs from its conditioning's, and
        # tests/test_dit_tokens.py compares the two nodes' conditioning bit for bit on each host
        preamble = "".join(PLUS_PICTURE.format(i + 1) for i, _ in images)
        tokens = qwen_prompt_tokens(clip, prompt, [image for _, image in images],
                                    vision_tokens=plus_vision_counts([image for _, image in images]),
                                    template=PLUS_TEMPLATE, preamble=preamble)
        conditioning = TextEncodeQwenImageEditPlus.execute(clip, prompt, vae=vae, image1=image1, image2=image2,
                                                           image3=image3)[0]
        return (annotate(check_layout(conditioning, tokens, name), tokens),)


# TextEncodeQwenImageEditPlus's llama_template and per-image text (comfy_extras/nodes_qwen.py,
# the same in 0.3.64 and 0.19.3)
PLUS_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
PLUS_PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


NODE_CLASS_MAPPINGS = {"AttentionEditTextEncode": AttentionTextEncode,
                       "AttentionEditTextEncodeQwenImageEdit": AttentionTextEncodeQwenImageEdit,
                       "AttentionEditTextEncodeQwenImageEditPlus": AttentionTextEncodeQwenImageEditPlus}
NODE_DISPLAY_NAME_MAPPINGS = {"AttentionEditTextEncode": "Attention Text Encode",
                              "AttentionEditTextEncodeQwenImageEdit": "Attention Text Encode (Qwen-Image-Edit)",
                              "AttentionEditTextEncodeQwenImageEditPlus":
                                  "Attention Text Encode (Qwen-Image-Edit Plus)"}
