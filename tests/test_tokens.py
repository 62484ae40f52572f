"""Word <-> token mapping on ComfyUI's real tokenizers (SD1 CLIP-L, SDXL CLIP-L/G, SD2 CLIP-H)."""
import pytest

from ae_testlib import fixtures
from ae_testlib.pack import pack_module

tokens = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
clip_encoder = pack_module("attention.text_encoders.clip")


@pytest.fixture(params=["sd15", "sdxl", "sd2"])
def clip(request, comfy_host):
    return fixtures.clip(request.param)


def test_words_sub_tokens_weights_and_escapes(clip):
    pt = text_encoders.prompt_tokens(clip, "a (red:1.2) Shiba, dog \\(x\\) axolotl")
    assert pt.word_list() == ["a", "red", "Shiba,", "dog", "(x)", "axolotl"]
    assert pt.token_strings[:3] == ["<start>", "a</w>", "red</w>"]
    assert pt.positions("shiba") == [3, 4, 5]  # shi + ba + ','
    assert pt.positions("SHIBA,") == [3, 4, 5]
    assert pt.positions("axolotl") == [10, 11, 12, 13]  # ax + o + lot + l
    assert pt.positions("red shiba") == [2, 3, 4, 5]
    assert pt.positions("(x)") == [7, 8, 9]
    assert [w.weight for w in pt.words][:2] == [1.0, 1.2]
    assert pt.end_positions == (14,) and pt.token_strings[14] == "<end>"
    assert pt.n_tokens == 77 and pt.n_chunks == 1


def test_positions_match_comfy_token_ids(clip):
    key, sd_tokenizer = clip_encoder.primary_tokenizer(clip)
    text = "a cat sitting next to a (tabby cat:0.8) on a sofa"
    pt = text_encoders.prompt_tokens(clip, text)
    ids = [t[0] for t in clip.tokenize(text)[key][0]]
    for word in pt.words:
        expected = sd_tokenizer.tokenizer(word.text)["input_ids"][1:-1]
        assert [ids[p] for p in word.positions] == expected


def test_repeated_word_gives_every_occurrence(clip):
    pt = text_encoders.prompt_tokens(clip, "a red car next to a red house")
    assert pt.occurrences("red") == [[2], [7]]
    assert pt.positions("red") == [2, 7]


def test_absent_word_is_a_clear_error(clip):
    pt = text_encoders.prompt_tokens(clip, "a photo of a dog")
    with pytest.raises(tokens.PromptWordError, match=r'"cat" is not a word of the prompt.*\'dog\''):
        pt.positions("cat")
    with pytest.raises(tokens.PromptWordError, match="empty"):
        pt.positions(" , ")
    # whole words only: "do" is not "dog"
    with pytest.raises(tokens.PromptWordError):
        pt.positions("do")


def test_long_prompt_positions_and_single_chunk_error(clip):
    text = " ".join(f"word{i}" for i in range(60))  # 'word', 'N' pieces: 170 tokens, 3 chunks
    pt = text_encoders.prompt_tokens(clip, text)
    assert pt.n_chunks == 3 and pt.n_tokens == 231
    assert pt.content_token_count == 170
    last = pt.positions("word59")
    assert all(pt.token_strings[p] not in ("<start>", "<end>", "<pad>") for p in last)
    assert last[0] > 154  # in the third chunk
    pt.require_single_chunk("ok")  if pt.n_chunks == 1 else None
    with pytest.raises(tokens.PromptLengthError, match="170 content tokens"):
        pt.require_single_chunk("InstDiffEdit")
    text_encoders.prompt_tokens(clip, "a short prompt").require_single_chunk("InstDiffEdit")


def test_annotation_and_missing_annotation_error(comfy_host):
    cond = fixtures.encode("sd15", "a photo of a cat")
    assert tokens.tokens_of(cond).positions("cat") == [5]
    plain = [[cond[0][0], {"pooled_output": cond[0][1]["pooled_output"]}]]
    with pytest.raises(ValueError, match="Attention Text Encode"):
        tokens.tokens_of(plain, "positive")


def test_combined_different_prompts_have_no_single_word_layout(comfy_host):
    cat, dog = fixtures.encode("sd15", "a photo of a cat"), fixtures.encode("sd15", "a photo of a dog")
    assert tokens.annotation_of(cat + cat).positions("cat") == [5]  # the same prompt twice is fine
    assert tokens.annotation_of(cat + dog) is None
    with pytest.raises(ValueError, match="Conditioning Combine"):
        tokens.tokens_of(cat + dog)
