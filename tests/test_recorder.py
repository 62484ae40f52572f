"""The attention recorder on the real ComfyUI host: exact probabilities, composition with other
patches, no trace left, and every model family / batch / aspect ratio."""
import pytest
import torch

from ae_testlib import fixtures
from ae_testlib.pack import pack_module

layers_mod = pack_module("attention.layers")
recorder_mod = pack_module("attention.recorder")
record = pack_module("samplers.record")
common = pack_module("samplers.common")

STEPS = 3


def sample_plain(model, positive, negative, latent, steps=STEPS, seed=1):
    sigmas = common.schedule(model, steps, "euler", "normal", 1.0)
    with torch.inference_mode():
        return common.ksample(model, seed, steps, 7.5, "euler", "normal", positive, negative, latent,
                              sigmas)["samples"]


def sample_recording(model, positive, negative, latent, **kwargs):
    with torch.inference_mode():
        out, maps = record.sample_recording(model, 1, kwargs.pop("steps", STEPS), 7.5, "euler", "normal",
                                            positive, negative, latent, **kwargs)
    return out["samples"], maps


def prompts(family, text="a photo of a shiba dog"):
    return fixtures.encode(family, text), fixtures.encode(family, "")


class CapturingPatch:
    """A pre-existing replace patch (like IPAdapter's): changes the layer output and keeps q, k."""

    def __init__(self, scale=1.5):
        self.scale = scale
        self.seen = []
        self.moved_to = []

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        self.seen.append((q.clone(), k.clone(), list(extra_options["cond_or_uncond"]), extra_options["n_heads"]))
        return optimized_attention(q, k, v * self.scale, extra_options["n_heads"])

    def to(self, device):
        self.moved_to.append(device)
        return self

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies patches; keep one spy
        return self


def with_patch(model, patch, level=2):
    patched = model.clone()
    for layer in layers_mod.select_layers(patched, level):
        patched.set_model_attn2_replace(patch, *layer.key)
    return patched


def test_recorded_probabilities_equal_explicit_softmax(comfy_host):
    model = fixtures.model("sd15")
    positive, negative = prompts("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    spy = CapturingPatch(scale=1.0)
    _, maps = sample_recording(with_patch(model, spy), positive, negative, latent, steps=1)

    expected = []
    for q, k, chunks, heads in spy.seen:
        rows = chunks.index(0)  # the cond chunk (batch 1 per chunk)
        qh = q[rows].double().reshape(q.shape[1], heads, -1).transpose(0, 1)
        kh = k[rows].double().reshape(k.shape[1], heads, -1).transpose(0, 1)
        probs = torch.softmax(qh @ kh.transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
        expected.append(probs.mean(0))
    assert len(expected) == 3  # the 3 level-2 layers of the tiny SD1.5 (real SD1.5: 5), 1 step
    expected = torch.stack(expected).mean(0).reshape(4, 4, -1)
    # float32 scores vs float64 reference: agreement to 1e-6 on probabilities in [0, 1]
    torch.testing.assert_close(maps.probs[0].double(), expected, atol=1e-6, rtol=0)
    assert torch.allclose(maps.probs.sum(-1), torch.ones(1, 4, 4), atol=1e-5)


def test_existing_replace_patch_still_sets_the_output(comfy_host):
    model = fixtures.model("sd15")
    positive, negative = prompts("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    only_patch = sample_plain(with_patch(model, CapturingPatch()), positive, negative, latent)
    plain = sample_plain(model, positive, negative, latent)
    patch = CapturingPatch()
    recorded, maps = sample_recording(with_patch(model, patch), positive, negative, latent)
    assert not torch.equal(only_patch, plain)  # the patch matters...
    assert torch.equal(recorded, only_patch)  # ...and still decides the output under the recorder
    assert len(patch.seen) == 3 * STEPS and maps.probs.shape == (1, 4, 4, 77)


def test_wrapper_forwards_device_moves_and_survives_clone(comfy_host):
    inner = CapturingPatch()
    patched = with_patch(fixtures.model("sd15"), inner)
    recorder = recorder_mod.AttentionRecorder()
    recorder.install(patched, (16, 16))
    wrapped = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    layer_key = recorder.layers[0].key
    assert wrapped[layer_key].inner is inner
    assert wrapped[layer_key].to(torch.device("cpu")) is wrapped[layer_key]
    assert inner.moved_to == [torch.device("cpu")]
    clone = patched.clone()  # deep-copies model_options: the patch must still feed this recorder
    assert clone.model_options["transformer_options"]["patches_replace"]["attn2"][layer_key].recorder is recorder


def test_recording_changes_nothing_and_leaves_no_trace(comfy_host):
    model = fixtures.model("sd15")
    before = repr(model.model_options)
    positive, negative = prompts("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    plain = sample_plain(model, positive, negative, latent)
    first, maps1 = sample_recording(model, positive, negative, latent)
    second, maps2 = sample_recording(model, positive, negative, latent)
    assert torch.equal(first, plain)  # observing attention does not change the sampling
    assert torch.equal(first, second) and torch.equal(maps1.probs, maps2.probs)
    assert repr(model.model_options) == before
    assert "patches_replace" not in model.model_options["transformer_options"]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd2"])
def test_families_batch_and_odd_aspect_ratio(family, comfy_host):
    model = fixtures.model(family)
    positive, negative = prompts(family)
    latent = {"samples": torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))}  # 48x80 px
    samples, maps = sample_recording(model, positive, negative, latent)
    assert samples.shape == (2, 4, 6, 10) and torch.isfinite(samples).all()
    assert maps.probs.shape == (2, 2, 3, 77)  # level 2 of a 6x10 latent: ceil twice
    assert torch.allclose(maps.probs.sum(-1), torch.ones(2, 2, 3), atol=1e-5)
    assert not torch.equal(maps.probs[0], maps.probs[1])  # each image its own maps
    assert maps.word_map("shiba").shape == (2, 2, 3)


def test_branch_and_step_selection(comfy_host):
    model = fixtures.model("sd15")
    positive, negative = prompts("sd15")
    latent_hw = (16, 16)
    sigmas = common.schedule(model, STEPS, "euler", "normal", 1.0)
    results = {}
    for name, kwargs in {"all": {}, "first": {"steps": {0}}, "uncond": {"branch": "uncond"}}.items():
        patched = model.clone()
        recorder = recorder_mod.AttentionRecorder(**kwargs)
        recorder.install(patched, latent_hw, sigmas)
        with torch.inference_mode():
            common.ksample(patched, 1, STEPS, 7.5, "euler", "normal", positive, negative,
                           {"samples": torch.zeros(1, 4, *latent_hw)}, sigmas)
        results[name] = recorder
    assert results["first"].steps_seen == {0}
    assert results["first"].count == 3 and results["all"].count == 3 * STEPS  # layers x steps
    assert not torch.allclose(results["first"].mean(), results["all"].mean())
    assert not torch.allclose(results["uncond"].mean(), results["all"].mean())


def test_map_memory_does_not_grow_with_steps(comfy_host):
    model = fixtures.model("sd15")
    positive, negative = prompts("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    sizes = []
    for steps in (1, 4):
        patched = model.clone()
        recorder = recorder_mod.AttentionRecorder()
        sigmas = common.schedule(patched, steps, "euler", "normal", 1.0)
        recorder.install(patched, (16, 16), sigmas)
        with torch.inference_mode():
            common.ksample(patched, 1, steps, 7.5, "euler", "normal", positive, negative, latent, sigmas)
        sizes.append(recorder.total.numel())
    assert sizes[0] == sizes[1] == 16 * 77


def test_layer_selection_by_resolution(comfy_host):
    sd15 = [layer.key for layer in layers_mod.select_layers(fixtures.model("sd15"), 2)]
    assert sd15 == [("input", 5, 0), ("output", 2, 0), ("output", 3, 0)]
    sdxl = layers_mod.select_layers(fixtures.model("sdxl"), 2, ("input", "middle", "output"))
    assert {layer.part for layer in sdxl} == {"input", "middle", "output"}
    assert len(sdxl) == 2 + 1 + 4  # depth 2 in 1 input block, 1 middle, depth 2 in 2 output blocks
    with pytest.raises(ValueError, match="no cross-attention at 1/8"):
        layers_mod.select_layers(fixtures.model("sd15"), 3)


def test_interrupted_run_leaves_no_trace(comfy_host):
    """An interruption inside the UNet in the middle of sampling (ComfyUI's Cancel raises
    InterruptProcessingException from wherever it is checked) leaves nothing behind."""
    import comfy.model_management

    interrupted = comfy.model_management.InterruptProcessingException
    model = fixtures.model("sd15")
    before = repr(model.model_options)
    positive, negative = prompts("sd15")
    latent = {"samples": torch.zeros(1, 4, 16, 16)}

    class InterruptLater(CapturingPatch):
        def __call__(self, q, k, v, extra_options):
            if len(self.seen) == 4:  # second step
                raise interrupted()
            return super().__call__(q, k, v, extra_options)

    with pytest.raises(interrupted):
        sample_recording(with_patch(model, InterruptLater(scale=1.0)), positive, negative, latent)
    assert repr(model.model_options) == before
    again, _ = sample_recording(model, positive, negative, latent)
    assert torch.equal(again, sample_plain(model, positive, negative, latent))


def test_long_negative_prompt_is_folded_not_lost(comfy_host):
    """A 3-chunk negative makes ComfyUI batch the 77-token positive repeated to 231 keys; the
    recorder folds those back onto the positive's 77 tokens, equal to a short-negative run's maps
    up to the negative's effect on the latent (same first step: same latent input)."""
    model = fixtures.model("sd15")
    positive = fixtures.encode("sd15", "a photo of a shiba dog")
    long_negative = fixtures.encode("sd15", " ".join(f"word{i}" for i in range(60)))
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    _, maps = sample_recording(model, positive, long_negative, latent, steps=1)
    _, reference = sample_recording(model, positive, prompts("sd15")[1], latent, steps=1)
    assert maps.probs.shape == (1, 4, 4, 77)
    torch.testing.assert_close(maps.probs, reference.probs, atol=1e-5, rtol=0)
