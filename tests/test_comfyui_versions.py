"""The ComfyUI interfaces that changed between 0.3.64 and 0.19.3 (docs/comfyui_versions.md, one
row each): every test here fails if the pack handles its change wrong. They run on both hosts;
the ones that need a node or model code only the newer host has say so (host.requires), so on
0.3.64 they skip with that reason.

Tiny random-weight DiT models from ComfyUI's own classes (ae_testlib.dit_host), sampled on CPU."""
import re

import pytest
import torch

import node_calls
import test_dit_record as rec
import test_foi_dit as foi
from ae_testlib import dit_host, dit_plant, host
from ae_testlib.pack import pack_module

record = pack_module("samplers.record")
common = pack_module("samplers.common")
dit_recorder = pack_module("attention.dit_recorder")
foi_dit = pack_module("samplers.foi_dit")
families = pack_module("attention.families")

N_TOKENS = rec.N_TOKENS
ALL = rec.ALL_BLOCKS


@pytest.fixture(autouse=True)
def _dit_host(comfy_host):
    dit_host.require_dit_host()


def core_node(module, name):
    import importlib

    return getattr(importlib.import_module(module), name)


def run_node(cls, **inputs):
    """A core node as ComfyUI's executor calls it: a V3 node (comfy_api io.ComfyNode, e.g. 0.19.3's
    nodes_custom_sampler, FluxKVCache, NAGuidance) through its classmethod `execute`, a classic V1
    node through its FUNCTION. Returns the output tuple."""
    if hasattr(cls, "define_schema"):
        return tuple(cls.execute(**inputs).result)
    return getattr(cls(), cls.FUNCTION)(**inputs)


def kv_cache(model):
    return run_node(core_node("comfy_extras.nodes_flux", "FluxKVCache"), model=model)[0]


def nag(model, scale=5.0):
    return run_node(core_node("comfy_extras.nodes_nag", "NAGuidance"), model=model, nag_scale=scale,
                    nag_alpha=0.5, nag_tau=1.5)[0]


def check_maps(model, positive, negative, latent, normalise, cfg=2.0, blocks=None, family="flux"):
    """Recording on `model`: maps equal the float64 brute force from every call's q, k (mask) as a
    spy below the recorder saw them, and the sampled latent is bit-identical to plain sampling,
    through the spy (beside path) and without it (fused path). Returns the spy's calls."""
    spy = rec.SpyOverride()
    out, maps = rec.recording(rec.with_override(model, spy), positive, negative, latent, cfg=cfg,
                              dit_blocks=blocks or ALL[family], normalise=normalise)
    height, width = latent["samples"].shape[-2:]
    grid = (-(-height // 2), -(-width // 2))
    expected = rec.brute_force(spy.calls, N_TOKENS, grid[0] * grid[1], normalise=normalise)
    assert maps.probs.shape == (latent["samples"].shape[0], *grid, N_TOKENS)
    assert torch.allclose(maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(out, rec.plain(rec.with_override(model, rec.SpyOverride()), positive, negative, latent,
                                      cfg=cfg))
    fused_out, fused_maps = rec.recording(model, positive, negative, latent, cfg=cfg,
                                          dit_blocks=blocks or ALL[family], normalise=normalise)
    assert torch.allclose(fused_maps.probs.double(), expected.reshape(maps.probs.shape), atol=2e-6, rtol=0)
    assert torch.equal(fused_out, rec.plain(model, positive, negative, latent, cfg=cfg))
    return spy.calls, maps


# ------------------------------------------------------------------ Qwen-Image attention call

@pytest.mark.parametrize("normalise", ["joint", "text"])
def test_qwen_prompt_batch_with_text_padding_mask(normalise):
    """Qwen-Image's joint attention is called with q/k/v [B, H, N, D] and skip_reshape=True
    (0.3.69) and, from 0.11.0, with the text-padding mask as a [B, 1, L] bias (one row for every
    query). A prompt batch of two lengths: the shorter prompt's padding is masked."""
    model = dit_host.model("qwen")
    padding = torch.tensor([[1] * N_TOKENS, [1] * (N_TOKENS - 2) + [0, 0]])
    positive = dit_host.conditioning(N_TOKENS, seed=1, batch=2, attention_mask=padding)
    negative = dit_host.conditioning(N_TOKENS, seed=2, batch=2, attention_mask=padding)
    calls, maps = check_maps(model, positive, negative, dit_host.latent("qwen", 2, 6, 10), normalise, family="qwen")
    assert all(q.shape[1] == 2 and q.shape[-1] == 32 for q, *_ in calls)  # heads-first, whatever the host passed
    masked = [mask for _, _, mask, _ in calls if mask is not None]
    if masked:  # a host that passes the padding mask to attention: the padded tokens get nothing
        assert float(maps.probs[1, ..., N_TOKENS - 2:].max()) < 1e-6
        assert float(maps.probs[0, ..., N_TOKENS - 2:].min()) > 0


# ------------------------------------------------------------------ Flux KV cache (0.17.0)

def reference_conds(family="flux", kontext=False, method=None):
    """(positive, negative) with a reference latent (ReferenceLatent / TextEncodeQwenImageEdit),
    Kontext's guidance (FluxGuidance), and where `method` is given the reference method the core
    FluxKontextMultiReferenceLatentMethod node sets."""
    ref = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    ref = {"reference_latents": [ref[:, :, None] if family == "qwen" else ref]}  # Qwen: one-frame latents
    if kontext:
        ref["guidance"] = 2.5
    conds = dit_host.conditioning(N_TOKENS, seed=1, **ref), dit_host.conditioning(N_TOKENS, seed=2, **ref)
    return tuple(with_reference_method(c, method) for c in conds) if method else conds


def with_reference_method(conditioning, method):
    node = core_node("comfy_extras.nodes_flux", "FluxKontextMultiReferenceLatentMethod")
    return run_node(node, conditioning=conditioning, reference_latents_method=method)[0]


@host.requires("flux_kv_cache")
@pytest.mark.parametrize("family", ["flux", "qwen"])
@pytest.mark.parametrize("normalise", ["joint", "text"])
def test_recording_with_the_flux_kv_cache_node(family, normalise):
    """FluxKVCache (0.17.0) caches the reference image's keys / values at the first forward, then
    drops the reference tokens from the queries (a post_input patch): keys outnumber queries. The
    maps are the current queries' image rows on the text keys, the latent the one core sampling
    gives with the cache. Qwen-Image-Edit runs it as the node sets it up (reference tokens at
    timestep 0, index_timestep_zero); Flux Kontext with the reference method "index"
    (FluxKontextMultiReferenceLatentMethod): index_timestep_zero runs on Flux.2 only (Flux.1's
    blocks and pooled / guidance embeddings do not take the doubled timestep batch, in core
    sampling too), and Flux.2 gets its own adapter (test_flux2_gets_its_own_adapter_and_the_unet_only_methods_refuse_it)."""
    model = kv_cache(dit_host.model(family))
    if family == "flux":
        positive, negative = reference_conds(family, kontext=True, method="index")
    else:
        positive, negative = reference_conds(family)
    latent = dit_host.latent(family, 2, 6, 10)
    calls, _ = check_maps(model, positive, negative, latent, normalise, family=family)
    assert any(k.shape[2] > q.shape[2] for q, k, *_ in calls)  # the cache was used
    assert not torch.equal(rec.plain(dit_host.model(family), positive, negative, latent),
                           rec.plain(model, positive, negative, latent))  # and changes sampling


@host.requires("flux2")
def test_flux2_gets_its_own_adapter_and_the_unet_only_methods_refuse_it():
    """Flux.2 (0.3.72) runs in Flux's own model class with patch size 1 on 128-channel latents
    and a left-padded text sequence: families.family_of picks the Flux.2 adapter by structure
    (tests/test_flux2_record.py tests its recording); the UNet-only methods refuse it by name."""
    model = dit_host.model("flux", "flux2")
    assert families.family_of(model).name == "Flux.2"
    for method in ("MAG-Edit", "Inversion (DDIM / null-text)"):
        with pytest.raises(TypeError, match=rf"{re.escape(method)} does not support Flux\.2 \(a DiT model\)"):
            common.refuse_dit(model, method)


# ------------------------------------------------------------------ NAG (core NAGuidance)

@host.requires("nag")
@pytest.mark.parametrize("family", ["flux", "chroma"])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_recording_with_normalized_attention_guidance(family, cfg):
    """NAGuidance sets an attn1_output_patch that Flux / Chroma blocks call after attention (and
    disables the cfg 1 optimisation): the recorded maps are still the model's attention, the latent
    bit-identical to core sampling with NAG."""
    model = nag(dit_host.model(family))
    positive = dit_host.conditioning(N_TOKENS, seed=1)
    negative = dit_host.conditioning(N_TOKENS, seed=2)
    latent = dit_host.latent(family, 1, 6, 10)
    calls, _ = check_maps(model, positive, negative, latent, "joint", cfg=cfg, family=family)
    assert all(sorted(chunks) == [0, 1] for *_, chunks in calls)  # NAG needs both in one batch
    assert not torch.equal(rec.plain(dit_host.model(family), positive, negative, latent, cfg=cfg),
                           rec.plain(model, positive, negative, latent, cfg=cfg))  # NAG acts


# ------------------------------------------------------------------ FoI on Kontext with core patches

PATCHES = [pytest.param("kontext", "nag", marks=host.requires("nag")),
           pytest.param("kontext", "flux_kv_cache", marks=host.requires("flux_kv_cache")),
           pytest.param("qwen_edit", "flux_kv_cache", marks=host.requires("flux_kv_cache"))]


@pytest.mark.parametrize("kind,patch", PATCHES)
def test_foi_with_core_attention_patches(kind, patch):
    """FoI on Kontext / Qwen-Image-Edit with NAGuidance / FluxKVCache on the model: the planted
    keyword region comes back as the mask and every instruction call is modulated. On Kontext
    (instruction and null in one forward), FoI with modulation and disentangling off and s_I = 1 is
    core CFG of the instruction over the null instruction, the patch included. (Qwen-Image-Edit
    runs one forward per branch, so which one fills the KV cache first follows the cond order,
    which FoI sets and core CFG does not: no core comparison there.)"""
    family = foi.FAMILIES[kind]
    base = nag(dit_host.model(family)) if patch == "nag" else kv_cache(dit_host.model(family))
    hw = (16, 16)
    grid = families.token_grid(hw)
    region = dit_plant.region_mask(grid, slice(1, 5), slice(2, 6))
    planted = dit_plant.plant(base, region, [foi.WORDS.index("hat")], beta=8.0,
                              branches=(foi.INSTRUCTION[kind],))
    positive, negative = foi.conds(kind, foi.instructions(("hat",)))
    if kind == "kontext" and patch == "flux_kv_cache":  # see test_recording_with_the_flux_kv_cache_node
        positive = with_reference_method(positive, "index")
    latent = dit_host.latent("flux", 1, *hw)
    _, guider = foi.run(planted, positive, negative, latent, foi_dit.FoIDiTConfig(), steps=3)
    assert dit_plant.iou(guider.masks[0, 0] > 0.5, region) >= 0.9
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped"] == 0

    config = foi_dit.FoIDiTConfig(s_T=2.5, modulation=False, disentangle_fraction=0.0)
    edited, _ = foi.run(base, positive, negative, latent, config, steps=3)
    unpatched, _ = foi.run(dit_host.model(family), positive, negative, latent, config, steps=3)
    assert not torch.equal(edited, unpatched)  # the patch acted inside FoI's model calls
    if kind == "kontext":
        null, full, _ = foi_dit.dit_conds(positive, negative, foi_dit.KONTEXT)
        core = comfy_cfg(base, full, null, latent, 2.5, steps=3)
        assert torch.allclose(edited, core, atol=1e-6, rtol=0), float((edited - core).abs().max())


def comfy_cfg(model, positive, negative, latent, cfg, steps, seed=0):
    """Core sampling with comfy.samplers.CFGGuider, as FoI samples (same noise, schedule, sampler)."""
    import comfy.samplers

    with torch.inference_mode():
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        sigmas = common.schedule(model, steps, "euler", "simple", 1.0)
        samples = common.latent_samples(model, latent)
        noise = common.initial_noise({**latent, "samples": samples}, seed)
        return guider.sample(noise, samples, comfy.samplers.sampler_object("euler"), sigmas, seed=seed)


# ------------------------------------------------------------------ guiders in SamplerCustomAdvanced

GUIDERS = {"ip2p": ("AttentionEditFoIGuider", 4, (16, 16)), "kontext": ("AttentionEditFoIDiTGuider", 16, (8, 12))}


@pytest.mark.parametrize("kind", list(GUIDERS))
def test_foi_guider_in_sampler_custom_advanced_with_a_noise_mask(kind):
    """The FoI guiders are CFGGuider subclasses: SamplerCustomAdvanced (a V3 node from 0.19.3,
    called through its classmethod `execute`; a V1 node before) samples them. 0.3.67 added
    `latent_shapes` to outer_sample / inner_sample (the guiders override inner_sample) and 0.6.0
    moved the noise-mask preparation from outer_sample into sample(): the node's output equals
    guider.sample with the raw mask, and the masked-out area keeps the input latent."""
    import comfy.samplers

    key, channels, hw = GUIDERS[kind]
    with torch.inference_mode():
        (guider,) = node_calls.call(key, **node_calls.inputs(key))
    samples = torch.randn(1, channels, *hw, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, hw[0] * 8, hw[1] * 8)  # SetLatentNoiseMask keeps the image-size mask
    mask[..., :hw[0] * 4, :] = 1.0
    latent = {"samples": samples, "noise_mask": mask}
    custom = core_node("comfy_extras.nodes_custom_sampler", "SamplerCustomAdvanced")
    noise = core_node("comfy_extras.nodes_custom_sampler", "Noise_RandomNoise")(0)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = common.schedule(guider.model_patcher, 3, "euler", "simple" if kind == "kontext" else "normal", 1.0)
    with torch.inference_mode():
        out, _ = run_node(custom, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas, latent_image=latent)
        direct = guider.sample(noise.generate_noise(latent), samples, sampler, sigmas, denoise_mask=mask, seed=0)
    assert torch.equal(out["samples"], direct.to(out["samples"].device))
    kept, edited = out["samples"][..., hw[0] // 2:, :], out["samples"][..., :hw[0] // 2, :]
    assert torch.allclose(kept, samples[..., hw[0] // 2:, :], atol=1e-5)
    assert not torch.allclose(edited, samples[..., :hw[0] // 2, :], atol=1e-2)
    assert guider.masks is not None and guider.evaluations == 3


# ------------------------------------------------------------------ block identity

@pytest.mark.parametrize("family,blocks", [("flux", "double 1, single 0"), ("chroma", "single 1"), ("qwen", "1")])
def test_block_tags_follow_the_blocks_and_the_hosts_metadata(family, blocks):
    """The recorder tags its chosen blocks with patches_replace["dit"] patches; Flux and Chroma
    copy transformer_options at the start of their forward (0.14.0) and newer hosts write
    block_index / block_type / total_blocks into it. The tag seen by each attention call is its
    block by call order, and agrees with the host's metadata where the host writes it."""
    model = dit_host.model(family)
    recorder = dit_recorder.DiTRecorder(blocks=blocks, normalise="joint")
    seen = []

    class Spy(rec.SpyOverride):
        def __call__(self, func, *args, **kwargs):
            options = kwargs.get("transformer_options") or {}
            seen.append((recorder.block, options.get("block_type"), options.get("block_index"),
                         options.get("total_blocks")))
            return func(*args, **kwargs)

    patched = rec.with_override(model, Spy()).clone()
    latent = dit_host.latent(family, 1, 6, 10)
    sigmas = common.schedule(patched, 2, "euler", "normal", 1.0)
    recorder.install(patched, latent["samples"].shape[-2:], sigmas)
    positive, negative = dit_host.conditioning(N_TOKENS, seed=1), dit_host.conditioning(N_TOKENS, seed=2)
    with torch.inference_mode():
        common.ksample(patched, 1, 2, 2.0, "euler", "normal", positive, negative, latent, sigmas)
    family_info = families.family_of(model)
    order = [("double_block", i) for i in range(family_info.depth(model.model.diffusion_model, "double"))]
    order += [("single_block", i) for i in range(family_info.depth(model.model.diffusion_model, "single"))]
    chosen = set(recorder.blocks)
    assert len(seen) == 2 * len(order)  # one forward per step (cond and uncond batched)
    for index, (tag, block_type, block_index, total) in enumerate(seen):
        block = order[index % len(order)]
        assert tag == (block if block in chosen else None), (index, tag, block)
        if block_type is not None:  # the host's own block identity
            assert (f"{block_type}_block", block_index) == block
            assert total == family_info.depth(model.model.diffusion_model, block_type)


# ------------------------------------------------------------------ Qwen-Image-Edit-2511

@host.requires("index_timestep_zero")
@pytest.mark.parametrize("normalise", ["joint", "text"])
def test_qwen_image_edit_2511_recording(normalise):
    """A Qwen-Image-Edit-2511 checkpoint (detected by its __index_timestep_zero__ key) runs the
    reference image's tokens at timestep 0: temb has batch 2B and the blocks gate in two parts.
    Recording with a reference image: maps equal the brute force, latent bit-identical."""
    model = dit_host.model("qwen", "edit_2511")
    assert model.model.diffusion_model.default_ref_method == "index_timestep_zero"
    ref = {"reference_latents": [torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(5))]}
    positive = dit_host.conditioning(N_TOKENS, seed=1, **ref)
    negative = dit_host.conditioning(N_TOKENS, seed=2, **ref)
    latent = dit_host.latent("qwen", 2, 5, 9)
    check_maps(model, positive, negative, latent, normalise, family="qwen")
    assert not torch.equal(rec.plain(model, positive, negative, latent),
                           rec.plain(dit_host.model("qwen"), positive, negative, latent))  # 2511 differs


@host.requires("index_timestep_zero")
def test_foi_on_qwen_image_edit_2511():
    """FoI on a Qwen-Image-Edit-2511 model: the planted keyword region is the mask, the
    instruction's calls are all modulated."""
    hw = (16, 16)
    grid = families.token_grid(hw)
    region = dit_plant.region_mask(grid, slice(3, 8), slice(0, 4))
    model = dit_plant.plant(dit_host.model("qwen", "edit_2511"), region, [foi.WORDS.index("hat")], beta=8.0,
                            branches=(foi.INSTRUCTION["qwen_edit"],))
    positive, negative = foi.conds("qwen_edit", foi.instructions(("hat",)))
    _, guider = foi.run(model, positive, negative, dit_host.latent("flux", 1, *hw), foi_dit.FoIDiTConfig(),
                        steps=3)
    assert dit_plant.iou(guider.masks[0, 0] > 0.5, region) >= 0.9
    assert guider.state.stats["modulated"] > 0 and guider.state.stats["skipped"] == 0


# ------------------------------------------------------------------ patch protocols

class ProtocolPatch:
    """A replace patch another pack set, with the optional methods ComfyUI calls on patch objects:
    .models() (extra models to load, both hosts) and .cleanup() (after sampling, newer hosts)."""

    def __init__(self, kind):
        self.kind = kind
        self.counts = {"models": 0, "cleanup": 0}

    def __call__(self, *args):
        if self.kind == "dit":
            args, extra = args
            return extra["original_block"](args)
        q, k, v, extra_options = args
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    def models(self):
        self.counts["models"] += 1
        return []

    def cleanup(self):
        self.counts["cleanup"] += 1

    def __deepcopy__(self, memo):
        return self


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_a_wrapped_patch_keeps_its_models_and_cleanup(kind):
    """Where the pack wraps a replace patch that was already there, ComfyUI still reaches the
    wrapped patch's .models() and (ModelPatcher.cleanup, newer hosts) .cleanup(): each is called
    as often as when the patch samples alone."""
    from ae_testlib import fixtures

    layers = pack_module("attention.layers")
    if kind == "dit":
        model, latent = dit_host.model("flux"), dit_host.latent("flux")
        positive, negative = dit_host.conditioning(N_TOKENS, seed=1), dit_host.conditioning(N_TOKENS, seed=2)
        keys = [("dit", "double_block", 1)]
    else:
        model, latent = fixtures.model("sd15"), {"samples": torch.zeros(1, 4, 16, 16)}
        positive, negative = fixtures.encode("sd15", "a cat"), fixtures.encode("sd15", "")
        keys = [("attn2",) + layer.key for layer in layers.select_layers(model, 2)]

    def patched(patch):
        clone = model.clone()
        for key in keys:
            clone.set_model_patch_replace(patch, *key)
        return clone

    alone, wrapped = ProtocolPatch(kind), ProtocolPatch(kind)
    rec.plain(patched(alone), positive, negative, latent)
    with torch.inference_mode():
        record.sample_recording(patched(wrapped), 1, rec.STEPS, rec.CFG, "euler", "normal", positive, negative,
                                latent, dit_blocks="double 1")
    assert wrapped.counts == alone.counts


def test_multi_frame_qwen_latent_is_refused():
    """0.19.3's Qwen-Image runs multi-frame latents [B, C, F, H, W] (Qwen-Image Layered, a layer
    per frame, tokens frame-major): the pack reads one frame's token grid, so it refuses them
    by name instead of recording the first frame's rows as the image's: the sampler's latent check
    before the model runs, and the model wrapper's layout for paths that reach the model."""
    model = dit_host.model("qwen")
    positive, negative = dit_host.conditioning(N_TOKENS, seed=1), dit_host.conditioning(N_TOKENS, seed=2)
    with pytest.raises(ValueError, match=r"has 3 frames .*Qwen-Image Layered"):
        rec.recording(model, positive, negative, {"samples": torch.zeros(1, 16, 3, 6, 10)})
    with pytest.raises(TypeError, match="Layered"):
        families.layout_of(torch.zeros(1, 16, 3, 6, 10), torch.zeros(1, N_TOKENS, 32), model.model.diffusion_model)


# ------------------------------------------------------------------ empty latents and output LATENTs

@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_empty_latent_image_samples_as_core_ksampler(family):
    """0.19.3's EmptyLatentImage adds "downscale_ratio_spacial" to the LATENT; ComfyUI's samplers
    hand it to fix_empty_latent_channels (whose ratio argument is new) and leave it out of their
    output. KSampler (Record Attention) on it equals core KSampler: same samples, same keys."""
    from ae_testlib import fixtures, registry

    core = registry.core_nodes()
    (empty,) = run_node(core["EmptyLatentImage"], width=96, height=80, batch_size=1)
    if family == "sd15":
        model = fixtures.model("sd15")
        positive, negative = fixtures.encode("sd15", "a corgi wearing a red hat"), fixtures.encode("sd15", "")
        settings = {"resolution": node_calls.RESOLUTION, "layers": "down + up"}
    else:
        model = dit_host.model("flux")
        positive, negative = dit_host.conditioning(N_TOKENS, seed=1), dit_host.conditioning(N_TOKENS, seed=2)
        settings = {}
    inputs = {"model": model, "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
              "positive": positive, "negative": negative, "latent_image": empty, "denoise": 1.0}
    with torch.inference_mode():
        (theirs,) = run_node(core["KSampler"], **inputs)
    if family == "sd15":
        ours, _ = node_calls.call("AttentionEditKSamplerRecord", **inputs, **settings, branch="cond")
    else:
        ours, _ = rec.recording(model, positive, negative, empty, cfg=2.0)  # seed 1, 2 steps, euler, normal
        ours = {"samples": ours}
    assert torch.equal(ours["samples"], theirs["samples"])
    assert set(ours) == set(theirs)


def test_lumina2_in_z_images_class_is_refused_on_every_host():
    """Lumina Image 2.0 runs in NextDiT, Z-Image's class: refused by name on every host, also on
    0.3.64, which has Lumina 2.0 but no supported_models.ZImage (added in 0.3.75)."""
    import comfy.model_patcher
    import comfy.supported_models as sm

    config = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, n_heads=2, n_kv_heads=2, n_layers=1,
                  axes_dims=[8, 12, 12], cap_feat_dim=dit_host.CONTEXT_DIM, qk_norm=True)
    lumina = comfy.model_patcher.ModelPatcher(sm.Lumina2(config).get_model({}), torch.device("cpu"), torch.device("cpu"))
    assert families.family_of(lumina) is None
    with pytest.raises(TypeError, match=r"Lumina Image 2.0.*Z-Image / Z-Image Turbo only"):
        families.require_family(lumina)
