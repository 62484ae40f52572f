"""InstDiffEdit (Zou et al., AAAI 2024) as a ComfyUI sampling procedure.

Below, "cross-attention at 1/4 of the latent" is the UNet case; on DiT models (Flux, SD3,
Qwen-Image) the maps are the joint attention's image -> text rows at the token grid, with an
end-token start map (samplers/instdiffedit_capture.py). The loop itself is the same.

The source latent is repeated `copies` times per image, each copy noised with its own noise to
strength r, and denoised with any ComfyUI sampler and scheduler towards the target prompt while
the cond branch's cross-attention at 1/4 of the latent (the official "16x16" layers, down + up)
is recorded as a running mean over the steps so far. After every step the instant mask is
computed from that mean, averaged over the copies of each image (masks/instdiffedit.py; the
position vector P is computed at the first step and then frozen), and the latent is blended
outside the mask with the source noised with the same noise as the copy.

How this maps to the official loop (model/InstDiffEdit.py at 455968b3). Official, per timestep t:

    UNet pass at t (records maps) -> LMS step to x_{t-1} -> mask M_t from the running mean
    -> x_{t-1} = y_t + M_t * (x_{t-1} - y_t),  y_t = source noised to sigma_t (same noise)

ComfyUI's samplers run their own loop, so the blend of step k (schedule sigma_k -> sigma_k+1) is
done at the start of the next model evaluation, the first at the schedule's sigma_k+1: there the
sampler hands its own state x_k+1 to the model and it is blended *in place*, so the sampler's
state (LMS history, DPM++ 2M, ancestral noise...) continues from the blended latent exactly as
the official scheduler does; M_k is computed there, from the maps of every evaluation so far,
i.e. after step k's UNet pass and before step k+1's, as the official order has it. The last
step's blend is applied to the sampler's result. Every step yields one mask, computed on the
sampling device; nothing moves to the CPU inside the loop.

Quirk reproduced by default (background="official"): y is noised to sigma_k, the sigma of the
step just taken, while x_k+1 is at sigma_k+1 (the official code adds noise for `t`, not for the
timestep it stepped to). background="matching" noises y to sigma_k+1 instead, so the final latent
keeps the source exactly outside the mask. Official only uses the final mask (for inpainting);
the blended latents only shape later steps' attention.

Samplers that evaluate the model once per step (euler, euler_ancestral, lms, dpmpp_2m, ddim,
ddpm, lcm, ...) follow the official order exactly. Two-evaluation samplers (heun, dpm_2,
dpmpp_2s_ancestral, dpmpp_sde) also record their mid-step evaluations (all go into the running
mean) and blend whatever they evaluate at a schedule sigma. The mask is binary, so the blend
leaves the latent inside it as it is and replaces it outside: what matters is that every model
evaluation sees the blended latent, which also holds for uni_pc (whose own state is scaled
differently, so only its model input is blended). dpm_fast / dpm_adaptive evaluate off the
schedule and are blended only where they meet it.

Schedule: `steps` is the full schedule's length and the first steps - int(steps * strength) are
skipped, as the official code (diffusers img2img convention: 50 steps at r = 0.5 run 25). ComfyUI's
KSampler would instead run `steps` steps of a longer schedule. lms + normal is the nearest to the
official LMSDiscreteScheduler.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..attention.tokens import recorded_length, tokens_of
from ..masks.validate import check_finite, check_number
from ..masks.video import latent_frame_of, pixel_frames
from .common import (check_latent, check_sampling, latent_broadcast, latent_samples, progress_callback,
                     progress_disabled, schedule)
from .instdiffedit_capture import capture_for, capture_for_maps

BACKGROUNDS = ("official", "matching")


@dataclass
class InstDiffEditResult:
    samples: torch.Tensor  # [B, C, H, W]: the first noise copy of each image (output latent space)
    all_samples: torch.Tensor  # [B * copies, C, H, W], image-major (image 0's copies first)
    mask: torch.Tensor  # [B, H, W] float 0/1 at latent size: the final mask (video: [B, F', H, W])
    step_masks: torch.Tensor  # [steps, B, H, W]: the mask of every denoising step, in order
    position: Optional[torch.Tensor]  # [B, words + 2] P over [BOS, words, EOS], frozen at step 0 (video: [B * F', ...])
    index: Optional[torch.Tensor]  # [B] chosen word (1-based; 0 none), from step 0 (video: [B * F'], per frame)
    sigmas: torch.Tensor  # the schedule that was run (strength applied)
    copies: int
    frames: Optional[int] = None  # video (Wan): latent frames of the masks; None for images
    pixel_scale: int = 8  # pixels per latent cell (Flux.2, Wan 2.2 5B: 16; HunyuanImage: 32)


def edit_schedule(model, steps, sampler_name, scheduler, strength):
    """The last int(steps * strength) steps of a `steps`-step schedule (official init_latent)."""
    check_strength(strength)
    count = min(int(steps * strength), steps)
    if count < 1:
        raise ValueError(
            f"strength {strength} x steps {steps} leaves no denoising step (the official schedule "
            "runs int(steps x strength) steps); raise 'steps' or 'strength'.")
    return schedule(model, steps, sampler_name, scheduler, 1.0)[-(count + 1):]


def check_strength(strength):
    check_number(strength, "strength", 0.0, 1.0, low_open=True,
                 hint="how far the source is noised; the paper uses 0.5")


def check_thresholds(theta_hi, theta_lo, phi):
    for value, name in ((theta_hi, "theta_hi"), (theta_lo, "theta_lo")):
        check_number(value, name, 0.0, 1.0, hint="a cosine similarity of attention maps")
    if theta_lo > theta_hi:
        raise ValueError(f"'theta_lo' ({theta_lo}) must not exceed 'theta_hi' ({theta_hi}): words "
                         "with similarity >= theta_hi are kept, <= theta_lo subtracted")
    check_number(phi, "phi", 0.0, 1.0, high_open=True, hint="the mask threshold on the normalised map")


def check_source(model, samples, input_name="source", noise_mask=None):
    # the model's image latent shape ([B, C, H, W]; Qwen-Image [B, C, 1, H, W]) and channels
    check_latent(model, samples, input_name, noise_mask=noise_mask)


def check_grid(grid, latent_hw, input_name="source"):
    grid, latent_hw = tuple(grid)[-2:], tuple(latent_hw)[-2:]  # video: (frames, h, w), any frame count
    if min(grid) < 2:
        h, w = latent_hw
        raise ValueError(
            f"the '{input_name}' latent is {h}x{w}, so the attention maps "
            f"are only {grid[0]}x{grid[1]}; InstDiffEdit needs at least 2x2. Use an image of "
            "at least 40x40 px (512x512 for SD1.x, 1024x1024 for SDXL and DiT models work best).")


class _EditLoop:
    """Per-step mask and blend state of one InstDiffEdit sampling run."""

    def __init__(self, recorder, capture, images, copies, latent_hw, sigmas, theta_hi, theta_lo,
                 phi, background, noise, exact):
        self.recorder = recorder
        self.capture = capture  # instdiffedit_capture adapter of the model kind
        self.images, self.copies = images, copies
        self.latent_hw = latent_hw
        self.sigmas = [float(s) for s in sigmas]
        self.steps = len(self.sigmas) - 1
        self.thresholds = (theta_hi, theta_lo, phi)
        self.background = background
        self.noise = noise  # [B * copies, C, H, W] on the CPU: the noise each copy started from
        self.exact = exact
        self.masks = []  # one [B, H, W] per finished step, on the sampling device
        self.position = self.index = None
        self._device_noise = None

    def step_at(self, sigma):
        """Index k of the schedule sigma this evaluation runs at, or None between them."""
        value = float(sigma.reshape(-1)[0])
        for k, reference in enumerate(self.sigmas[:-1]):
            if math.isclose(value, reference, rel_tol=1e-5, abs_tol=1e-9):
                return k
        return None

    def finish_step(self, device):
        """Mask of step len(masks) from the running mean of everything recorded so far."""
        mean = self.recorder.mean()
        if mean is None:  # nothing recorded (e.g. a prompt scheduled out): edit everywhere
            mask = torch.ones(self.images, *self.latent_hw, device=device)
        else:
            attn = mean.reshape(self.images, self.copies, *mean.shape[1:]).mean(1)
            result = self.capture.refine(attn, self.thresholds, self.position, self.exact)
            if self.position is None:  # first step: P is computed once, then frozen
                self.position, self.index = result.position, result.index
            mask = self.capture.to_latent(result.mask, self.latent_hw)
        self.masks.append(mask)

    def source_noised(self, model, sigma, like):
        """The source latent noised to `sigma` with each copy's own noise (model's latent space)."""
        if self._device_noise is None:
            self._device_noise = self.noise.to(device=like.device, dtype=like.dtype)
        inner = model.inner_model.inner_model  # the BaseModel, with its (patched) model_sampling
        latent = getattr(model, "latent_image", None)  # set by KSAMPLER.sample, already processed
        if latent is None:
            raise RuntimeError("this ComfyUI's sampler does not expose the latent image to blend with")
        sigma = torch.tensor(sigma, device=like.device, dtype=like.dtype)
        return inner.model_sampling.noise_scaling(sigma, self._device_noise, latent.to(like))

    def blended(self, model, x, step):
        """x at the end of step `step - 1` blended with the source outside that step's mask."""
        mask = latent_broadcast(self.masks[step - 1].repeat_interleave(self.copies, 0), x).to(x)
        sigma = self.sigmas[step - 1] if self.background == "official" else self.sigmas[step]
        y = self.source_noised(model, sigma, x)
        return y + mask * (x - y)  # official use_mask: or_latent + mask * (x_t - or_latent)

    def before_evaluation(self, model, x, sigma):
        step = self.step_at(sigma)
        if step is None or step == 0:
            return
        while len(self.masks) < step:
            self.finish_step(x.device)
        x.copy_(self.blended(model, x, step))

    def after_sampling(self, model, samples):
        # Once, after sampling: NaN maps would have given empty masks at every step.
        check_finite(self.recorder.mean(), "InstDiffEdit's recorded attention")
        while len(self.masks) < self.steps:
            self.finish_step(samples.device)
        return self.blended(model, samples, self.steps)

    def sampler_function(self, inner_function):
        loop = self

        def instdiffedit_sampler(model, noise, sigmas, *args, **kwargs):
            samples = inner_function(_BlendingDenoiser(model, loop), noise, sigmas, *args, **kwargs)
            return loop.after_sampling(model, samples)

        return instdiffedit_sampler


class _BlendingDenoiser:
    """The denoiser the k-diffusion sampler calls: blends its state, then evaluates as before.
    Attribute reads (inner_model, sigmas, ...) go to the wrapped KSamplerX0Inpaint."""

    def __init__(self, inner, loop):
        self.__dict__["_inner"] = inner
        self.__dict__["_loop"] = loop

    def __getattr__(self, name):
        return getattr(self.__dict__["_inner"], name)

    def __call__(self, x, sigma, *args, **kwargs):
        self._loop.before_evaluation(self._inner, x, sigma)
        return self._inner(x, sigma, *args, **kwargs)


def _video_noise_mask(noise_mask, images, frames, copies):
    """A Set Latent Noise Mask mask on a video source -> [images * copies, 1, F', H, W]: one mask for
    every frame, one per latent frame of each video, or one per decoded frame (VAE Encode's input,
    Attention Mask's output): a latent frame is regenerated where any of its pixel frames is.
    ComfyUI itself would interpolate all masks along one time axis (mixing the videos of a batch)."""
    if noise_mask is None:
        return None
    masks = noise_mask.reshape(-1, *noise_mask.shape[-2:])
    count = masks.shape[0]
    if count == 1:
        return noise_mask  # ComfyUI broadcasts one mask to every frame
    decoded = pixel_frames(frames)
    if count % images == 0 and count // images in (frames, decoded):
        per_video = masks.reshape(images, count // images, *masks.shape[-2:])
        if count // images != frames:  # pixel frames -> latent frames
            index = latent_frame_of(decoded).to(per_video.device)
            per_video = torch.stack([per_video[:, index == f].amax(1) for f in range(frames)], 1)
        return per_video.repeat_interleave(copies, 0)[:, None]
    if count % images == 0:  # says when the frame count is not one Wan decodes
        latent_frame_of(count // images, what=f"the 'source' latent's noise mask (per video, {images} video(s))")
    raise ValueError(
        f"the 'source' latent's noise mask has {count} masks, but the source is {images} video(s) of {frames} "
        f"latent frames ({decoded} decoded frames each): connect 1 mask (all frames), {images * decoded} (one per "
        f"decoded frame, batch-major, as Attention Mask gives them) or {images * frames} (one per latent frame)")


def _expand_noise_mask(noise_mask, images, copies):
    if noise_mask is None or copies == 1:
        return noise_mask
    if noise_mask.dim() >= 3 and noise_mask.shape[0] == images:
        return noise_mask.repeat_interleave(copies, 0)
    return noise_mask


def sample_instdiffedit(model, positive, negative, latent, seed, steps=50, strength=0.5, cfg=7.5,
                        sampler_name="lms", scheduler="normal", copies=3, theta_hi=0.9, theta_lo=0.6,
                        phi=0.2, background="official", exact=True, callback=None):
    """Run InstDiffEdit on every image of `latent`; returns an InstDiffEditResult.

    positive: the target prompt from Attention Text Encode (its words give the mask); negative:
    the unconditional prompt (official: ""). Any ControlNet / area keys in the conds and any
    patches on `model` (LoRA, IPAdapter attention patches) are kept; `model` itself is not
    modified. background: "official" (source noised to the step's own sigma, the official
    off-by-one) or "matching" (noised to the sigma the latent is at).
    """
    import comfy.sample
    import comfy.samplers

    if background not in BACKGROUNDS:
        raise ValueError(f"'background' must be one of {BACKGROUNDS}, got {background!r}")
    check_sampling(steps, cfg)
    check_number(copies, "copies", 1, integer=True)
    check_strength(strength)
    check_thresholds(theta_hi, theta_lo, phi)
    capture = capture_for(model, tokens_of(positive, "positive"))
    source = latent_samples(model, latent)
    check_source(model, source, noise_mask=latent.get("noise_mask"))
    # video (Wan): masks per latent frame, (F', H, W); images: (H, W)
    images, latent_hw = source.shape[0], tuple(source.shape[2:] if capture.video else source.shape[-2:])
    if capture.video:
        noise_mask = _video_noise_mask(latent.get("noise_mask"), images, latent_hw[0], copies)
    else:
        noise_mask = _expand_noise_mask(latent.get("noise_mask"), images, copies)

    patched = model.clone()
    sigmas = edit_schedule(patched, steps, sampler_name, scheduler, strength)
    recorder = capture.recorder(recorded_length(positive))
    recorder.install(patched, latent_hw, sigmas)
    check_grid(recorder.grid, latent_hw)

    batch = source.repeat_interleave(copies, 0)  # image-major: image 0's copies first
    noise = comfy.sample.prepare_noise(batch, seed)  # each copy its own noise, kept for blending
    loop = _EditLoop(recorder, capture, images, copies, latent_hw, sigmas, theta_hi, theta_lo,
                     phi, background, noise, exact)
    inner = comfy.samplers.sampler_object(sampler_name)
    sampler = comfy.samplers.KSAMPLER(loop.sampler_function(inner.sampler_function),
                                      extra_options=inner.extra_options,
                                      inpaint_options=inner.inpaint_options)
    n_steps = len(sigmas) - 1
    out = comfy.sample.sample_custom(
        patched, noise, cfg, sampler, sigmas, positive, negative, batch,
        noise_mask=noise_mask,
        callback=callback or progress_callback(patched, n_steps),
        disable_pbar=progress_disabled(), seed=seed)
    check_finite(out, "InstDiffEdit's sampled latent")

    step_masks = torch.stack(loop.masks)
    return InstDiffEditResult(samples=out[::copies], all_samples=out, mask=step_masks[-1],
                              step_masks=step_masks, position=loop.position, index=loop.index,
                              sigmas=sigmas, copies=copies, frames=latent_hw[0] if capture.video else None,
                              pixel_scale=recorder.pixel_scale)


def mask_from_maps(maps, theta_hi=0.9, theta_lo=0.6, phi=0.2, exact=True):
    """InstDiffEdit mask [B, H, W] (latent size) from ATTENTION_MAPS: a UNet's at 1/4 of the
    latent, or a DiT's (any blocks); Wan video maps give [B, F', H, W], one per latent frame."""
    check_thresholds(theta_hi, theta_lo, phi)
    capture = capture_for_maps(maps)
    if maps.level != capture.level:
        raise ValueError(
            f"these attention maps were recorded at 1/{2 ** maps.level} of the latent; InstDiffEdit "
            "needs the 1/4 layers (16x16 at 512 px on SD1.x). Set 'resolution' to 1/4 in "
            "KSampler (Record Attention).")
    if capture.eos >= maps.probs.shape[-1]:
        raise ValueError(f"the maps hold {maps.probs.shape[-1]} tokens, fewer than the prompt's")
    check_grid(tuple(maps.probs.shape[-3:-1]), maps.latent_hw, "attention_maps")
    result = capture.refine(maps.probs, (theta_hi, theta_lo, phi), exact=exact)
    return capture.to_latent(result.mask, maps.latent_hw)
