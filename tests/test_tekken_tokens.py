"""Word positions on Flux.2 [dev]'s Mistral-Small-3.1 (ComfyUI's Flux2Tokenizer, part
mistral3_24b) with a real tekken file (mistral-common's tekken_240911.json, as a checkpoint
carries it) and a tiny random-weight encoder from ComfyUI's own classes (ae_testlib.dit_text);
then recorded through a Flux.2 model: the template, the left padding and the words line up."""
import pytest
import torch

from ae_testlib import dit_host, dit_plant, dit_text, host
from ae_testlib.pack import pack_module

pytestmark = host.requires("flux2")

tokens = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
nodes = pack_module("nodes")

PROMPTS = ["a photo of a cat", "a (red:1.3) Shiba, dog \\(x\\) next to a red axolotl",
           "tiny   spaced\twords and multi-piece axolotls, Zürich café 42!"]


@pytest.fixture(scope="module")
def clip(comfy_host):
    dit_text.require_dit_clip("flux2")
    return dit_text.build_dit_clip("flux2")


def axis_ids(clip, text):
    return [int(t[0]) for chunk in clip.tokenize(text)["mistral3_24b"] for t in chunk]


@pytest.mark.parametrize("text", PROMPTS)
def test_each_word_sits_on_its_own_tokens(clip, text):
    pt = text_encoders.prompt_tokens(clip, text)
    assert text_encoders.encoder_family(clip) == "flux2"
    axis = axis_ids(clip, text)
    assert pt.n_tokens == len(axis) == len(pt.token_strings)
    assert axis[0] == 1 and pt.token_strings[0] == "<s>"  # ComfyUI's start token
    hf = clip.tokenizer.mistral3_24b.tokenizer
    seen = []
    for word in pt.words:
        assert hf.decode([axis[p] for p in word.positions]).split() == word.text.split()
        seen += word.positions
    assert len(seen) == len(set(seen))
    # ComfyUI does not parse weights here (disable_weights): "(red:1.3)" is text, its words stay whole
    assert [w.text for w in pt.words] == text.replace("\\(", "(").replace("\\)", ")").split()
    # the template before and after: the system prompt, [INST] ... [/INST]
    first, last = min(seen), max(seen)
    assert pt.token_strings[first - 1] == "[INST]" and pt.token_strings[last + 1] == "[/INST]"
    assert pt.end_positions == (last + 1,) and last + 2 == pt.n_tokens
    assert "[SYSTEM_PROMPT]" in pt.token_strings[:first]


def test_encode_node_equals_clip_text_encode(clip):
    for text in PROMPTS[:2]:
        for cond, options in dit_text.encode_like_clip_text_encode(clip, text):
            assert options[tokens.ANNOTATION_KEY].n_tokens == cond.shape[1]


@pytest.mark.parametrize("marker", ["[INST]", "[/INST]", "[SYSTEM_PROMPT]"])
def test_a_template_token_in_the_prompt_is_a_clear_error(clip, marker):
    with pytest.raises(ValueError, match=rf"contains '{__import__('re').escape(marker)}'.*control tokens"):
        text_encoders.prompt_tokens(clip, f"a cat {marker} on grass")


def test_a_template_without_the_prompt_slot_is_a_clear_error(clip):
    reader = pack_module("attention.text_encoders.tekken")
    with pytest.raises(ValueError, match="has no '{}' for the prompt, so it hides every word"):
        reader.tekken_prompt_tokens(clip, "a cat", template="[INST]no prompt here[/INST]")


def test_recorded_words_after_the_left_padding(clip):
    """The encoded prompt (about 40 tokens) is left-padded to 512 by model_base.Flux2: a word
    planted on its annotated position comes back under that word, in a batch of 2 with a
    different region per image, and the maps are the prompt's columns only."""
    record = pack_module("samplers.record")
    text = "a photo of a small cat sitting on the green grass"
    with torch.inference_mode():
        positive = nodes.encode.AttentionTextEncode().run(clip, text)[0]
        negative = nodes.encode.AttentionTextEncode().run(clip, "")[0]
    annotated = positive[0][1][tokens.ANNOTATION_KEY]
    cat = next(w for w in annotated.words if w.text == "cat").positions
    model = dit_host.build("flux", seed=1, variant="flux2", context_dim=positive[0][0].shape[-1])
    grid = (10, 14)
    regions = torch.stack([dit_plant.region_mask(grid, slice(1, 6), slice(2, 8)),
                           dit_plant.region_mask(grid, slice(4, 9), slice(7, 13))])
    planted = dit_plant.plant(model, regions, list(cat), beta=8.0)
    latent = {"samples": torch.zeros(2, 128, *grid)}
    with torch.inference_mode():
        _, maps = record.sample_recording(planted, 1, 2, 1.0, "euler", "normal", positive, negative, latent)
    assert maps.probs.shape == (2, *grid, annotated.n_tokens)
    mask = nodes.record.AttentionMask().run(maps, "cat", 0.5, 0.5, "union")[0]
    for b in range(2):
        expected = regions[b].repeat_interleave(16, 0).repeat_interleave(16, 1)
        assert dit_plant.iou(mask[b] > 0.5, expected) >= 0.9
    other = nodes.record.AttentionMask().run(maps, "grass", 0.5, 0.5, "union")[0]
    assert dit_plant.iou(other[0] > 0.5, regions[0].repeat_interleave(16, 0).repeat_interleave(16, 1)) < 0.5
