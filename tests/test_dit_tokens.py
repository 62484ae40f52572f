"""Word <-> token positions on the DiT text encoders (Flux / Kontext and Chroma T5, SD3's CLIP-L/G +
T5, Qwen-Image's Qwen2.5-VL, Qwen-Image-Edit's vision tokens), on tiny random-weight encoders built
from ComfyUI's own classes with the tokenizers ComfyUI ships (ae_testlib.dit_text)."""
import pytest
import torch

from ae_testlib import dit_text, registry
from ae_testlib.pack import pack_module

tokens = pack_module("attention.tokens")
text_encoders = pack_module("attention.text_encoders")
mapping = pack_module("attention.text_encoders.mapping")
nodes = pack_module("nodes")

WEIGHTED = "a (red:1.3) Shiba, dog \\(x\\) next to a red axolotl"
PROMPTS = ["a photo of a cat", WEIGHTED, "a red car next to a red house, (blue sky:0.8)!",
           "tiny   spaced\twords and multi-piece axolotls"]
CONTROL = {"<start>", "<end>", "<pad>"}


@pytest.fixture(params=dit_text.FAMILIES)
def family(request, comfy_host):
    dit_text.require_dit_clip(request.param)
    return request.param


def clip_of(family):
    return dit_text.build_dit_clip(family)


def conditioning_axis_ids(clip, family, text):
    """ComfyUI's token ids in the order of the conditioning's token axis, from clip.tokenize and
    what each family's encoder is known to do with them (design.md "Tokens")."""
    tokenized = clip.tokenize(text)
    ids = lambda key: [int(t[0]) for chunk in tokenized[key] for t in chunk]  # noqa: E731
    if family in ("flux", "chroma"):
        return ids("t5xxl")
    if family == "wan":
        return ids("umt5xxl")
    if family == "sd3":
        return ids("l") + ids("t5xxl")
    # Qwen-Image, HunyuanImage (no quoted text here: no byT5 part): the prefix up to the user
    # turn's "<|im_start|>user\n" is cut off
    full = ids("qwen25_7b")
    starts = [i for i in range(len(full) - 2) if full[i:i + 3] == [151644, 872, 198]]
    return full[starts[0] + 3:]


@pytest.mark.parametrize("text", PROMPTS)
def test_each_word_sits_on_its_own_tokens(family, text):
    clip = clip_of(family)
    pt = text_encoders.prompt_tokens(clip, text)
    axis = conditioning_axis_ids(clip, family, text)
    assert pt.n_tokens == len(axis) == len(pt.token_strings)
    clip_stop = pt.part("CLIP-L/G")[1] if family == "sd3" else 0
    seen = []
    for word in pt.words:
        assert list(word.positions) == sorted(word.positions)
        groups = [[p for p in word.positions if p < clip_stop], [p for p in word.positions if p >= clip_stop]]
        for in_clip, group in zip((True, False), groups):
            if family == "sd3":
                assert group, f"{word.text!r} has no tokens in the {'CLIP' if in_clip else 'T5'} part"
            if not group:
                continue
            hf = (clip.tokenizer.clip_l.tokenizer if in_clip else
                  clip.tokenizer.qwen25_7b.tokenizer if family in ("qwen_image", "hunyuan_image") else
                  clip.tokenizer.clip_umt5xxl.tokenizer.tokenizer if family == "wan" else  # the SentencePiece model
                  (clip.tokenizer.clip_t5xxl if family == "chroma" else clip.tokenizer.t5xxl).tokenizer)
            got = hf.decode([axis[p] for p in group])
            if in_clip:  # CLIP lower-cases and ends each token with a space
                assert "".join(got.split()) == "".join(word.text.lower().split())
            else:  # T5 and Qwen decode white space as single spaces
                assert got.split() == word.text.split()
        seen += word.positions
    assert len(seen) == len(set(seen)), "a token belongs to two words"
    # every token that is not a word's is a control or template token
    other_positions = [p for p in range(pt.n_tokens) if p not in set(seen)]
    others = [pt.token_strings[p] for p in other_positions]
    if family in ("qwen_image", "hunyuan_image"):  # the closing template; between words only whitespace
        closing = ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"] if family == "qwen_image" else ["<|im_end|>"]
        assert others[-len(closing):] == closing
        qwen = clip.tokenizer.qwen25_7b.tokenizer
        assert all(qwen.decode([axis[p]]).isspace() for p in other_positions[:-len(closing)])
        assert pt.words[0].positions[0] == 0  # the template prefix is not on the axis
    elif family == "wan":  # SentencePiece keeps white space as pieces ('▁▁', a tab's '<0x09>')
        assert all(s in CONTROL or mapping.SentencePieceOffsets.is_space(s) for s in others), others
    else:
        assert set(others) <= CONTROL, others


def test_weighted_words_are_the_rows_the_weight_changes(family):
    """Where the conditioning differs between 'a (red:1.5) car' and 'a red car' is exactly where
    `red` sits: positions index the conditioning's token axis (both parts for SD3)."""
    clip = clip_of(family)
    # the Pile T5 SentencePiece model standing in for umT5's keeps a weight segment's trailing
    # space as a token: compare with the same segments at weight 1
    plain_text = "a photo of a (red:1.0) car" if family == "wan" else "a photo of a red car"
    plain = nodes.encode.encode(clip, plain_text)[0][0]
    weighted_text = "a photo of a (red:1.5) car"
    weighted = nodes.encode.encode(clip, weighted_text)[0][0]
    pt = text_encoders.prompt_tokens(clip, weighted_text)
    if family in ("qwen_image", "hunyuan_image"):
        # ComfyUI passes Qwen prompts as text: '(red:1.5)' is a word. The conditioning is the
        # encoder's output without the template prefix: its rows are the last n_tokens.
        assert pt.word_list()[4] == "(red:1.5)" and pt.words[4].weight == 1.0
        with torch.inference_mode():
            full = clip.cond_stage_model.qwen25_7b.encode_token_weights(
                clip.tokenize(weighted_text)["qwen25_7b"])[0]
        assert full.shape[1] > pt.n_tokens and torch.equal(weighted, full[:, -pt.n_tokens:])
        return
    changed = torch.nonzero((plain != weighted).any(-1)[0]).flatten().tolist()
    assert [w.weight for w in pt.words] == [1.0, 1.0, 1.0, 1.0, 1.5, 1.0]
    assert changed == pt.positions("red")
    if family == "sd3":
        clip_stop = pt.part("CLIP-L/G")[1]
        assert min(changed) < clip_stop <= max(changed)  # in the CLIP part and in the T5 part


def test_encode_node_equals_clip_text_encode(family):
    clip = clip_of(family)
    for text in (WEIGHTED, "a cat"):
        for cond, options in dit_text.encode_like_clip_text_encode(clip, text):
            assert options[tokens.ANNOTATION_KEY].n_tokens == cond.shape[1]


def test_repeated_words_and_layout_facts(family):
    clip = clip_of(family)
    pt = text_encoders.prompt_tokens(clip, "a red car next to a red house")
    first, second = pt.occurrences("red")
    assert pt.positions("red") == sorted(first + second) and first < second
    if family == "flux":
        assert pt.n_tokens == 256 and pt.token_strings[:3] == ["▁", "a", "▁red"]  # no BOS; '▁' 'a'
        assert pt.token_strings[pt.end_positions[0]] == "<end>" and pt.token_strings[-1] == "<pad>"
    if family == "chroma":
        assert pt.n_tokens == pt.end_positions[0] + 1  # no padding
    if family == "sd3":
        assert pt.parts == (("CLIP-L/G", 0, 77), ("T5-XXL", 77, 154))
        assert pt.token_strings[0] == "<start>" and pt.token_strings[77] == "▁"
    if family == "qwen_image":
        assert pt.token_strings[:3] == ["a", "Ġred", "Ġcar"]
    with pytest.raises(tokens.PromptWordError, match="'house'"):
        pt.positions("cat")


@pytest.mark.parametrize("family_name", ["flux", "chroma", "sd3", "qwen_image"])
def test_long_prompts_are_one_sequence_except_sd3_clip_part(family_name, comfy_host):
    dit_text.require_dit_clip(family_name)
    clip = clip_of(family_name)
    text = " ".join(f"word{i}" for i in range(60))  # 60 words, > 77 tokens on every tokenizer
    pt = text_encoders.prompt_tokens(clip, text)
    assert len(pt.words) == 60
    last = pt.positions("word59")
    if family_name == "sd3":
        clip_stop = pt.part("CLIP-L/G")[1]
        assert pt.n_chunks == clip_stop // 77 == 3
        assert pt.n_tokens == len(conditioning_axis_ids(clip, family_name, text))  # 3 CLIP chunks + T5
        assert last[0] > 154 and last[-1] > clip_stop  # third CLIP chunk, and in the T5 part
        with pytest.raises(tokens.PromptLengthError, match="SD3 / SD3.5.*CLIP-L/G part"):
            pt.require_single_chunk("InstDiffEdit")
    else:
        assert pt.n_chunks == 1
        pt.require_single_chunk("InstDiffEdit")  # T5 / Qwen2.5-VL take the prompt in one sequence
        assert pt.content_token_count > 77
        assert pt.n_tokens == len(conditioning_axis_ids(clip, family_name, text))


def test_qwen_prompt_with_its_own_template(comfy_host):
    """A prompt that starts with '<|im_start|>' is its own template: ComfyUI adds none and cuts the
    same prefix; the user turn's words are the ones left on the axis."""
    dit_text.require_dit_clip("qwen_image")
    clip = clip_of("qwen_image")
    text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na blue cat<|im_end|>\n"
    pt = text_encoders.prompt_tokens(clip, text)
    assert pt.n_tokens == nodes.encode.encode(clip, text)[0][0].shape[1]
    assert pt.positions("blue") == [1] and pt.token_strings[:3] == ["a", "Ġblue", "Ġcat"]


def test_qwen_image_edit_layout_with_a_reference_image(comfy_host):
    dit_text.require_dit_clip("qwen_image")
    clip = clip_of("qwen_image")
    # ~1 megapixel, so the node's rescale to 1 MP keeps the image as it is (and ComfyUI's own
    # accounting below sees the same image); an odd aspect ratio
    image = torch.rand(1, 768, 1365, 3, generator=torch.Generator().manual_seed(0))
    text = "make the cat (red:1.2)"
    with torch.inference_mode():
        ours = nodes.encode.AttentionTextEncodeQwenImageEdit().run(clip, text, image=image)[0]
        theirs = registry.core_nodes()["TextEncodeQwenImageEdit"].execute(clip, text, image=image)[0]
    assert torch.equal(ours[0][0], theirs[0][0])
    pt = tokens.tokens_of(ours)
    # ComfyUI's own accounting of the vision embeddings (where they go, how many)
    tokenized = clip.tokenize(text, images=[image])["qwen25_7b"]
    encoder = clip.cond_stage_model.qwen25_7b
    with torch.inference_mode():
        info = encoder.process_tokens([[t[0] for t in chunk] for chunk in tokenized], torch.device("cpu"))[3]
    (image_info,) = info
    cut = [int(t[0]) if not isinstance(t[0], dict) else -1 for t in tokenized[0]].index(-1) - 1
    start, stop = pt.part("vision")
    assert (start, stop - start) == (image_info["index"] - cut, image_info["size"]) == (1, stop - 1)
    assert pt.token_strings[0] == "<|vision_start|>" and pt.token_strings[stop] == "<|vision_end|>"
    assert pt.words[0].positions == (stop + 1,)  # 1 + N + 1
    assert pt.n_tokens == ours[0][0].shape[1] and image_info["size"] > 1
    assert pt.word_list() == ["make", "the", "cat", "(red:1.2)"]
    # without an image it is Qwen-Image's plain layout, equal to Attention Text Encode
    with torch.inference_mode():
        no_image = nodes.encode.AttentionTextEncodeQwenImageEdit().run(clip, text)[0]
        plain = nodes.encode.AttentionTextEncode().run(clip, text)[0]
    assert torch.equal(no_image[0][0], plain[0][0])
    assert tokens.tokens_of(no_image).token_strings == tokens.tokens_of(plain).token_strings


def test_qwen_image_edit_node_refuses_other_encoders(comfy_host):
    dit_text.require_dit_clip("flux")
    with pytest.raises(mapping.UnsupportedEncoderError, match="Qwen-Image's text encoder"):
        nodes.encode.AttentionTextEncodeQwenImageEdit().run(clip_of("flux"), "a cat")


def test_unsupported_encoder_names_the_supported_ones(comfy_host):
    dit_text.require_dit_clip("stable_audio")  # Stable Audio's T5-base: a text encoder the pack does not map
    clip = dit_text.build_unsupported_clip()
    with pytest.raises(mapping.UnsupportedEncoderError,
                       match=r"SAT5Tokenizer with clip_t5base parts.*SDXL.*Flux.*SD3.*Chroma.*Qwen-Image"):
        nodes.encode.AttentionTextEncode().run(clip, "a cat")


def test_a_word_split_differently_is_a_clear_error(comfy_host):
    """The mapping checks its tokens against ComfyUI's: tokens of another prompt, or a token that
    reaches past a word, name the word instead of giving wrong positions."""
    dit_text.require_dit_clip("flux")
    sd_tokenizer = clip_of("flux").tokenizer.t5xxl
    names = []
    ids, owners = mapping.map_pieces(sd_tokenizer, mapping.weighted_pieces("a red hat"), names, "Flux")
    comfy_ids = [int(t[0]) for t in clip_of("flux").tokenize("a red cat")["t5xxl"][0]][:len(ids)]
    with pytest.raises(mapping.TokenAlignmentError, match="Flux: could not align 'hat'.*split it differently"):
        mapping.check_ids(ids, comfy_ids, owners, names, "a red hat", "Flux")
    with pytest.raises(mapping.TokenAlignmentError, match="does not fit in one word"):
        mapping.map_pieces(sd_tokenizer, [mapping.Piece("shiba", words_to=2)], [], "Flux")


def test_a_word_only_one_sd3_encoder_keeps(comfy_host):
    """CLIP and T5 each drop some invisible characters (which ones depends on the tokenizer
    versions): on SD3 such a word has the other part's positions only, and the words after it
    stay matched."""
    dit_text.require_dit_clip("sd3")
    clip = clip_of("sd3")
    text = "a \u200b cat \xad dog"
    pt = text_encoders.prompt_tokens(clip, text)
    clip_stop = pt.part("CLIP-L/G")[1]
    axis = conditioning_axis_ids(clip, "sd3", text)
    one_part = 0
    for word in pt.words:
        in_clip = [axis[p] for p in word.positions if p < clip_stop]
        in_t5 = [axis[p] for p in word.positions if p >= clip_stop]
        assert in_clip == clip.tokenizer.clip_l.tokenizer(word.text)["input_ids"][1:-1]
        assert in_t5 == clip.tokenizer.t5xxl.tokenizer(word.text)["input_ids"][:-1]
        one_part += not (in_clip and in_t5)
    assert one_part >= 1 and {"a", "cat", "dog"} <= set(pt.word_list())


@pytest.mark.parametrize("sizes", [[(400, 720)], [(400, 720), (512, 256)], [(400, 720), (512, 256), (300, 300)]],
                         ids=["1-image", "2-images", "3-images"])
def test_qwen_image_edit_plus_layout_with_several_images(comfy_host, sizes):
    """Attention Text Encode (Qwen-Image-Edit Plus) equals TextEncodeQwenImageEditPlus bit for bit
    with 1, 2 and 3 images of different sizes; each image's vision tokens sit where ComfyUI's own
    accounting puts them, and the words follow the last image's "<|vision_end|>"."""
    dit_text.require_dit_clip("qwen_image")
    clip = clip_of("qwen_image")
    generator = torch.Generator().manual_seed(0)
    images = {f"image{i + 1}": torch.rand(1, h, w, 3, generator=generator) for i, (h, w) in enumerate(sizes)}
    text = "make the cat (red:1.2)"
    transformer = clip.cond_stage_model.qwen25_7b.transformer
    preprocess, sizes_seen = transformer.preprocess_embed, []

    def spy(embed, device):  # ComfyUI's own count of each image's vision embeddings
        out = preprocess(embed, device)
        sizes_seen.append(out[0].shape[-2])
        return out

    with torch.inference_mode():
        ours = nodes.encode.AttentionTextEncodeQwenImageEditPlus().run(clip, text, **images)[0]
        transformer.preprocess_embed = spy
        try:
            theirs = registry.core_nodes()["TextEncodeQwenImageEditPlus"].execute(clip, text, **images)[0]
        finally:
            del transformer.preprocess_embed
    assert torch.equal(ours[0][0], theirs[0][0])
    pt = tokens.tokens_of(ours)
    assert pt.n_tokens == ours[0][0].shape[1] and pt.word_list() == ["make", "the", "cat", "(red:1.2)"]
    vision = [(start, stop) for kind, start, stop in pt.parts if kind == "vision"]
    assert len(vision) == len(sizes) and len({stop - start for start, stop in vision}) == len(sizes)
    for start, stop in vision:
        assert pt.token_strings[start - 1] == "<|vision_start|>" and pt.token_strings[stop] == "<|vision_end|>"
    assert pt.token_strings[0] == "Picture" and pt.words[0].positions == (vision[-1][1] + 1,)
    assert [stop - start for start, stop in vision] == sizes_seen
