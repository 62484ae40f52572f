"""DDIM inversion and null-text inversion on ComfyUI models; the matching DDIM reconstruction.

Follows MAG-Edit's official code (HelenMao/MAG-Edit code_tr/network.py L634-700, Mokady et al.'s
null-text inversion): diffusers DDIM (scaled_linear, set_alpha_to_one=False, steps_offset 0, so
timesteps 980, 960, ..., 0 for 50 steps); DDIM inversion under the source prompt at guidance 1
(`ddim_loop` / `next_step`); then per step Adam on the unconditional embedding (10 iterations,
lr 1e-2 (1 - i/100), stop when loss < 1e-5 + i 2e-5) so that the CFG-7.5 DDIM step from the
current latent lands on the inversion trajectory (`null_optimization`).

ComfyUI's sampler space is x = x0 + sigma eps (the UNet sees x / sqrt(1 + sigma^2)). There DDIM
with eta 0 is exactly an Euler step in sigma, x_next = x + (sigma_next - sigma) eps: DDIM's
x' = sqrt(abar') x0 + sqrt(1 - abar') eps divided by sqrt(abar') with abar = 1 / (1 + sigma^2).
Latents are kept in that space (after process_latent_in). The source latent is x at sigma(0),
ComfyUI's convention for a clean latent; the official code reads it as the DDPM latent at
alphas_cumprod[0], which is 1 / sqrt(1 + sigma(0)^2) = 0.99957 times ours.
"""
import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
import torch.nn.functional as F

from ..masks.validate import check_finite, check_number
from .common import check_latent, check_sampling, refuse_dit
from .grad import autograd_through, leaf, loss_and_grad, refuse_controlnet


@dataclass(frozen=True)
class Inversion:
    """INVERSION: a source latent's DDIM trajectory and what retraces it.

    Latents are in the sampler space, in sampling order; step i goes from sigmas[i] to
    sigmas[i + 1] with the UNet at timesteps[i].
    """
    trajectory: torch.Tensor  # [steps + 1, B, C, H, W]; [0] = z_T, [-1] = the source latent
    timesteps: torch.Tensor  # [steps], 980 ... 0 for 50 steps
    sigmas: torch.Tensor  # [steps + 1]; the last step is zero-width (both ends sigma(0))
    null_embeddings: Optional[list]  # per step: tuple of uncond cross-attention tensors [B, T, C]
    positive: list  # the source CONDITIONING
    negative: list  # the unconditional CONDITIONING; null embeddings replace its text per step
    cfg: float  # the CFG to reconstruct at (null-text optimised for it)
    fingerprint: dict  # `model_fingerprint` of the inverting model

    @property
    def noise(self):
        """z_T, where sampling starts."""
        return self.trajectory[0]

    @property
    def steps(self):
        return len(self.timesteps)


@dataclass
class SamplingRun:
    """What a sampling loop gets inside ComfyUI's CFGGuider: the loaded model, processed conds."""
    model: object  # comfy.model_base.BaseModel, loaded and patched
    conds: dict  # "positive" / "negative": processed cond lists (calc_cond_batch's input)
    model_options: dict
    x: torch.Tensor  # the LATENT after process_latent_in
    sigmas: torch.Tensor


# --------------------------------------------------------------------------------------------
# Schedule and DDIM step
# --------------------------------------------------------------------------------------------

def ddim_schedule(model_sampling, steps):
    """(timesteps [steps], sigmas [steps + 1]) of diffusers' DDIM, leading spacing, offset 0.

    Step i goes from t_i to t_i - T // steps; the last goes to final_alpha_cumprod =
    alphas_cumprod[0] (set_alpha_to_one=False), the level of t = 0, so it is zero-width.
    """
    train_steps = len(model_sampling.sigmas)
    if not 1 <= steps <= train_steps:
        raise ValueError(f"'steps' must be between 1 and {train_steps} (the model's training steps), got {steps}.")
    timesteps = torch.arange(steps - 1, -1, -1) * (train_steps // steps)
    sigmas = model_sampling.sigma(timesteps.float()).float().cpu()
    return timesteps, torch.cat([sigmas, sigmas[-1:]])


def predicted_noise(x, denoised, sigma):
    """eps of a denoised prediction for x at sigma (x = x0 + sigma eps)."""
    return (x - denoised) / sigma


def ddim_step(x, eps, sigma, sigma_next):
    """DDIM with eta 0 in sigma form (either direction)."""
    return x + (sigma_next - sigma) * eps


def _batch_sigma(sigma, x):
    return sigma * x.new_ones(x.shape[0])


def _input_scale(model_sampling, sigma):
    """The factor the model applies to x at sigma (1 / sqrt(1 + sigma^2) for eps and v models)."""
    return model_sampling.calculate_input(sigma.reshape(1), torch.ones_like(sigma).reshape(1))


# --------------------------------------------------------------------------------------------
# Model identity
# --------------------------------------------------------------------------------------------

def model_fingerprint(model):
    """What decides an inversion besides the prompts: model kind, base weights, weight patches.

    The weights part hashes the first and last two parameters that no weight patch touches, so
    it ignores whether LoRAs are applied in place; the LoRAs themselves are `patches_uuid`.
    Call it while `model` is loaded for sampling (other patchers' in-place patches undone).
    """
    base = model.model
    sampling = type(model.get_model_object("model_sampling"))
    kinds = [cls.__name__ for cls in sampling.__mro__ if cls.__module__.endswith("model_sampling")]
    unpatched = [(name, p) for name, p in base.named_parameters() if name not in model.patches]
    digest = hashlib.sha256()
    for name, tensor in unpatched[:2] + unpatched[-2:]:
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return {
        "model type": f"{type(base).__name__} ({'/'.join(kinds)})",
        "weights": digest.hexdigest()[:16],
        "weight patches (LoRA)": str(model.patches_uuid),
    }


def check_inversion(inversion, model, steps=None):
    """Raise ValueError saying what differs when `inversion` was not made by `model` (and steps).

    Call it inside sampling (see `model_fingerprint`).
    """
    if steps is not None and steps != inversion.steps:
        raise ValueError(
            f"The INVERSION input has {inversion.steps} steps but steps is {steps}: set steps to "
            f"{inversion.steps}, or run the Inversion node with steps={steps}.")
    current = model_fingerprint(model)
    differs = [key for key, value in current.items() if inversion.fingerprint.get(key) != value]
    _, sigmas = ddim_schedule(model.get_model_object("model_sampling"), inversion.steps)
    if not torch.allclose(sigmas, inversion.sigmas):
        differs.append("noise schedule")
    if differs:
        raise ValueError(
            f"The INVERSION input was made with a different MODEL (differs in: {', '.join(differs)}). "
            "Connect the same MODEL, after the same LoRA and model patches, to the Inversion node "
            "and to this node, or re-run the Inversion node with this model.")


# --------------------------------------------------------------------------------------------
# Guided prediction inside a ComfyUI sampling run
# --------------------------------------------------------------------------------------------

def run_sampling_loop(model, conds, latent, sigmas, loop):
    """Run `loop(SamplingRun) -> x` as the sampler of a ComfyUI CFGGuider holding `conds` (a dict
    of CONDITIONING by name, e.g. positive / negative); return x as LATENT samples.

    The guider loads the model and applies its patches, hooks and wrappers and processes the
    conds as a KSampler does; no noise is added, so run.x is `latent` after process_latent_in.
    The returned x goes through process_latent_out.
    """
    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model_k.inner_model
        return loop(SamplingRun(guider.inner_model, guider.conds, extra_args["model_options"], x, sigmas))

    guider = comfy.samplers.CFGGuider(model)
    guider.inner_set_conds(conds)
    samples = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(sampler_function),
                            sigmas, disable_pbar=True)
    return samples.to(comfy.model_management.intermediate_device())


def guided_denoised(model, x, sigma, cond, uncond, cfg, model_options, cond_denoised=None):
    """comfy.samplers.sampling_function's CFG denoised x, pre- and post-CFG functions included
    (not upstream's sampler_calc_cond_batch_function override).

    `model` is the loaded BaseModel (SamplingRun.model), `sigma` per sample ([B]).
    `cond_denoised` reuses a cond prediction for the same x and sigma (null-text evaluates only
    the unconditional branch in its inner loop).
    """
    if math.isclose(cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond = None
    to_run = [None if cond_denoised is not None else cond, uncond]
    out = comfy.samplers.calc_cond_batch(model, to_run, x, sigma, model_options)
    if cond_denoised is not None:
        out[0] = cond_denoised
    for fn in model_options.get("sampler_pre_cfg_function", []):  # only in newer ComfyUI
        out = fn({"conds": [cond, uncond], "conds_out": out, "cond_scale": cfg, "timestep": sigma,
                  "input": x, "sigma": sigma, "model": model, "model_options": model_options})
    return comfy.samplers.cfg_function(model, out[0], out[1], cfg, x, sigma, model_options=model_options,
                                       cond=cond, uncond=uncond)


def cross_attn_embeddings(conds):
    """The text embeddings of processed conds, in entry order (entries without one skipped)."""
    return [c["model_conds"]["c_crossattn"].cond for c in conds if "c_crossattn" in c["model_conds"]]


def with_cross_attn(conds, embeddings):
    """Copies of processed conds whose text embeddings are `embeddings` (in entry order)."""
    replacements = iter(embeddings)
    replaced = []
    for c in conds:
        model_conds = c["model_conds"]
        if "c_crossattn" in model_conds:
            embedding = next(replacements)
            model_conds = {**model_conds, "c_crossattn": type(model_conds["c_crossattn"])(embedding)}
            c = {**c, "cross_attn": embedding} if "cross_attn" in c else c
        replaced.append({**c, "model_conds": model_conds})
    return replaced


# --------------------------------------------------------------------------------------------
# Inversion
# --------------------------------------------------------------------------------------------

def invert(model, positive, negative, latent, steps=50, null_text=True, inner_iterations=10, cfg=7.5,
           inversion_cfg=1.0, progress=None):
    """DDIM-invert `latent` (LATENT samples) under `positive`, optionally with null-text.

    inversion_cfg: guidance of the inversion pass (official: 1, the source prompt alone; 0
    inverts under `negative` alone). With null_text, the text embeddings of `negative` are
    optimised per step for CFG `cfg` sampling. progress(done, total) is called after each step.
    Returns (INVERSION, z_T as LATENT samples: what a KSampler with add_noise off starts from).
    """
    refuse_dit(model, "Inversion (DDIM / null-text)")
    check_sampling(steps, cfg)
    check_number(inner_iterations, "inner_iterations", 1, integer=True)
    check_number(inversion_cfg, "inversion_cfg", 0.0)
    check_latent(model, latent, "latent")
    if null_text and math.isclose(cfg, 1.0):
        raise ValueError("Null-text optimisation needs cfg != 1: at cfg 1 the unconditional branch "
                         "has no effect. Set cfg (official 7.5) or turn null_text off.")
    if null_text:
        refuse_controlnet(positive, negative, method="Null-text inversion")
    timesteps, sigmas = ddim_schedule(model.get_model_object("model_sampling"), steps)
    total = steps * (2 if null_text else 1)
    report = progress or (lambda done, total: None)
    found = {}

    def loop(run):
        store = comfy.model_management.intermediate_device()
        trajectory = _inversion_trajectory(run, inversion_cfg, lambda done: report(done, total))
        if null_text:
            nulls = _null_text_optimisation(run, trajectory, cfg, inner_iterations,
                                            lambda done: report(steps + done, total))
            found["null_embeddings"] = [tuple(e.to(store) for e in step) for step in nulls]
        # Once, after the loops: a NaN anywhere spreads to the whole trajectory.
        check_finite(trajectory, "the inversion trajectory")
        found["trajectory"] = trajectory.to(store)
        found["fingerprint"] = model_fingerprint(model)
        return trajectory[0]

    noise = run_sampling_loop(model, {"positive": positive, "negative": negative}, latent, sigmas, loop)
    inversion = Inversion(trajectory=found["trajectory"], timesteps=timesteps, sigmas=sigmas,
                          null_embeddings=found.get("null_embeddings"), positive=positive,
                          negative=negative, cfg=cfg, fingerprint=found["fingerprint"])
    return inversion, noise


def _inversion_trajectory(run, cfg, on_step):
    """The official ddim_loop: source latent up to z_T; [steps + 1, ...] in sampling order."""
    model_sampling = run.model.model_sampling
    steps = len(run.sigmas) - 1
    x = run.x
    latents = [x]
    for i in reversed(range(steps)):
        sigma_from, sigma_to = run.sigmas[i + 1], run.sigmas[i]
        if sigma_to != sigma_from:
            # next_step: the UNet sees x_{t-1} (its DDPM-scaled input at sigma_from) with timestep t.
            x_in = x * (_input_scale(model_sampling, sigma_from) / _input_scale(model_sampling, sigma_to))
            denoised = guided_denoised(run.model, x_in, _batch_sigma(sigma_to, x), run.conds["positive"],
                                       run.conds.get("negative"), cfg, run.model_options)
            x = ddim_step(x, predicted_noise(x_in, denoised, sigma_to), sigma_from, sigma_to)
        latents.append(x)
        on_step(steps - i)
    return torch.stack(latents[::-1])


def _null_text_optimisation(run, trajectory, cfg, inner_iterations, on_step):
    """The official null_optimization; returns per step the optimised uncond embeddings.

    Each image of a batch gets its own embedding (the official code inverts one image).
    """
    negative = run.conds["negative"]
    batch = trajectory.shape[1]
    embeddings = [comfy.utils.repeat_to_batch_size(e, batch).to(run.x.device, torch.float32)
                  for e in cross_attn_embeddings(negative)]
    if not embeddings:
        raise ValueError("The negative conditioning has no text embedding for null-text optimisation.")
    per_step = []
    with autograd_through(run.model):
        x, sigmas = leaf(trajectory[0]), leaf(run.sigmas)
        for i in range(len(sigmas) - 1):
            if sigmas[i + 1] != sigmas[i]:
                embeddings, x = _null_text_step(run, x, leaf(trajectory[i + 1]), i, sigmas[i:i + 2],
                                                embeddings, cfg, inner_iterations)
            per_step.append(tuple(embeddings))
            on_step(i + 1)
    return per_step


def _null_text_step(run, x, target, i, sigma_pair, embeddings, cfg, inner_iterations):
    """Optimise the embeddings for step i, then take the step; returns (embeddings, next x)."""
    model_sampling = run.model.model_sampling
    sigma, sigma_next = sigma_pair
    sigma_batch = _batch_sigma(sigma, x)
    cond, negative = run.conds["positive"], run.conds["negative"]

    def step(uncond_embeddings, cond_denoised):
        uncond = with_cross_attn(negative, uncond_embeddings)
        denoised = guided_denoised(run.model, x, sigma_batch, cond, uncond, cfg, run.model_options,
                                   cond_denoised)
        return ddim_step(x, predicted_noise(x, denoised, sigma), sigma, sigma_next)

    with torch.no_grad():
        (cond_denoised,) = comfy.samplers.calc_cond_batch(run.model, [cond], x, sigma_batch,
                                                          run.model_options)
    # The official loss is the MSE of DDPM-scaled latents, x / sqrt(1 + sigma^2) here; the scale
    # matters for its early-stop threshold.
    scale = _input_scale(model_sampling, sigma_next)
    params = [leaf(e, requires_grad=True) for e in embeddings]
    optimizer = torch.optim.Adam(params, lr=1e-2 * (1.0 - i / 100.0))
    for _ in range(inner_iterations):
        loss, grads = loss_and_grad(lambda: F.mse_loss(step(params, cond_denoised) * scale, target * scale),
                                    params)
        for param, grad in zip(params, grads):
            param.grad = grad
        optimizer.step()
        if loss.item() < 1e-5 + i * 2e-5:
            break
    embeddings = [p.detach() for p in params]
    for embedding in embeddings:  # the loop syncs on the loss every iteration anyway
        check_finite(embedding, f"the null-text embedding of step {i}")
    with torch.no_grad():
        return embeddings, step(embeddings, cond_denoised)


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------

def reconstruction_uncond(inversion, step, negative):
    """Processed unconditional conds of sampling step `step`: `negative` with that step's null
    embeddings (unchanged for a plain DDIM inversion)."""
    if inversion.null_embeddings is None:
        return negative
    return with_cross_attn(negative, inversion.null_embeddings[step])


def reconstruction_step(run, inversion, step, x, cfg):
    """One CFG DDIM step of the reconstruction branch: x at sigmas[step] -> sigmas[step + 1]."""
    sigma, sigma_next = run.sigmas[step], run.sigmas[step + 1]
    if sigma_next == sigma:
        return x
    uncond = reconstruction_uncond(inversion, step, run.conds["negative"])
    denoised = guided_denoised(run.model, x, _batch_sigma(sigma, x), run.conds["positive"], uncond, cfg,
                               run.model_options)
    return ddim_step(x, predicted_noise(x, denoised, sigma), sigma, sigma_next)


def reconstruct(model, inversion, cfg=None, progress=None):
    """DDIM-sample from z_T under the source prompt (and null embeddings); LATENT samples.

    cfg defaults to the inversion's. Raises ValueError when `model` is not the inverting model.
    """
    cfg = inversion.cfg if cfg is None else cfg
    report = progress or (lambda done, total: None)

    def loop(run):
        check_inversion(inversion, model)
        x = inversion.noise.to(run.x)
        for step in range(inversion.steps):
            x = reconstruction_step(run, inversion, step, x, cfg)
            report(step + 1, inversion.steps)
        return x

    return run_sampling_loop(model, {"positive": inversion.positive, "negative": inversion.negative},
                             torch.zeros_like(inversion.noise), inversion.sigmas, loop)
