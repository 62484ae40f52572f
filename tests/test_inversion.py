"""Inversion (samplers/inversion.py, nodes/inversion.py) and UNet gradients (samplers/grad.py).

Real ComfyUI host, tiny random-weight models, everything called inside `torch.inference_mode()`
as ComfyUI runs nodes, with models built there too (ComfyUI loads weights under inference mode,
so they are inference tensors).

A random UNet is no denoiser: its eps turns as x moves, so DDIM inversion's one approximation,
eps(x_{t-1}, t) for eps(x_t, t), is far off (reconstruction errors ~9x the latent at 10 steps).
Exactness is therefore tested with an input-blind UNet (first conv zeroed: eps depends on t and
the prompt only), where DDIM inversion is exact and any error is bookkeeping; the approximation
itself is tested step by step against the official formulas with the ordinary UNet.
"""
import copy

import pytest
import torch

from ae_testlib import fixtures, host
from ae_testlib.pack import pack_module

host.import_host()

import comfy.model_sampling  # noqa: E402

inversion = pack_module("samplers.inversion")
grad = pack_module("samplers.grad")
node_module = pack_module("nodes.inversion")

SOURCE, EMPTY = "a photo of a cat on a sofa", ""
STEPS = 5
# Float32 rounding only: latents grow to ~50x the clean one at sigma_max and 2 * STEPS updates
# each round at ~6e-8 of that (measured ~4e-7 relative).
EXACT_TOL = 1e-5


def encode(family, text):
    clip = fixtures.clip(family)
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def build(family, seed=0, input_blind=False):
    """A tiny model built under inference mode, as ComfyUI loads one."""
    with torch.inference_mode():
        model = host.build_model(family, seed=seed)
        if input_blind:
            model.model.diffusion_model.input_blocks[0][0].weight.zero_()
    return model


def relative_error(result, target):
    return ((result - target).norm() / target.norm()).item()


def source_latent(batch=1, height=8, width=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, height, width, generator=generator)


# --------------------------------------------------------------------------------------------
# Schedule and agreement with the official DDIM formulas
# --------------------------------------------------------------------------------------------

def test_schedule_is_official_ddim_50():
    model_sampling = build("sd15").get_model_object("model_sampling")
    timesteps, sigmas = inversion.ddim_schedule(model_sampling, 50)
    assert timesteps.tolist() == list(range(980, -1, -20))
    alphas_cumprod = 1.0 / (1.0 + model_sampling.sigmas.double() ** 2)
    expected = ((1 - alphas_cumprod[timesteps]) / alphas_cumprod[timesteps]).sqrt().float()
    torch.testing.assert_close(sigmas[:-1], expected, rtol=1e-5, atol=0)
    assert sigmas[-1] == sigmas[-2]  # set_alpha_to_one=False: the last step ends at t = 0's level


def _official_eps(model, x_ddpm, t, cond, alpha):
    """The raw UNet's eps at DDPM-scaled x (v converted as diffusers does for v-prediction)."""
    out = model.model.diffusion_model(x_ddpm, torch.tensor([float(t)]), context=cond)
    if isinstance(model.model.model_sampling, comfy.model_sampling.V_PREDICTION):
        return alpha.sqrt() * out + (1 - alpha).sqrt() * x_ddpm
    return out


@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_inversion_steps_match_official_ddim_formulas(family):
    """Each step equals the official next_step (null-text ddim_loop) on the same UNet."""
    model = build(family)
    positive = encode(family, SOURCE)
    with torch.inference_mode():
        result, _ = inversion.invert(model, positive, encode(family, EMPTY),
                                     source_latent(height=16, width=16), steps=STEPS, null_text=False)
        alphas = 1.0 / (1.0 + result.sigmas ** 2)
        alphas_cumprod = 1.0 / (1.0 + model.model.model_sampling.sigmas ** 2)
        ddpm = result.trajectory * alphas.sqrt().view(-1, 1, 1, 1, 1)
        for i, t in enumerate(result.timesteps.tolist()):
            alpha_from, alpha_to = alphas[i + 1], alphas_cumprod[t]
            eps = _official_eps(model, ddpm[i + 1], t, positive[0][0], alpha_to)
            x0 = (ddpm[i + 1] - (1 - alpha_from).sqrt() * eps) / alpha_from.sqrt()
            official = alpha_to.sqrt() * x0 + (1 - alpha_to).sqrt() * eps
            torch.testing.assert_close(ddpm[i], official, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_plain_inversion_reconstructs_exactly(family, cfg):
    """CFG 1 inverts and samples under the source prompt, CFG 0 under the negative alone."""
    model = build(family, input_blind=True)
    latent = source_latent()
    with torch.inference_mode():
        result, _ = inversion.invert(model, encode(family, SOURCE), encode(family, EMPTY), latent,
                                     steps=STEPS, null_text=False, inversion_cfg=cfg)
        assert result.null_embeddings is None
        reconstruction = inversion.reconstruct(model, result, cfg=cfg)
    assert relative_error(reconstruction, latent) < EXACT_TOL
    assert relative_error(result.trajectory[-1], latent * model.model.latent_format.scale_factor) < 1e-6


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_null_text_lowers_reconstruction_error_at_cfg(family):
    model = build(family, input_blind=True)
    latent = source_latent()
    positive, negative = encode(family, SOURCE), encode(family, EMPTY)
    with torch.inference_mode():
        plain, _ = inversion.invert(model, positive, negative, latent, steps=STEPS, null_text=False)
        optimised, _ = inversion.invert(model, positive, negative, latent, steps=STEPS, null_text=True,
                                        inner_iterations=3, cfg=7.5)
        plain_error = relative_error(inversion.reconstruct(model, plain, cfg=7.5), latent)
        null_text_error = relative_error(inversion.reconstruct(model, optimised), latent)
    assert null_text_error < 0.9 * plain_error
    uncond_shape = negative[0][0].shape
    assert len(optimised.null_embeddings) == STEPS
    assert all(step[0].shape == uncond_shape for step in optimised.null_embeddings)


# --------------------------------------------------------------------------------------------
# Node: batch, non-square latents, progress, caller's model untouched
# --------------------------------------------------------------------------------------------

def run_node(model, family, latent, **options):
    settings = dict(steps=STEPS, null_text=True, inner_iterations=2, cfg=7.5) | options
    with torch.inference_mode():
        return node_module.InversionNode().invert(model, encode(family, SOURCE), encode(family, EMPTY),
                                                  {"samples": latent}, **settings)


def test_node_interface():
    node = node_module.InversionNode
    assert node_module.NODE_CLASS_MAPPINGS == {"AttentionEditInversion": node}
    assert node_module.NODE_DISPLAY_NAME_MAPPINGS == {
        "AttentionEditInversion": "Inversion (DDIM / Null-text)"}
    required = node.INPUT_TYPES()["required"]
    assert list(required) == ["model", "positive", "negative", "latent", "steps", "null_text",
                              "inner_iterations", "cfg"]
    defaults = [required[k][1]["default"] for k in ("steps", "null_text", "inner_iterations", "cfg")]
    assert defaults == [50, True, 10, 7.5]
    assert all("tooltip" in options for _, options in required.values())
    assert node.RETURN_TYPES == ("INVERSION", "LATENT")
    assert node.CATEGORY == "attention_edit/mag_edit"
    assert callable(getattr(node(), node.FUNCTION))


@pytest.mark.parametrize("family, height, width", [("sd15", 6, 10), ("sdxl", 12, 20)])
def test_node_batch_of_two_non_square(family, height, width):
    model = build(family)
    latent = source_latent(batch=2, height=height, width=width)
    result, noise = run_node(model, family, latent)
    assert result.trajectory.shape == (STEPS + 1, 2, 4, height, width)
    assert noise["samples"].shape == latent.shape
    torch.testing.assert_close(noise["samples"] * model.model.latent_format.scale_factor, result.noise)
    assert all(step[0].shape[0] == 2 for step in result.null_embeddings)
    assert torch.isfinite(result.trajectory).all()


def test_batch_images_are_inverted_independently():
    model = build("sd15")
    latent = source_latent(batch=2, height=16, width=16)
    batched, _ = run_node(model, "sd15", latent, null_text=False)
    alone, _ = run_node(model, "sd15", latent[1:], null_text=False)
    torch.testing.assert_close(batched.trajectory[:, 1:], alone.trajectory, rtol=1e-4, atol=1e-4)


def test_progress_reaches_the_total():
    model = build("sd15")
    reports = []
    with torch.inference_mode():
        inversion.invert(model, encode("sd15", SOURCE), encode("sd15", EMPTY), source_latent(), steps=STEPS,
                         inner_iterations=2, progress=lambda done, total: reports.append((done, total)))
    assert reports == [(done, 2 * STEPS) for done in range(1, 2 * STEPS + 1)]


def test_caller_model_is_untouched():
    model = build("sd15")
    options = copy.deepcopy(model.model_options)
    params = dict(model.model.named_parameters())
    with torch.inference_mode():
        for param in params.values():
            param.requires_grad_(False)  # as ComfyUI's weight loading leaves them
        values = {name: p.clone() for name, p in params.items()}
    run_node(model, "sd15", source_latent())
    assert model.model_options == options
    assert dict(model.model.named_parameters()) == params  # the same objects
    for name, param in params.items():
        assert torch.equal(param, values[name]), name
        assert not param.requires_grad and param.grad is None and param.is_inference()


# --------------------------------------------------------------------------------------------
# Model fingerprint
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd15_inversion():
    model = build("sd15")
    with torch.inference_mode():
        result, _ = inversion.invert(model, encode("sd15", SOURCE), encode("sd15", EMPTY), source_latent(),
                                     steps=STEPS, null_text=False)
    return model, result


def test_same_model_is_accepted(sd15_inversion):
    model, result = sd15_inversion
    with torch.inference_mode():
        inversion.reconstruct(model.clone(), result, cfg=1.0)


@pytest.mark.parametrize("other, named", [
    (lambda model: build("sd15", seed=7), "weights"),
    (lambda model: build("sdxl"), "model type"),
    (lambda model: _with_lora_patch(model), "weight patches"),
])
def test_inversion_from_another_model_is_rejected(sd15_inversion, other, named):
    model, result = sd15_inversion
    with torch.inference_mode(), pytest.raises(ValueError, match="different MODEL") as error:
        inversion.reconstruct(other(model), result, cfg=1.0)
    assert named in str(error.value) and "Inversion node" in str(error.value)


def _with_lora_patch(model):
    patched = model.clone()
    key = "diffusion_model.out.2.weight"
    with torch.inference_mode():
        patched.add_patches({key: (torch.zeros_like(model.model.state_dict()[key]),)}, 1.0)
    return patched


def test_step_count_mismatch_names_both_counts(sd15_inversion):
    model, result = sd15_inversion
    with pytest.raises(ValueError, match=f"has {STEPS} steps but steps is 30.*steps=30"):
        inversion.check_inversion(result, model, steps=30)


# --------------------------------------------------------------------------------------------
# Gradients through the UNet inside ComfyUI's inference mode
# --------------------------------------------------------------------------------------------

def _unet_scalar(model, x, context, sigma, weights):
    return (model.model.apply_model(x, sigma, c_crossattn=context) * weights).sum()


@pytest.mark.parametrize("weights_from_inference_mode", [False, True])
@pytest.mark.parametrize("wrt, h", [("latent", 1e-2), ("text embedding", 1e-1)])
def test_gradient_matches_central_finite_difference(weights_from_inference_mode, wrt, h):
    """d(sum w * denoised)/d input vs central differences along the gradient and a random direction.

    Errors are measured against |gradient| (a 1e-3 tolerance bounds the angle and the length
    error). 16x16 latents keep the tiny UNet smooth (at 8x8 its 1x1 bottleneck GroupNorms
    normalise two values each). Richardson extrapolation over h and 2h removes the O(h^2) error
    of a central difference, so h can be large enough for float32 rounding of the scalar (~30)
    divided by h to stay near 1e-4 of |gradient|.
    """
    model = build("sd15") if weights_from_inference_mode else host.build_model("sd15")
    generator = torch.Generator().manual_seed(3)
    with torch.inference_mode(), torch.no_grad():  # as a ComfyUI node running a sampler
        latent = torch.randn(1, 4, 16, 16, generator=generator)
        context = encode("sd15", SOURCE)[0][0]
        sigma, weights = torch.tensor([2.0]), torch.randn(latent.shape, generator=generator)
        inputs = {"latent": latent, "text embedding": context}
        with grad.autograd_through(model.model):
            leaves = {name: grad.leaf(t, requires_grad=name == wrt) for name, t in inputs.items()}
            _, (gradient,) = grad.loss_and_grad(
                lambda: _unet_scalar(model, leaves["latent"], leaves["text embedding"], grad.leaf(sigma),
                                     grad.leaf(weights)), [leaves[wrt]])

        def directional_derivative(direction):
            def at(step):
                moved = dict(inputs, **{wrt: inputs[wrt] + step * direction})
                return _unet_scalar(model, moved["latent"], moved["text embedding"], sigma, weights).item()

            def central(step):
                return (at(step) - at(-step)) / (2 * step)
            return (4 * central(h) - central(2 * h)) / 3

        scale = gradient.norm().item()
        random = torch.randn(gradient.shape, generator=generator)
        for direction in (gradient / scale, random / random.norm()):
            expected = (gradient * direction).sum().item()
            assert abs(directional_derivative(direction) - expected) < 1e-3 * scale


@pytest.mark.parametrize("requires_grad", [False, True])
def test_autograd_through_leaves_the_module_as_found(requires_grad):
    model = build("sd15")
    params = dict(model.model.named_parameters())
    with torch.inference_mode():
        for param in params.values():
            param.requires_grad_(requires_grad)
        values = {name: p.clone() for name, p in params.items()}
        context = encode("sd15", SOURCE)[0][0]
        with grad.autograd_through(model.model):
            inside = dict(model.model.named_parameters())
            assert all(not p.is_inference() and not p.requires_grad for p in inside.values())
            assert all(inside[n].data_ptr() == params[n].data_ptr() for n in params)  # aliases, not copies
            latent = grad.leaf(source_latent(height=16, width=16), requires_grad=True)
            sigma = grad.leaf(torch.tensor([1.0]))
            grad.loss_and_grad(
                lambda: model.model.apply_model(latent, sigma, c_crossattn=context).square().mean(), [latent])
    assert dict(model.model.named_parameters()) == params
    for name, param in params.items():
        assert param.requires_grad == requires_grad and param.grad is None and param.is_inference()
        assert torch.equal(param, values[name]), name
