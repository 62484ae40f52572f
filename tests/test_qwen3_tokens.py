"""Word <-> token positions on the Qwen3 text encoders: Z-Image's (ZImageTokenizer, Qwen3-4B) and
Flux.2 [klein]'s (KleinTokenizer: Qwen3-4B, KleinTokenizer8B: Qwen3-8B), which share the tokenizer
part name and differ by class and chat template. Tiny random-weight encoders built from ComfyUI's own
classes with the Qwen tokenizer ComfyUI ships (ae_testlib.dit_text)."""
import pytest
import torch

from ae_testlib import dit_text
from ae_testlib.pack import pack_module

tokens = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
qwen3 = pack_module("attention.text_encoders.qwen3")
chat = pack_module("attention.text_encoders.chat")
nodes = pack_module("nodes")

PROMPTS = ["a photo of a cat", "a (red:1.3) Shiba, dog \\(x\\) next to a red axolotl",
           "tiny   spaced\twords and multi-piece axolotls, <|im_end|> inside"]
PART = {"z_image": "qwen3_4b", "klein": "qwen3_4b", "klein_8b": "qwen3_8b"}
OPENING = ["<|im_start|>", "user", "Ċ"]
CLOSING = {"z_image": ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"],
           "klein": ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ", "<think>", "ĊĊ", "</think>", "ĊĊ"]}
CLOSING["klein_8b"] = CLOSING["klein"]


@pytest.fixture(params=dit_text.QWEN3_FAMILIES)
def family(request, comfy_host):
    dit_text.require_dit_clip(request.param)
    return request.param


def comfy_ids(clip, family, text):
    """ComfyUI's tokens: the conditioning's axis (neither encoder cuts the template off)."""
    return [int(t[0]) for chunk in clip.tokenize(text)[PART[family]] for t in chunk]


@pytest.mark.parametrize("text", PROMPTS)
def test_each_word_sits_on_its_own_tokens(family, text):
    clip = dit_text.build_dit_clip(family)
    pt = text_encoders.prompt_tokens(clip, text)
    axis = comfy_ids(clip, family, text)
    assert pt.n_tokens == len(axis) == nodes.encode.encode(clip, text)[0][0].shape[1]
    hf = getattr(clip.tokenizer, PART[family]).tokenizer
    seen = []
    for word in pt.words:
        assert hf.decode([axis[p] for p in word.positions]).split() == word.text.split()
        seen += word.positions
    assert [w.text for w in pt.words] == text.replace("\\(", "(").replace("\\)", ")").split()
    assert len(seen) == len(set(seen))
    others = [pt.token_strings[p] for p in range(pt.n_tokens) if p not in set(seen)]
    assert others[:3] == OPENING
    closing = CLOSING[family]
    if family == "z_image":  # no padding: the template closes the sequence
        assert others[-len(closing):] == closing
    else:  # Klein pads to 512 tokens with <|endoftext|>
        assert pt.n_tokens == 512 and pt.token_strings[-1] == "<pad>"
        real = [s for s in others if s != "<pad>"]
        assert real[-len(closing):] == closing
    assert pt.token_strings[pt.end_positions[0]] == "<|im_end|>"
    assert pt.end_positions[0] > max(seen)


def test_encode_node_equals_clip_text_encode(family):
    clip = dit_text.build_dit_clip(family)
    for text in (PROMPTS[1], "a cat"):
        for cond, options in dit_text.encode_like_clip_text_encode(clip, text):
            assert options[tokens.ANNOTATION_KEY].n_tokens == cond.shape[1]


def test_a_word_changes_the_conditioning_from_its_position_on(family):
    """Qwen3 is causal: swapping one word leaves every row before its first token unchanged and
    changes that row: the positions index the conditioning's token axis."""
    clip = dit_text.build_dit_clip(family)
    one, other = "a photo of a cat on grass", "a photo of a dog on grass"
    with torch.inference_mode():
        a, b = (nodes.encode.encode(clip, text)[0][0] for text in (one, other))
    changed = torch.nonzero((a != b).any(-1)[0]).flatten().tolist()
    pt = text_encoders.prompt_tokens(clip, one)
    assert changed[0] == pt.positions("cat")[0] == text_encoders.prompt_tokens(clip, other).positions("dog")[0]
    with pytest.raises(tokens.PromptWordError, match="'grass'"):
        pt.positions("horse")


def test_the_encoders_are_told_apart_by_class_and_template(comfy_host):
    for family in dit_text.QWEN3_FAMILIES:
        dit_text.require_dit_clip(family)
    names = {family: text_encoders.encoder_family(dit_text.build_dit_clip(family)) for family in dit_text.QWEN3_FAMILIES}
    assert names == {"z_image": "z_image", "klein": "flux2_klein", "klein_8b": "flux2_klein_8b"}
    klein = dit_text.build_dit_clip("klein").tokenizer
    z_image = dit_text.build_dit_clip("z_image").tokenizer
    assert text_encoders.mapping.tokenizer_parts(klein) == text_encoders.mapping.tokenizer_parts(z_image)
    assert "<think>" in klein.llama_template and "<think>" not in z_image.llama_template
    # another tokenizer with a qwen3_4b part (neither template): refused, naming the supported encoders
    from comfy import sd1_clip
    from comfy.text_encoders import z_image as z_image_te

    other = type("Clip", (), {"tokenizer": sd1_clip.SD1Tokenizer(name="qwen3_4b", tokenizer=z_image_te.Qwen3Tokenizer)})()
    with pytest.raises(text_encoders.UnsupportedEncoderError, match=r"qwen3_4b parts.*Z-Image \(Qwen3-4B\).*klein"):
        text_encoders.prompt_tokens(other, "a cat")


def test_long_prompt_is_one_sequence(comfy_host):
    dit_text.require_dit_clip("klein")
    clip = dit_text.build_dit_clip("klein")
    text = " ".join(f"word{i}" for i in range(300))  # > 512 tokens: no padding left
    pt = text_encoders.prompt_tokens(clip, text)
    assert len(pt.words) == 300 and pt.n_tokens == len(comfy_ids(clip, "klein", text)) > 512
    assert "<pad>" not in pt.token_strings
    pt.require_single_chunk("InstDiffEdit")
    assert pt.n_tokens == nodes.encode.encode(clip, text)[0][0].shape[1]


def test_a_template_that_hides_the_prompt_is_a_clear_error(comfy_host):
    dit_text.require_dit_clip("z_image")
    clip = dit_text.build_dit_clip("z_image")
    with pytest.raises(chat.TemplateError, match=r"no '\{\}' for the prompt.*a blue cat"):
        qwen3.qwen3_prompt_tokens(clip, "a blue cat", qwen3.Z_IMAGE, template="<|im_start|>user\nfixed<|im_end|>\n")
    # a node's own template with the prompt in it (TextEncodeZImageOmni passes one): positions follow it
    template = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    pt = qwen3.qwen3_prompt_tokens(clip, "a blue cat", qwen3.Z_IMAGE, template=template)
    ids = [int(t[0]) for chunk in clip.tokenize("a blue cat", llama_template=template)["qwen3_4b"] for t in chunk]
    assert pt.n_tokens == len(ids) and pt.word_list() == ["a", "blue", "cat"]
    hf = clip.tokenizer.qwen3_4b.tokenizer
    assert hf.decode([ids[p] for p in pt.positions("blue")]).strip() == "blue"


def test_words_a_template_cut_drops_are_a_clear_error():
    """The shared template-cut code (Qwen-Image cuts its system turn off): a word of the prompt's
    own stretch that falls before the cut is named, unless the user wrote the template."""
    names = [["a", 1.0], ["cat", 1.0]]
    owners = [None, 0, None, 1]
    with pytest.raises(chat.TemplateError, match=r"\['a'\]"):
        chat.words_after_cut(names, owners, [0, 1], 2, "a cat", "Qwen")
    assert [w.text for w in chat.words_after_cut(names, owners, [0, 1], 2, "a cat", "Qwen", strict=False)] == ["cat"]

