"""DiT recording on the real ComfyUI host: tiny random-weight Flux / Chroma / SD3 / Qwen-Image models
from ComfyUI's classes, sampled with comfy.sample. Maps equal a brute force from the full attention
matrix, outputs are bit-identical to plain sampling, other patches keep working."""
import pytest
import torch

from ae_testlib import dit_host
from ae_testlib.pack import pack_module

record = pack_module("samplers.record")
common = pack_module("samplers.common")
kernel = pack_module("attention.dit_kernel")
families = pack_module("attention.families")
tokens_mod = pack_module("attention.tokens")

STEPS = 2
CFG = 2.0
ALL_BLOCKS = {"flux": "double all, single all", "chroma": "double all, single all", "sd3": "all", "qwen": "all"}
N_TOKENS = 7


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def plain(model, positive, negative, latent, cfg=CFG, steps=STEPS):
    sigmas = common.schedule(model, steps, "euler", "normal", 1.0)
    with torch.inference_mode():
        return common.ksample(model, 1, steps, cfg, "euler", "normal", positive, negative, latent, sigmas)["samples"]


def recording(model, positive, negative, latent, cfg=CFG, steps=STEPS, **kwargs):
    with torch.inference_mode():
        out, maps = record.sample_recording(model, 1, steps, cfg, "euler", "normal", positive, negative, latent,
                                            **kwargs)
    return out["samples"], maps


class SpyOverride:
    """An attention override already on the model (like an attention-backend node): keeps every
    call's q, k, mask and batch layout, and optionally changes the output."""

    def __init__(self, v_scale=1.0):
        self.calls = []
        self.v_scale = v_scale

    def __call__(self, func, *args, **kwargs):
        call = kernel.bind_attention_args(args, kwargs)
        q, k, v, mask = kernel.heads_first(call)
        options = kwargs.get("transformer_options") or {}
        self.calls.append((q.double(), k.double(), None if mask is None else mask.double(),
                           list(options.get("cond_or_uncond", [0]))))
        if self.v_scale != 1.0:
            args = (args[0], args[1], args[2] * self.v_scale) + tuple(args[3:])
        return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        return self


def with_override(model, override):
    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    options["optimized_attention_override"] = override
    return patched


def scaled_logits(q, k, mask=None):
    """q k^T / sqrt(d) (+ the attention mask): what the brute forces softmax, in float64."""
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return logits if mask is None else logits + mask


def branch_parts(probs, chunks, branch):
    """The rows of `probs` ([B, ...], B = chunks x rows per chunk) in `branch`'s cond_or_uncond chunks."""
    per_chunk = probs.shape[0] // len(chunks)
    return [probs[index * per_chunk:(index + 1) * per_chunk] for index, kind in enumerate(chunks) if kind == branch]


def brute_force(calls, n_txt, n_img, branch=0, normalise="joint"):
    """Mean over calls and branch chunks of the full softmax's image->text block, float64."""
    parts = []
    for q, k, mask, chunks in calls:
        if q.shape[2] < n_txt + n_img:
            continue  # image-only attention
        logits = scaled_logits(q, k, mask)
        if normalise == "text":
            logits = logits[..., :n_txt]
        probs = logits.softmax(-1)[:, :, n_txt:n_txt + n_img, :n_txt].mean(1)
        parts += branch_parts(probs, chunks, branch)
    return sum(parts) / len(parts)


CASES = [  # family, batch, latent h, w, reference latent
    ("flux", 1, 6, 10, False), ("flux", 2, 5, 9, True), ("chroma", 2, 7, 6, False),
    ("sd3", 1, 6, 10, False), ("sd3", 2, 5, 9, False), ("qwen", 1, 6, 10, False), ("qwen", 2, 5, 9, True),
]


@pytest.mark.parametrize("normalise", ["joint", "text"])
@pytest.mark.parametrize("family,batch,height,width,reference", CASES,
                         ids=[f"{c[0]}-b{c[1]}-{c[2]}x{c[3]}{'-ref' if c[4] else ''}" for c in CASES])
def test_maps_equal_brute_force_and_output_unchanged(family, batch, height, width, reference, normalise):
    model = dit_host.model(family)
    reference_shape = (1, 16, 1, 4, 6) if family == "qwen" else (1, 16, 4, 6)  # Qwen latents have a frame axis
    options = {"reference_latents": [torch.randn(reference_shape)]} if reference else {}
    positive = dit_host.conditioning(N_TOKENS, seed=1, batch=1, **options)
    negative = dit_host.conditioning(N_TOKENS, seed=2, batch=1, **options)
    latent = dit_host.latent(family, batch, height, width)
    spy = SpyOverride()
    out, maps = recording(with_override(model, spy), positive, negative, latent, dit_blocks=ALL_BLOCKS[family],
                          normalise=normalise)
    grid = (-(-height // 2), -(-width // 2))
    expected = brute_force(spy.calls, N_TOKENS, grid[0] * grid[1], normalise=normalise)
    assert maps.probs.shape == (batch, *grid, N_TOKENS)
    assert maps.latent_hw == (height, width) and maps.level == 1
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    if normalise == "text":
        assert torch.allclose(maps.probs.sum(-1), torch.ones(()), atol=1e-5)
    else:  # the joint row leaves mass on image (and reference) keys
        assert float(maps.probs.sum(-1).max()) < 1
    assert torch.equal(out, plain(with_override(model, SpyOverride()), positive, negative, latent))


def pytorch_attention(monkeypatch):
    """ComfyUI with --use-pytorch-cross-attention: the DiT modules bound their kernel at import."""
    from comfy.ldm.flux import math as flux_math
    from comfy.ldm.modules import attention
    from comfy.ldm.modules.diffusionmodules import mmdit
    from comfy.ldm.qwen_image import model as qwen_model

    monkeypatch.setattr(flux_math, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(mmdit, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(qwen_model, "optimized_attention_masked", attention.attention_pytorch)


@pytest.mark.parametrize("normalise", ["text", "joint"])
@pytest.mark.parametrize("kernel_name", ["comfy default (sub-quadratic)", "pytorch"])
@pytest.mark.parametrize("family", dit_host.FAMILIES)
def test_output_bit_identical_to_plain_sampling(family, kernel_name, normalise, monkeypatch):
    if kernel_name == "pytorch":
        pytorch_attention(monkeypatch)
    recorder_mod = pack_module("attention.dit_recorder")
    fused_calls = []

    def counting_fused(call):
        fused_calls.append(1)
        return kernel.fused_attention(call)

    monkeypatch.setattr(recorder_mod, "fused_attention", counting_fused)
    model = dit_host.model(family)
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent(family, 2, 5, 9)
    out, maps = recording(model, positive, negative, latent, normalise=normalise)
    assert torch.equal(out, plain(model, positive, negative, latent))
    # joint rows on PyTorch attention: the recorded block (default: 1) ran the fused kernel itself
    assert len(fused_calls) == (STEPS if (kernel_name, normalise) == ("pytorch", "joint") else 0)
    assert maps.probs.isfinite().all() and float(maps.probs.sum()) > 0


def test_fused_and_beside_paths_record_the_same_maps(monkeypatch):
    model = dit_host.model("flux")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("flux", 1, 6, 10)
    _, beside = recording(model, positive, negative, latent, normalise="joint")
    pytorch_attention(monkeypatch)
    _, fused = recording(model, positive, negative, latent, normalise="joint")
    assert torch.allclose(beside.probs, fused.probs, atol=1e-6, rtol=0)


def _attention_pytorch():
    from comfy.ldm.modules import attention

    return attention.attention_pytorch


def test_boolean_mask_is_read_as_sdpa_reads_it():
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 12, 8, generator=generator) for _ in range(2))
    allowed = torch.rand(1, 12, 12, generator=generator) > 0.3
    allowed[..., 0] = True  # every row attends somewhere
    call = kernel.bind_attention_args((q, k, q, 2), {"skip_reshape": True, "mask": allowed})
    assert not kernel.fused_available(_attention_pytorch().__wrapped__, call)
    _, _, _, bias = kernel.heads_first(call)
    rows = slice(4, 12)
    probs = kernel.text_probabilities(q[:, :, rows], k[:, :, :4], kernel.logsumexp_rows(q, k, q, bias, rows),
                                      bias[..., rows, :4])
    logits = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~allowed[:, None], float("-inf"))
    assert torch.allclose(probs, logits.softmax(-1)[:, :, rows, :4].mean(1), atol=1e-6)


@pytest.mark.parametrize("form", ["flux", "flux-mask", "sd3", "qwen"])
def test_fused_kernel_is_what_comfy_pytorch_attention_runs(form):
    attention_pytorch = _attention_pytorch()
    generator = torch.Generator().manual_seed(0)
    batch, heads, length, dim = 2, 3, 40, 16
    randn = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    if form.startswith("flux"):
        q, k, v = (randn(batch, heads, length, dim) for _ in range(3))
        kwargs = {"skip_reshape": True, "mask": randn(batch, length, length) if form == "flux-mask" else None}
        args = (q, k, v, heads)
    elif form == "sd3":
        q, k = randn(batch, length, heads * dim), randn(batch, length, heads * dim)
        args, kwargs = (q, k, randn(batch, length, heads, dim)), {"heads": heads}
    else:
        args, kwargs = (randn(batch, length, heads * dim), randn(batch, length, heads * dim),
                        randn(batch, length, heads * dim), heads, None), {}
    call = kernel.bind_attention_args(args, kwargs)
    assert kernel.fused_available(attention_pytorch.__wrapped__, call)
    out, lse = kernel.fused_attention(call)
    assert torch.equal(out, attention_pytorch(*args, **kwargs))
    q, k, _, mask = kernel.heads_first(call)
    logits = q.double() @ k.double().transpose(-1, -2) * dim ** -0.5 + (0 if mask is None else mask.double())
    assert torch.allclose(lse.double(), logits.logsumexp(-1), atol=1e-5)
    rows = slice(5, 30)
    assert torch.allclose(kernel.logsumexp_rows(q, k, call["v"] if form != "sd3" else kernel.heads_first(call)[2],
                                                mask, rows).double(), logits.logsumexp(-1)[:, :, rows], atol=1e-5)


def test_cfg_one_records_the_positive_prompt_and_uncond_says_why():
    model = dit_host.model("flux")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("flux")
    spy = SpyOverride()
    _, maps = recording(with_override(model, spy), positive, negative, latent, cfg=1.0, normalise="joint")
    assert {tuple(c[3]) for c in spy.calls} == {(0,)}  # ComfyUI skipped the negative prompt
    default_blocks = families.default_blocks(families.family_of(model), model.model.diffusion_model)
    assert default_blocks == [("double_block", 1)]
    expected = brute_force(spy.calls[1::4], N_TOKENS, 15)  # double block 1 of each forward (2 double + 2 single)
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)
    with pytest.raises(RuntimeError, match="cfg is not 1.0"):
        recording(model, positive, negative, latent, cfg=1.0, branch="uncond")


def test_uncond_branch_with_cfg():
    model = dit_host.model("sd3")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("sd3")
    spy = SpyOverride()
    _, maps = recording(with_override(model, spy), positive, negative, latent, branch="uncond", dit_blocks="all")
    expected = brute_force(spy.calls, N_TOKENS, 15, branch=1, normalise="text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)


def test_existing_override_still_runs_and_shapes_the_output():
    model = dit_host.model("qwen")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("qwen")
    changed, reference = SpyOverride(v_scale=1.5), SpyOverride(v_scale=1.5)
    out, _ = recording(with_override(model, changed), positive, negative, latent)
    assert len(changed.calls) == STEPS * 2  # every attention call of 2 blocks still went through it
    assert torch.equal(out, plain(with_override(model, reference), positive, negative, latent))
    assert not torch.equal(out, plain(model, positive, negative, latent))


class BlockPatch:
    """A dit block patch already on the model (as other packs set): scales the block's image update."""

    def __init__(self):
        self.calls = 0

    def __call__(self, args, extra):
        self.calls += 1
        out = extra["original_block"](args)
        return {**out, "img": args["img"] + (out["img"] - args["img"]) * 1.25}

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_existing_block_patch_still_runs(family):
    model = dit_host.model(family)
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent(family)

    def patched(patch):
        clone = model.clone()
        clone.set_model_patch_replace(patch, "dit", "double_block", 1)
        return clone

    ours, theirs = BlockPatch(), BlockPatch()
    out, maps = recording(patched(ours), positive, negative, latent)  # default blocks include block 1
    assert ours.calls == STEPS and float(maps.probs.sum()) > 0
    assert torch.equal(out, plain(patched(theirs), positive, negative, latent))


def test_skip_layer_guidance_extra_pass_is_not_recorded():
    import comfy_extras.nodes_slg as slg

    model = dit_host.model("sd3")
    result = slg.SkipLayerGuidanceDiT.execute(model, scale=3.0, start_percent=0.0, end_percent=1.0,
                                              double_layers="0")
    slg_model = result.result[0] if hasattr(result, "result") else result[0]
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    latent = dit_host.latent("sd3")
    spy, reference = SpyOverride(), SpyOverride()
    out, maps = recording(with_override(slg_model, spy), positive, negative, latent, dit_blocks="all")
    assert torch.equal(out, plain(with_override(slg_model, reference), positive, negative, latent))
    ordinary = [c for c in spy.calls if c[3] != [0] or c[0].shape[0] == 2]
    assert len(ordinary) < len(spy.calls)  # the guidance ran its extra cond-only pass
    expected = brute_force(ordinary, N_TOKENS, 15, normalise="text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)


def test_leaves_no_trace_on_the_callers_model():
    model = dit_host.model("flux")
    before = repr(model.model_options), {k: dict(v) for k, v in model.wrappers.items()}
    recording(model, dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2), dit_host.latent("flux"))
    assert (repr(model.model_options), {k: dict(v) for k, v in model.wrappers.items()}) == before
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_block_choice_and_errors():
    flux_19 = type("Stand", (), {"double_blocks": [None] * 19, "single_blocks": [None] * 38})()
    sd3_24 = type("Stand", (), {"joint_blocks": [None] * 24})()
    flux = families.FAMILIES["comfy.ldm.flux.model.Flux"]
    sd3 = families.FAMILIES["comfy.ldm.modules.diffusionmodules.mmdit.OpenAISignatureMMDITWrapper"]
    assert families.default_blocks(flux, flux_19) == [("double_block", i) for i in range(15, 19)]
    assert families.default_blocks(sd3, sd3_24) == [("double_block", i) for i in range(19, 23)]
    assert families.parse_blocks("double 2, single 0-1", flux, flux_19) == [
        ("double_block", 2), ("single_block", 0), ("single_block", 1)]
    with pytest.raises(ValueError, match="no single blocks"):
        families.parse_blocks("single 0", sd3, sd3_24)
    with pytest.raises(ValueError, match="outside"):
        families.parse_blocks("30", sd3, sd3_24)
    with pytest.raises(ValueError, match=r"backwards; write the lower block first \('15-18'\)"):
        families.parse_blocks("18-15", sd3, sd3_24)
    with pytest.raises(ValueError, match="cannot read"):
        families.parse_blocks("blocks please", sd3, sd3_24)


def test_map_memory_does_not_grow_with_steps():
    model = dit_host.model("flux")
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    sizes = []
    for steps in (1, 4):
        recorder = record.make_recorder(model, "cond", N_TOKENS)
        clone = recorder.install(model.clone(), (6, 10))
        with torch.inference_mode():
            common.ksample(clone, 1, steps, CFG, "euler", "normal", positive, negative, dit_host.latent("flux"),
                           common.schedule(clone, steps, "euler", "normal"))
        sizes.append(recorder.total.numel() * recorder.total.element_size())
    assert sizes[0] == sizes[1] == 15 * N_TOKENS * 4


PLANT_WORDS = "a photo of a cat on grass".split()


def plant_tokens():
    """Annotated prompt tokens of PLANT_WORDS, one token per word."""
    return tokens_mod.PromptTokens(text=" ".join(PLANT_WORDS), token_strings=list(PLANT_WORDS),
                                   words=[tokens_mod.Word(w, (i,)) for i, w in enumerate(PLANT_WORDS)])


def planted_maps(beta, normalise, seed=1):
    """Flux sampled with an attention-mask cond (ComfyUI's own attention-bias path) that adds
    `beta` to the logits between the word "cat" and a block of image tokens."""
    height, width, grid = 24, 32, (12, 16)
    region = torch.zeros(grid, dtype=torch.bool)
    region[3:9, 4:12] = True
    n_txt = len(PLANT_WORDS)
    length = n_txt + grid[0] * grid[1]
    bias = torch.zeros(1, length, length)
    bias[0, n_txt:, PLANT_WORDS.index("cat")] = region.flatten().float() * beta
    tokens = plant_tokens()
    positive = dit_host.conditioning(n_txt, seed, tokens=tokens, attention_mask=bias, attention_mask_img_shape=grid)
    _, maps = recording(dit_host.model("flux"), positive, dit_host.conditioning(n_txt, 2),
                        dit_host.latent("flux", 1, height, width), cfg=1.0, steps=4, normalise=normalise)
    return maps, region


def planted_iou(beta, normalise, seed=1):
    nodes = pack_module("nodes.record")
    maps, region = planted_maps(beta, normalise, seed)
    mask = nodes.AttentionMask().run(maps, "cat", 1.0, 0.5, "union")[0]
    assert mask.shape == (1, 8 * 24, 8 * 32)
    from ae_testlib import dit_plant

    return dit_plant.iou(mask[0] > 0.5, region.repeat_interleave(16, 0).repeat_interleave(16, 1))


def test_planted_region_is_recovered_by_attention_mask():
    assert planted_iou(8.0, "text") >= 0.9  # the default normalisation
    # the measurement behind that default (docs/recording.md): text-only rows give the better mask
    assert planted_iou(4.0, "text") > planted_iou(4.0, "joint")


def test_heatmap_node_on_dit_maps():
    nodes = pack_module("nodes.record")
    maps, _ = planted_maps(8.0, "text")
    image = torch.rand(1, 8 * 24, 8 * 32, 3)
    overlays = nodes.AttentionHeatmap().run(maps, image, "cat, grass", 0.6)[0]
    assert overlays.shape == (2, 8 * 24, 8 * 32, 3) and not torch.equal(overlays[0], overlays[1])


def test_unsupported_model_names_the_supported_ones():
    import comfy.model_patcher
    import comfy.supported_models as sm

    # AuraFlow: a DiT ComfyUI runs whose class is also called MMDiT, not supported by the recorder
    config = dict(cond_seq_dim=dit_host.CONTEXT_DIM, dim=64, n_layers=2, n_double_layers=1, n_heads=2,
                  global_conddim=64, max_seq=64)
    aura = comfy.model_patcher.ModelPatcher(sm.AuraFlow(config).get_model({}), torch.device("cpu"),
                                            torch.device("cpu"))
    with pytest.raises(TypeError, match=r"\(MMDiT\).*SDXL UNets and the DiT models Flux .*SD3 / SD3.5, Qwen-Image.*Wan 2.1 / 2.2"):
        record.make_recorder(aura, "cond", N_TOKENS)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen"])
def test_unet_only_methods_refuse_dit_models_clearly(family):
    """MAG-Edit and Inversion run on UNets only for now: they say so, name the model and the
    methods that do run on DiT models, before any work."""
    magedit, inversion = pack_module("samplers.magedit"), pack_module("samplers.inversion")
    model = dit_host.model(family)
    name = families.family_of(model).name
    positive, negative = dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2)
    with pytest.raises(TypeError, match=rf"^MAG-Edit does not support {name} \(a DiT model\).*InstDiffEdit"):
        magedit.mag_edit(model, None, positive, positive, negative, None, "cat")
    with pytest.raises(TypeError, match=rf"^Inversion .* does not support {name}.*SDXL UNets"):
        inversion.invert(model, positive, negative, dit_host.latent(family)["samples"])


def test_two_positive_conds_are_both_recorded():
    """Conditioning Combine of two prompts: ComfyUI batches both positive conds (and the negative)
    into one call; every positive chunk counts, as on the UNet path."""
    model = dit_host.model("flux")
    positive = dit_host.conditioning(N_TOKENS, 1) + dit_host.conditioning(N_TOKENS, 3)
    negative = dit_host.conditioning(N_TOKENS, 2)
    spy = SpyOverride()
    _, maps = recording(with_override(model, spy), positive, negative, dit_host.latent("flux"))
    assert max(len(c[3]) for c in spy.calls) == 3  # one call held both positive chunks and the negative
    expected = brute_force(spy.calls[1::4], N_TOKENS, 15, normalise="text")
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)


def test_area_conditioning_records_the_whole_image_calls_only():
    """A Conditioning (Set Area) cond makes ComfyUI run its own, cropped forward: the maps count the
    whole-image calls only (as the UNet recorder skips area chunks)."""
    model = dit_host.model("flux")
    full = dit_host.conditioning(N_TOKENS, 1)
    area = [[c, {**d, "area": (4, 6, 0, 0), "strength": 1.0}] for c, d in dit_host.conditioning(N_TOKENS, 3)]
    negative = dit_host.conditioning(N_TOKENS, 2)
    for positive in (full + area, area + full):
        spy = SpyOverride()
        _, maps = recording(with_override(model, spy), positive, negative, dit_host.latent("flux"),
                            dit_blocks=ALL_BLOCKS["flux"])
        whole = [c for c in spy.calls if c[0].shape[2] >= N_TOKENS + 15]
        assert len(whole) < len(spy.calls)  # the cropped area forward ran, and was left out
        expected = brute_force(whole, N_TOKENS, 15, normalise="text")
        assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6)


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen"])
def test_planting_helper_biases_what_the_hooks_see(family):
    """ae_testlib.dit_plant (the editing tests' planted regions) reaches the recorder's hook on
    every family; the model it was cloned from stays unplanted."""
    from ae_testlib import dit_plant

    nodes = pack_module("nodes.record")
    region = dit_plant.region_mask((12, 16), slice(3, 9), slice(4, 12))
    tokens = plant_tokens()
    base = dit_host.model(family)
    planted = dit_plant.plant(base, region, [PLANT_WORDS.index("cat")], beta=8.0)
    positive, negative = dit_host.conditioning(7, 1, tokens=tokens), dit_host.conditioning(7, 2)
    latent = dit_host.latent(family, 1, 24, 32)
    _, maps = recording(planted, positive, negative, latent, cfg=1.0, steps=4)
    mask = nodes.AttentionMask().run(maps, "cat", 1.0, 0.5, "union")[0]
    expected = region.repeat_interleave(16, 0).repeat_interleave(16, 1)
    assert dit_plant.iou(mask[0] > 0.5, expected) >= 0.9
    assert dit_plant.WRAPPER_KEY not in str(base.wrappers)
    assert not torch.equal(plain(planted, positive, negative, latent, cfg=1.0), plain(base, positive, negative, latent, cfg=1.0))


def test_a_comfyui_without_the_attention_override_gets_told_to_update(monkeypatch):
    """Before ComfyUI 0.3.60 no attention call reaches transformer_options' override: the maps
    would stay empty. The pack says which version it needs instead (README: Supported ComfyUI)."""
    import comfy.ldm.modules.attention as attention

    monkeypatch.delattr(attention, "wrap_attn")  # what such a ComfyUI lacks
    latent = dit_host.latent("flux")
    with pytest.raises(RuntimeError, match=r"needs ComfyUI 0\.3\.64 or newer.*Update ComfyUI"):
        recording(dit_host.model("flux"), dit_host.conditioning(N_TOKENS, 1), dit_host.conditioning(N_TOKENS, 2),
                  latent)

