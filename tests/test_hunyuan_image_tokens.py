"""Word positions of HunyuanImage 2.1's text encoder on the real host: a tiny Qwen2.5-VL (hidden
layer -3) and a tiny byT5 built through ComfyUI's own HunyuanImage classes with the tokenizers
ComfyUI ships. Attention Text Encode gives CLIP Text Encode's CONDITIONING bit for bit (byT5
glyph cond included) plus positions: Qwen2.5-VL tokens after HunyuanImage's template cut, then the
quoted glyph text's byT5 tokens; a template that hides words is a clear error."""
import pytest

from ae_testlib import dit_text, host
from ae_testlib.pack import pack_module

pytestmark = host.requires("hunyuan_image")
text_encoders = pack_module("attention.text_encoders")
encode = pack_module("nodes.encode")
tokens_mod = pack_module("attention.tokens")


@pytest.fixture(scope="module")
def clip(comfy_host):
    return dit_text.build_dit_clip("hunyuan_image")


@pytest.mark.parametrize("text", ['a cat on grass', 'a red sign that says "OPEN NOW" on a wall',
                                  'a (red:1.3) poster, “春节快乐” and "SALE" in gold letters',
                                  'a shop with ‘Café’ above the door'])
def test_attention_text_encode_is_clip_text_encode_plus_positions(clip, text):
    ours = dit_text.encode_like_clip_text_encode(clip, text)
    tokens = tokens_mod.annotation_of(ours)
    cond, options = ours[0]
    byt5 = options.get("conditioning_byt5small")
    assert tokens.n_tokens == cond.shape[1] + (0 if byt5 is None else byt5.shape[1])
    assert tokens.encoder == text_encoders.ENCODERS["hunyuan_image"].name
    qwen_stop = tokens.part("Qwen2.5-VL")[1]
    assert qwen_stop == cond.shape[1] and tokens.token_strings[qwen_stop - 1] == "<|im_end|>"
    assert (byt5 is not None) == ('"' in text or "“" in text or "‘" in text)


def test_words_sit_where_their_tokens_are(clip):
    tokens = text_encoders.prompt_tokens(clip, 'a red sign that says "OPEN NOW" on a wall')
    strings = tokens.token_strings
    assert [strings[p] for p in tokens.positions("red")] == ["Ġred"]
    assert tokens.positions("a")[0] == 0  # the template prefix (system prompt, 'user' '\n') is cut
    start, stop = tokens.part("byT5")
    assert start == tokens.part("Qwen2.5-VL")[1] and stop == tokens.n_tokens
    # a quoted word: its Qwen2.5-VL tokens and its bytes in the byT5 glyph text 'Text "OPEN NOW". '
    qwen, glyph = [p for p in tokens.positions("OPEN") if p < start], [p for p in tokens.positions("OPEN") if p >= start]
    assert "".join(strings[p] for p in glyph) == "OPEN" and len(qwen) >= 1
    assert "".join(strings[p] for p in tokens.positions("NOW") if p >= start) == "NOW"
    assert strings[start:start + 6] == list('Text "') and strings[-1] == "<end>"
    assert tokens.end_positions == (start - 1, stop - 1)


def test_multibyte_glyph_words_take_their_bytes(clip):
    tokens = text_encoders.prompt_tokens(clip, 'a lantern with “春节” on it')
    start = tokens.part("byT5")[0]
    glyph = [p for p in tokens.positions("春节") if p >= start]
    assert len(glyph) == len("春节".encode("utf-8")) == 6


def test_a_template_that_hides_words_is_a_clear_error(clip):
    # a prompt that starts with '<' is cut at 36 tokens by HunyuanImage's encoder (its refiner's template)
    text = "<|start_header_id|>system a cat sitting on green grass under a big blue sky with white clouds " * 2
    with pytest.raises(ValueError, match="drops the start of the encoded sequence.*'cat'"):
        text_encoders.prompt_tokens(clip, text)


def test_qwen_image_encoder_is_not_taken_for_hunyuan(clip):
    assert text_encoders.encoder_family(clip) == "hunyuan_image"
    assert text_encoders.encoder_family(dit_text.build_dit_clip("qwen_image")) == "qwen_image"


def test_a_long_prompt_keeps_every_word(clip):
    """Neither part has a length limit in ComfyUI (no truncation, no chunks): a 400-word prompt with
    quoted text keeps every word, the last ones included, on the conditioning's token axis."""
    text = " ".join(f"word{i}" for i in range(400)) + ' and a sign "LAST ONE"'
    ours = encode.AttentionTextEncode().run(clip, text)[0]
    tokens = tokens_mod.annotation_of(ours)
    cond, options = ours[0]
    assert tokens.n_tokens == cond.shape[1] + options["conditioning_byt5small"].shape[1]
    assert tokens.positions("word399") and max(tokens.positions("ONE")) == tokens.n_tokens - 5  # then '". ' and </s>


def test_an_encoder_without_byt5_has_no_glyph_part():
    """The single CLIPLoader (type hunyuan_image) builds the encoder without byT5: quoted text then
    has no byT5 cond and no glyph positions, and Attention Text Encode still equals CLIP Text Encode."""
    clip = dit_text.build_dit_clip("hunyuan_image_qwen_only")
    text = 'a red sign that says "OPEN NOW" on a wall'
    ours = dit_text.encode_like_clip_text_encode(clip, text)
    tokens = tokens_mod.annotation_of(ours)
    assert "conditioning_byt5small" not in ours[0][1]
    assert tokens.n_tokens == ours[0][0].shape[1] and [p[0] for p in tokens.parts] == ["Qwen2.5-VL"]
    assert tokens.positions("NOW")
