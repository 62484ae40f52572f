"""MAG-Edit (attention/injection.py, samplers/magedit.py, nodes/magedit.py) on the real host.

Tiny random-weight models built under `torch.inference_mode()` (as ComfyUI loads weights), nodes
and samplers called inside it, as ComfyUI runs them. 16x16 latents, 5 DDIM steps, 2 iterations.
"""
import functools
import gc

import pytest
import torch

from ae_testlib import fixtures, host
from ae_testlib.pack import pack_module

host.import_host()

injection = pack_module("attention.injection")
layers_mod = pack_module("attention.layers")
tokens_mod = pack_module("attention.tokens")
inversion_mod = pack_module("samplers.inversion")
magedit = pack_module("samplers.magedit")
grad_mod = pack_module("samplers.grad")
node_module = pack_module("nodes.magedit")

SOURCE, TARGET, EMPTY = "a photo of a cat on a sofa", "a photo of a cat on a red sofa", ""
STEPS = 5
# cross: int(0.8 * 6) = 4 -> steps 0..3; self: int(5 * 0.5) = 2 -> steps 0, 1; blend steps 3, 4
CONFIG = magedit.MagEditConfig(steps=STEPS, optimized_steps=3, iterations=2, blend_steps=2)


def model(family, seed=0):
    return _model(family, seed)


@functools.lru_cache(maxsize=None)
def _model(family, seed):
    with torch.inference_mode():
        return host.build_model(family, seed=seed)


@pytest.fixture(scope="module", autouse=True)
def _free_models():
    yield
    # Free the cached models while ComfyUI's modules are alive (upstream's ModelPatcher.__del__
    # fails noisily during interpreter shutdown).
    _inverted.cache_clear()
    _model.cache_clear()
    gc.collect()


def encode(family, text):
    return fixtures.encode(family, text)


def box_mask(batch=1, size=128, box=(32, 96, 40, 100)):
    mask = torch.zeros(batch, size, size)
    top, bottom, left, right = box
    mask[:, top:bottom, left:right] = 1.0
    return mask


def inverted(family, batch=1, seed=0, null_text=True):
    return _inverted(family, batch, seed, null_text)


@functools.lru_cache(maxsize=None)
def _inverted(family, batch, seed, null_text):
    latent = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        result, _ = inversion_mod.invert(model(family, seed), encode(family, SOURCE), encode(family, EMPTY),
                                         latent, steps=STEPS, null_text=null_text, inner_iterations=2)
    return result


def run_edit(family="sd15", batch=1, config=CONFIG, mask=None, words="red", target=TARGET, observer=None,
             edit_model=None, inversion=None):
    with torch.inference_mode():
        return magedit.mag_edit(edit_model or model(family), inversion or inverted(family, batch),
                                encode(family, SOURCE), encode(family, target), encode(family, EMPTY),
                                box_mask(batch) if mask is None else mask, words, config, observer=observer)


def with_editor(fn, family="sd15", config=CONFIG):
    """Run fn(editor) inside a MAG-Edit sampling run; returns what fn stored."""
    found = {}

    def body(editor):
        found.update(fn(editor) or {})
        x = editor.inversion.noise.to(editor.run.x)
        return torch.cat([x, x])

    with torch.inference_mode():
        magedit.with_editor(model(family), inverted(family), encode(family, SOURCE), encode(family, TARGET),
                            encode(family, EMPTY), box_mask(), "red", config, body)
    return found


# --------------------------------------------------------------------------------------------
# Token alignment (P2P refine mapper)
# --------------------------------------------------------------------------------------------

def alignment(family, source, target):
    return injection.align_prompts(tokens_mod.tokens_of(encode(family, source)),
                                   tokens_mod.tokens_of(encode(family, target)))


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_alignment_is_the_p2p_refinement_mapper(family, comfy_host):
    # <start> a photo of a cat on a [red] sofa <end>: 'red' is new, everything else shifts by one
    added = alignment(family, SOURCE, TARGET)
    assert added.mapper[:11] == (0, 1, 2, 3, 4, 5, 6, 7, -1, 8, 9)
    assert added.mapper[11:] == tuple(range(11, 77))  # after the target's end: same position
    assert added.shared_positions == (1, 2, 3, 4, 5, 6, 7, 9)
    # substitution: P2P's alignment (gap 0, mismatch -1) deletes 'cat' and inserts 'dog'
    swapped = alignment(family, "a cat on a sofa", "a dog on a sofa")
    assert swapped.mapper[:7] == (0, 1, -1, 3, 4, 5, 6)
    assert not alignment(family, "a cat", "dogs").shared_positions  # only <start>/<end> align


# --------------------------------------------------------------------------------------------
# The patches on their own
# --------------------------------------------------------------------------------------------

class ScalingPatch:
    """An existing replace patch (like IPAdapter's): its own output, v scaled."""

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v * 1.5, extra_options["n_heads"])


def _reference_probs(q, k, heads):
    b, n, inner = q.shape
    qh = q.double().reshape(b, n, heads, -1).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, -1).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)


def _reference_apply(p, v, heads):
    b, keys, inner = v.shape
    vh = v.double().reshape(b, keys, heads, -1).transpose(1, 2)
    return (p @ vh).transpose(1, 2).reshape(b, p.shape[2], inner)


@pytest.mark.parametrize("inner", [None, ScalingPatch()])
def test_cross_patch_replaces_exactly_the_shared_tokens_of_the_editing_rows(inner, comfy_host):
    align = alignment("sd15", SOURCE, TARGET)
    loss_layer = layers_mod.AttentionLayer("input", 7, 0, 2)
    controller = injection.InjectionController(align, [loss_layer])
    patch = injection.CrossInjection(controller, loss_layer, inner)
    heads, generator = 2, torch.Generator().manual_seed(0)
    # chunks [uncond, cond], each [reconstruction, editing]
    q, k, v = (torch.randn(4, n, 16, generator=generator) for n in (9, 77, 77))
    options = {"n_heads": heads, "cond_or_uncond": [1, 0]}
    plain = patch.attend(q, k, v, options)

    controller.configure("joint", step=0, cross=False)
    assert torch.equal(patch(q, k, v, options), plain)  # inactive: the layer's own output

    controller.configure("joint", step=0, cross=True)
    out = patch(q, k, v, options)
    assert torch.equal(out[:3], plain[:3])  # both uncond rows and the reconstruction row untouched
    p_rec, p_own = _reference_probs(q[2:3], k[2:3], heads), _reference_probs(q[3:4], k[3:4], heads)
    mapper, aligned = align.tensors("cpu")
    expected = torch.where(aligned, p_rec[..., mapper], p_own)
    assert not aligned[8] and aligned[:8].all() and aligned[9:].all()  # only 'red' keeps its own map
    change = _reference_apply(expected, v[3:4], heads)
    if inner is not None:
        change = plain[3:4].double() + change - _reference_apply(p_own, v[3:4], heads)
    torch.testing.assert_close(out[3:4].double(), change, atol=2e-6, rtol=0)


def test_self_patch_uses_the_reconstruction_queries_and_keys(comfy_host):
    layer = layers_mod.AttentionLayer("input", 4, 0, 1)
    controller = injection.InjectionController(alignment("sd15", SOURCE, TARGET), [layer])
    patch = injection.SelfInjection(controller, layer, None)
    q, k, v = (torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    options = {"n_heads": 2, "cond_or_uncond": [0, 1]}
    plain = patch.attend(q, k, v, options)
    controller.configure("joint", step=0, self_attention=True)
    out = patch(q, k, v, options)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2:], plain[2:])
    expected = _reference_apply(_reference_probs(q[:1], k[:1], 2), v[1:2], 2)
    torch.testing.assert_close(out[1:2].double(), expected, atol=2e-6, rtol=0)
    controller.configure("joint", step=0, self_attention=False)
    assert torch.equal(patch(q, k, v, options), plain)


def test_patches_are_installed_on_a_clone_at_the_configured_levels(comfy_host):
    base = model("sd15")
    before = repr(base.model_options)
    clone = base.clone()
    loss_layers = layers_mod.select_layers(clone, 2)
    controller = injection.InjectionController(alignment("sd15", SOURCE, TARGET), loss_layers)
    controller.install(clone)
    replaced = clone.model_options["transformer_options"]["patches_replace"]
    everything = layers_mod.unet_attention_layers(clone, cross_only=False)
    assert set(replaced["attn2"]) == {layer.key for layer, _ in everything}
    assert set(replaced["attn1"]) == {layer.key for layer, _ in everything if layer.level >= 1}
    assert any(layer.level == 0 for layer, _ in everything)  # the full-resolution layers stay plain
    assert controller.last_loss_key == max(layer.key for layer in loss_layers if layer.part == "output")
    assert repr(base.model_options) == before


# --------------------------------------------------------------------------------------------
# Injection inside a run: branches, steps, levels
# --------------------------------------------------------------------------------------------

def test_injection_only_in_the_editing_branch_at_the_configured_steps(comfy_host):
    # cross injection: int(0.2 * 6) = 1 -> step 0 only; self: int(5 * 0.4) = 2 -> steps 0, 1
    config = magedit.MagEditConfig(steps=STEPS, optimized_steps=3, iterations=2, blend_steps=2,
                                   cross_fraction=0.2, self_fraction=0.4)
    events = []
    run_edit(config=config, observer=events.append)
    align = alignment("sd15", SOURCE, TARGET)
    mapper, aligned = align.tensors("cpu")
    every = layers_mod.unet_attention_layers(model("sd15"), cross_only=False)
    n_self = sum(1 for layer, _ in every if layer.level >= 1)

    joint_cross = [e for e in events if e["mode"] == "joint" and e["kind"] == "cross" and e["injected"]]
    assert {e["step"] for e in joint_cross} == {0}
    assert len(joint_cross) == len(every)  # every cross-attention layer, once
    for event in joint_cross:
        final, rec, own = event["final"], event["rec"], event["own"]
        assert torch.equal(final[..., aligned], rec[..., mapper][..., aligned])
        assert torch.equal(final[..., ~aligned], own[..., ~aligned])
        assert not torch.equal(rec, own)
    later = [e for e in events if e["kind"] == "cross" and e["step"] > 0]
    assert later and all(not e["injected"] and torch.equal(e["final"], e["own"]) for e in later)

    for mode in ("joint", "edit"):
        self_events = [e for e in events if e["mode"] == mode and e["kind"] == "self"]
        assert {e["step"] for e in self_events} == {0, 1}
        assert all(e["layer"].level >= 1 for e in self_events)
    assert len([e for e in events if e["mode"] == "joint" and e["kind"] == "self"]) == 2 * n_self
    # edit passes: injected maps at step 0 equal the recorded reconstruction's, as in the joint pass
    edit_cross = [e for e in events if e["mode"] == "edit" and e["kind"] == "cross" and e["injected"]]
    assert {e["step"] for e in edit_cross} == {0}


# --------------------------------------------------------------------------------------------
# Optimisation: early stop, gradient, update, loss
# --------------------------------------------------------------------------------------------

def test_early_stopped_forward_gives_the_full_forward_loss_and_gradient(comfy_host):
    unet = model("sd15").model.diffusion_model
    calls = []
    hook = unet.out.register_forward_hook(lambda *args: calls.append(1))

    def fn(editor):
        x = editor.inversion.noise.to(editor.run.x)
        editor.record_reconstruction(0, x, early_stop=False)  # everything the full forward needs
        calls.clear()
        stopped = editor.loss_and_grad(0, x, early_stop=True)
        stopped_calls = len(calls)
        full = editor.loss_and_grad(0, x, early_stop=False)
        return {"stopped": stopped, "full": full, "stopped_calls": stopped_calls, "full_calls": len(calls)}

    try:
        found = with_editor(fn)
    finally:
        hook.remove()
    assert found["stopped_calls"] == 0 and found["full_calls"] - found["stopped_calls"] >= 1
    (loss_a, grad_a, maps_a), (loss_b, grad_b, maps_b) = found["stopped"], found["full"]
    assert torch.equal(loss_a, loss_b)
    torch.testing.assert_close(grad_a, grad_b, atol=0, rtol=1e-6)
    assert grad_a.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(maps_a, maps_b))


def test_update_is_the_official_step_on_the_ddpm_latent(comfy_host):
    """x' = x - M sigma (1 + sigma^2) grad_x L equals z' = z - M sigma grad_z L with z = x sqrt(abar)."""
    def fn(editor):
        step = 1
        x = editor.inversion.trajectory[step].to(editor.run.x)
        editor.record_reconstruction(step, x)
        updated, _ = editor.optimise(step, x, x)  # 2 iterations; compare the first by hand below
        sigma = float(editor.sigmas[step])
        scale = (1 + sigma ** 2) ** 0.5  # x = z * scale
        z = grad_mod.leaf(x / scale, requires_grad=True)
        editor.record_reconstruction(step, x)
        _, (grad_z,) = grad_mod.loss_and_grad(lambda: editor.loss(step, z * scale)[0].sum(), [z])
        official = (z - editor.latent_mask * sigma * grad_z).detach() * scale
        _, grad_x, _ = editor.loss_and_grad(step, x)
        ours = x - editor.latent_mask * magedit.sigma_step_factor(sigma) * grad_x
        outside = (editor.latent_mask == 0).expand_as(x)
        return {"official": official, "ours": ours, "x": x, "outside": outside, "updated": updated}

    found = with_editor(fn)
    torch.testing.assert_close(found["ours"], found["official"], atol=1e-5, rtol=1e-5)
    assert not torch.equal(found["ours"], found["x"])
    outside = found["outside"]
    assert torch.equal(found["updated"][outside], found["x"][outside])  # updates only inside M


def test_optimisation_lowers_the_loss(comfy_host):
    config = magedit.MagEditConfig(steps=STEPS, optimized_steps=2, iterations=4, blend_steps=2)
    result = run_edit(config=config)
    losses = result.losses[..., 0]  # [optimised steps, iterations]
    assert losses.shape == (2, 4)
    assert (losses[:, 1:] < losses[:, :-1]).all(), losses


def test_outside_the_dilated_mask_the_edit_is_the_reconstruction(comfy_host):
    result = run_edit()
    blend = torch.nn.functional.max_pool2d(result.latent_mask, 3, 1, 1).expand_as(result.samples)
    outside = blend == 0
    assert outside.any() and (~outside).any()
    assert torch.equal(result.samples[outside], result.reconstruction[outside])
    assert not torch.equal(result.samples[~outside], result.reconstruction[~outside])
    assert torch.isfinite(result.samples).all()


# --------------------------------------------------------------------------------------------
# Node: families, batch, preview, errors, no trace
# --------------------------------------------------------------------------------------------

def run_node(family="sd15", batch=1, mask=None, words="red", target=TARGET, steps=STEPS, edit_model=None,
             inversion=None, loss="token"):
    with torch.inference_mode():
        return node_module.MagEdit().run(
            edit_model or model(family), inversion or inverted(family, batch), encode(family, SOURCE),
            encode(family, target), encode(family, EMPTY), box_mask(batch) if mask is None else mask, words,
            steps, 7.5, 3, 2, 2.5, loss, 0.8, 0.5, 2)


@pytest.mark.parametrize("family,batch,loss", [("sd15", 1, "token"), ("sdxl", 1, "both"), ("sd15", 2, "spatial")])
def test_node_families_batches_and_preview(family, batch, loss, comfy_host):
    base = model(family)
    before = repr(base.model_options)
    latent, preview = run_node(family, batch, loss=loss)
    samples = latent["samples"]
    assert samples.shape == (batch, 4, 16, 16) and torch.isfinite(samples).all()
    assert preview.shape == (batch, 128, 2 * 128 + 4, 3)
    assert preview.min() >= 0 and preview.max() <= 1
    assert repr(base.model_options) == before
    assert "patches_replace" not in base.model_options.get("transformer_options", {})
    if batch == 2:  # each image edits independently: the same as editing it alone
        alone = run_node(family, 1, inversion=_single_image(inverted(family, 2), 1), loss=loss)[0]["samples"]
        # up to float32 differences of batch-size dependent kernels (~1e-6 per UNet call)
        assert ((samples[1:] - alone).norm() / alone.norm()).item() < 1e-4


def _single_image(inversion, index):
    import dataclasses

    nulls = inversion.null_embeddings
    return dataclasses.replace(
        inversion, trajectory=inversion.trajectory[:, index:index + 1],
        null_embeddings=None if nulls is None else [tuple(e[index:index + 1] for e in s) for s in nulls])


def test_node_interface(comfy_host):
    spec = node_module.MagEdit.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "inversion", "source_positive", "target_positive", "negative", "mask",
                          "edit_words", "steps", "cfg", "optimized_steps", "iterations", "scale", "loss",
                          "cross_injection", "self_injection", "blend_steps"]
    defaults = {name: spec[name][1].get("default") for name in spec if len(spec[name]) > 1}
    assert defaults["steps"] == 50 and defaults["cfg"] == 7.5 and defaults["optimized_steps"] == 25
    assert defaults["iterations"] == 15 and defaults["scale"] == 2.5 and defaults["loss"] == "token"
    assert defaults["cross_injection"] == 0.8 and defaults["self_injection"] == 0.5
    assert defaults["blend_steps"] == 15
    assert spec["loss"][0] == ["token", "spatial", "both"]
    assert node_module.NODE_CLASS_MAPPINGS == {"AttentionEditMAGEdit": node_module.MagEdit}
    assert node_module.MagEdit.CATEGORY == "attention_edit/mag_edit"
    assert node_module.MagEdit.RETURN_TYPES == ("LATENT", "IMAGE")


def test_latent_size_mask_and_progress(comfy_host):
    mask = torch.zeros(16, 16)
    mask[4:12, 5:12] = 0.3  # soft values count as inside
    ticks = []
    with torch.inference_mode():
        result = magedit.mag_edit(model("sd15"), inverted("sd15"), encode("sd15", SOURCE), encode("sd15", TARGET),
                                  encode("sd15", EMPTY), mask, ["red"], CONFIG,
                                  progress=lambda done, total: ticks.append((done, total)))
    assert torch.equal(result.latent_mask[0, 0], (mask != 0).float())
    total = magedit.progress_total(CONFIG)
    assert total == 3 * 2 + STEPS and ticks[-1] == (total, total) and len(ticks) == total


@pytest.mark.parametrize("kwargs,message", [
    ({"words": "blue"}, "edit word"),
    ({"words": " , "}, "at least one edit word"),
    ({"target": "dogs", "words": "dogs"}, "share no words"),
    ({"mask": torch.zeros(1, 128, 128)}, "empty"),
    ({"mask": box_mask(size=128)[:, :, :96]}, "aspect"),
    ({"mask": box_mask(box=(1, 3, 1, 3))}, "vanishes"),
    ({"steps": 4}, "steps"),
])
def test_clear_errors(kwargs, message, comfy_host):
    with pytest.raises(ValueError, match=message):
        run_node(**kwargs)


def test_inversion_from_another_model_is_rejected(comfy_host):
    other = inverted("sd15", seed=1, null_text=False)
    with pytest.raises(ValueError, match="different MODEL"):
        run_node(inversion=other)


def test_prompts_must_be_the_inversions_and_controlnet_is_refused(comfy_host):
    inversion = inverted("sd15")
    source, target, empty = encode("sd15", SOURCE), encode("sd15", TARGET), encode("sd15", EMPTY)
    other_source = encode("sd15", "a photo of a dog on a sofa")
    with_control = [[c, {**o, "control": object()}] for c, o in target]
    cases = [((other_source, target, empty), "source positive is not the prompt the INVERSION"),
             ((source, target, encode("sd15", "blurry")), "negative is not the one the INVERSION"),
             ((source, with_control, empty), "does not support ControlNet")]
    for (src, tgt, neg), message in cases:
        with pytest.raises(ValueError, match=message):
            with torch.inference_mode():
                magedit.plan_edit(model("sd15"), inversion, src, tgt, neg, box_mask(), "red", CONFIG)
