"""FoI ("Focus on Your Instruction", Guo & Lin, CVPR 2024) as a ComfyUI guider and sampler.

`FoIGuider` is a comfy.samplers.CFGGuider for InstructPix2Pix models. Every model evaluation runs
the three IP2P branches in ONE calc_cond_batch call, conds list
    [0] instruction + image   eps(z, I, T)    the positive, as InstructPixToPixConditioning made it
    [1] image only            eps(z, I, 0_T)  the negative (null instruction) with the image
    [2] neither               eps(z, 0_I, 0_T) the negative without `concat_latent_image` (zeros)
(the order DualCFGGuider / PerpNeg use: positive first), and:
- first model evaluation of a run (step 0): records the instruction branch's cross-attention on the
  mask layers and turns each keyword's map into a binary mask (Sec. 4.1, Eq. 2). The masks do not
  exist before this evaluation, so step 0 is a plain IP2P step (Eq. 1): no modulation, no mask in
  the guidance (the paper's Tab. 4/5 count "stop at step 1" as "not used at all");
- every later evaluation: cross-condition attention modulation on all cross-attention layers
  (Eq. 3-7, attention/foi_patch.py), xi(t) with t = the model's diffusion timestep of the current
  sigma normalised to [0, 1] (t_from_timestep; continuous-sigma models: log-sigma position);
- guidance: Eq. 9 (text direction times the union mask, Eq. 8) for steps 1 .. < fraction * steps
  (0.75: the first 75 % of the steps actually run, as the paper's Tab. 5), Eq. 1 after.

Other nodes' CFG hooks keep working as in Guider_PerpNeg: `sampler_pre_cfg_function`s get the three
conds/outputs (cond_scale = s_T); `sampler_cfg_function` replaces the text-guided term
img + s_T (full - img) (Eq. 9 then masks what it adds to the image branch); the
`sampler_post_cfg_function`s get the final result with cond = instruction, uncond = image-only
(plus empty_cond / empty_cond_denoised = the neither branch).
"""
import math
from dataclasses import dataclass, field, replace

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch

from ..attention.families import family_of
from ..attention.foi_modulation import t_from_timestep, xi
from ..attention.foi_patch import FoIState, install_foi
from ..attention.instructions import instructions_of
from ..attention.recorder import step_of_sigma
from ..masks.foi import disentangled_guidance
from ..masks.validate import check_finite, check_number
from .common import (check_latent, check_sampling, initial_noise, latent_samples, output_latent,
                     progress_callback, progress_disabled, schedule)


@dataclass
class FoIConfig:
    s_T: float = 7.5  # text (instruction) guidance
    s_I: float = 1.5  # image guidance
    gamma: int = 3  # Eq. 2 rounds
    tau: float = 0.5  # Eq. 2 threshold (the paper samples it from [0.4, 0.7])
    kernel_size: int = 3  # Gaussian filter before Eq. 2 (Attend-and-Excite's 3x3, sigma 0.5)
    sigma: float = 0.5
    modulation: bool = True  # Eq. 3-7
    alphas: list = field(default_factory=list)  # per sub-instruction; [] = all ones; one value = all
    disentangle_fraction: float = 0.75  # Eq. 9 for this fraction of the steps, Eq. 1 after
    mask_level: int = 2  # the "16x16" layers: 1/4 of the latent
    xi_scale: float = 0.05  # Eq. 7
    xi_power: float = 4

    def validate(self):
        """ValueError naming the node input (as the FoI nodes show it) that is out of range."""
        check_number(self.s_T, "text_cfg", 0.0)
        check_foi_settings(self)
        return self


def check_foi_settings(config):
    """The settings the IP2P and DiT FoI configs share, by their node input names (s_T aside)."""
    check_number(config.s_I, "image_cfg", 0.0)
    check_number(config.gamma, "gamma", 0, 10, integer=True)
    check_number(config.tau, "tau", 0.0, 1.0, hint="threshold on the sharpened map, which lies in [0, 1]")
    kernel = check_number(config.kernel_size, "blur_kernel", 1, 15, integer=True)
    if kernel % 2 == 0:
        raise ValueError(f"'blur_kernel' must be odd (1, 3, 5, ...), so the filter is centred; got {kernel}")
    check_number(config.sigma, "blur_sigma", 0.0, 5.0)
    for value in config.alphas:
        check_number(value, "alpha", 0.0, hint="one strength per sub-instruction, e.g. '1.0, 0.5'")
    check_number(config.disentangle_fraction, "disentangle_fraction", 0.0, 1.0)


def parse_alphas(text):
    """'1.0, 0.5' -> [1.0, 0.5]; '' -> [] (all ones)."""
    values = []
    for piece in str(text).replace(";", ",").split(","):
        piece = piece.strip()
        if not piece:
            continue
        try:
            values.append(float(piece))
        except ValueError:
            raise ValueError(f"alpha must be numbers separated by commas, e.g. '1.0, 0.5'; got {piece!r}") from None
    return values


def require_ip2p(model_patcher):
    """A clear error unless the model is an InstructPix2Pix model (image-concat input channels)."""
    base = model_patcher.model
    is_ip2p = any(cls.__name__ == "IP2P" for cls in type(base).__mro__) or hasattr(base, "process_ip2p_image_in")
    if is_ip2p:
        return
    unet = getattr(base, "diffusion_model", None)
    if not hasattr(unet, "input_blocks"):  # a DiT: its in_channels count patchified pixels, not latent channels
        family = family_of(model_patcher)
        name = family.name if family is not None else type(unet).__name__
        raise ValueError(
            f"FoI Sampler / FoI Guider take InstructPix2Pix UNets; this model is {name} (a DiT). "
            "For Flux Kontext, Flux.2 and Qwen-Image-Edit use 'FoI Sampler (Kontext / Qwen-Image-Edit)' or "
            "'FoI Guider (Kontext / Qwen-Image-Edit)' with 'Instruction Text Encode' (+ ReferenceLatent) "
            "or 'Instruction Text Encode (Qwen-Image-Edit)'.")
    channels = getattr(unet, "in_channels", "?")
    raise ValueError(
        f"FoI needs an InstructPix2Pix model, whose UNet also takes the source image (8 input "
        f"channels); this model is {type(base).__name__} with {channels} input channels. Load an "
        "InstructPix2Pix checkpoint (e.g. instruct-pix2pix-00-22000.safetensors, or an SDXL "
        "InstructPix2Pix / CosXL Edit model) with Load Checkpoint, and pass the conditioning "
        "through InstructPixToPixConditioning.")


def normalised_t(model_sampling, sigma):
    """t in [0, 1] for Eq. 7 at this sigma: the model's discrete timestep / (T - 1) (999 -> 1);
    for continuous-sigma models (EDM, CosXL) the position of log sigma between sigma_min and
    sigma_max."""
    import comfy.model_sampling

    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
    table = getattr(model_sampling, "sigmas", None)
    if isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and table is not None:
        timestep = float(model_sampling.timestep(sigma.to(table.device)).reshape(-1)[0])
        return min(max(t_from_timestep(timestep, table.numel()), 0.0), 1.0)
    lo, hi = math.log(float(model_sampling.sigma_min)), math.log(float(model_sampling.sigma_max))
    return min(max((math.log(float(sigma)) - lo) / (hi - lo), 0.0), 1.0)


def require_single_prompt(conditioning, name):
    if len(conditioning) != 1:
        raise ValueError(
            f"FoI needs the '{name}' conditioning as one prompt, got {len(conditioning)} entries "
            "(Conditioning Combine / area conditioning). Encode the whole instruction in one "
            "'Instruction Text Encode' node instead.")


def ip2p_conds(positive, negative):
    """(instruction + image, image only, neither) from InstructPixToPixConditioning's outputs."""
    require_single_prompt(positive, "positive")
    require_single_prompt(negative, "negative")
    image = positive[0][1].get("concat_latent_image")
    if image is None:
        raise ValueError(
            "the positive conditioning carries no source image: pass it (and the negative) through "
            "InstructPixToPixConditioning (conditioning/instructpix2pix) before FoI.")
    neg_cond, neg_options = negative[0]
    image_only = [[neg_cond, {**neg_options, "concat_latent_image": neg_options.get("concat_latent_image", image),
                              "prompt_type": "negative"}]]
    neither = [[neg_cond, {k: v for k, v in neg_options.items() if k != "concat_latent_image"}]]
    return positive, image_only, neither


class InstructionGuider(comfy.samplers.CFGGuider):
    """What the UNet (IP2P) and DiT FoI guiders share: the instruction and its per-sub-instruction
    alphas, s_T / s_I, the masks of the last run, the step index. Subclasses set `state`."""

    def __init__(self, model_patcher, config):
        self.config = replace(config).validate()  # a copy: set_cfg and defaults write into it
        super().__init__(model_patcher)
        self.schedule = None
        self.evaluations = 0

    def set_instructions(self, positive):
        """The positive's Instructions, with one alpha per sub-instruction, into the state."""
        instructions = instructions_of(positive, "positive")
        alphas = list(self.config.alphas)
        if len(alphas) == 1:
            alphas = alphas * len(instructions)
        if alphas and len(alphas) != len(instructions):
            raise ValueError(
                f"alpha has {len(alphas)} values but the instruction has {len(instructions)} "
                f"sub-instructions ({'; '.join(instructions.keywords)}): give one value per "
                "sub-instruction, or one value for all.")
        self.state.instructions = instructions
        self.state.alphas = alphas or None
        return instructions

    def set_cfg(self, s_T, s_I=None):
        self.config.s_T = s_T
        if s_I is not None:
            self.config.s_I = s_I
        self.cfg = s_T

    @property
    def masks(self):
        """[B, K, h, w] keyword masks of the last run (UNet: the mask layers' grid; DiT: the token
        grid); None before sampling."""
        return self.state.masks

    @property
    def soft_maps(self):
        return self.state.soft_maps

    def inner_sample(self, noise, latent_image, device, sampler, sigmas, *args, **kwargs):
        # the FoI sampler nodes and SamplerCustomAdvanced alike: before the model's code runs on it
        check_latent(self.model_patcher, latent_image, "latent_image")
        self.state.begin(noise.shape[-2:])
        self.schedule = sigmas.detach().float().cpu()
        self.evaluations = 0
        out = super().inner_sample(noise, latent_image, device, sampler, sigmas, *args, **kwargs)
        return check_finite(out, "FoI's sampled latent")  # once, after sampling

    def _step(self, timestep):
        if self.schedule is None or self.schedule.numel() < 2:
            return 0
        return step_of_sigma(self.schedule, float(timestep.max()))

    def _pre_cfg(self, conds, out, x, timestep, model_options):
        """ComfyUI's sampler_pre_cfg_function hooks on the branch predictions, as CFGGuider runs them."""
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.config.s_T, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        return out

    def _disentangles(self, timestep, extracting):
        """Eq. 9 (masked) for steps 1 .. < disentangle_fraction * steps; Eq. 1 at step 0 and after."""
        n_steps = max(len(self.schedule) - 1, 1) if self.schedule is not None else 1
        return not extracting and self._step(timestep) < self.config.disentangle_fraction * n_steps

    def _guide(self, x, timestep, model_options, full, image, none, union, conds, post_extra=None):
        """Eq. 9 from the branch predictions, with ComfyUI's sampler_cfg_function (its text term
        replaces s_T (full - image)) and sampler_post_cfg_function hooks. conds: (instruction +
        image, image only, neither) input conds, the last None where that branch did not run."""
        cfg = self.config
        cond, uncond, empty = conds
        if "sampler_cfg_function" in model_options:
            args = {"cond": x - full, "uncond": x - image, "cond_scale": cfg.s_T, "timestep": timestep,
                    "input": x, "sigma": timestep, "cond_denoised": full, "uncond_denoised": image,
                    "model": self.inner_model, "model_options": model_options,
                    "input_cond": cond, "input_uncond": uncond}
            text_guided = x - model_options["sampler_cfg_function"](args)
            result = disentangled_guidance(text_guided, image, none, 1.0, cfg.s_I, union)
        else:
            result = disentangled_guidance(full, image, none, cfg.s_T, cfg.s_I, union)

        for fn in model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cfg.s_T,
                    "model": self.inner_model, "uncond_denoised": image, "cond_denoised": full,
                    "sigma": timestep, "model_options": model_options, "input": x,
                    "empty_cond": empty, "empty_cond_denoised": none, **(post_extra or {})}
            result = fn(args)
        return result


class FoIGuider(InstructionGuider):
    """IP2P three-branch guider with FoI masks, modulation and disentangle sampling."""

    def __init__(self, model_patcher, config=None):
        require_ip2p(model_patcher)
        config = config or FoIConfig()
        self.state = FoIState(mask_level=config.mask_level)
        super().__init__(install_foi(model_patcher.clone(), self.state), config)

    def set_conds(self, positive, negative):
        self.set_instructions(positive)
        full, image_only, neither = ip2p_conds(positive, negative)
        check_latent(self.model_patcher, full[0][1]["concat_latent_image"], "positive",
                     "source image latent (InstructPixToPixConditioning's VAE)")
        self.inner_set_conds({"positive": full, "middle": image_only, "negative": neither})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        cfg, state = self.config, self.state
        conds = [self.conds.get("positive"), self.conds.get("middle"), self.conds.get("negative")]
        extracting = state.phase == "extract"
        t = normalised_t(self.inner_model.model_sampling, timestep.max())
        state.next_call(cfg.modulation, xi(t, cfg.xi_scale, cfg.xi_power))
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        self.evaluations += 1
        if extracting:
            state.finish_extraction(cfg.gamma, cfg.tau, cfg.kernel_size, cfg.sigma)

        out = self._pre_cfg(conds, out, x, timestep, model_options)
        full, image, none = out[0], out[1], out[2]
        union = state.union(x.shape[-2:], x.device) if self._disentangles(timestep, extracting) else None
        return self._guide(x, timestep, model_options, full, image, none, union, conds)


def foi_guider(model, positive, negative, config=None):
    """An FoIGuider (a comfy.samplers.CFGGuider) with patches on a clone of `model`."""
    guider = FoIGuider(model, config)
    guider.set_conds(positive, negative)
    guider.set_cfg(guider.config.s_T)
    return guider


def source_latent(positive, like):
    """The source image latent from the IP2P conditioning, at the shape of `like` [B, C, H, W]."""
    image = positive[0][1]["concat_latent_image"].to(like.device, like.dtype)
    if image.shape[-2:] != like.shape[-2:]:
        image = comfy.utils.common_upscale(image, like.shape[-1], like.shape[-2], "bilinear", "center")
    return comfy.utils.repeat_to_batch_size(image, like.shape[0])


START_MODES = ("source image", "latent input")


def sample_foi(model, positive, negative, latent, seed, steps, denoise=0.8, sampler_name="euler_ancestral",
               scheduler="normal", config=None, start="source image", callback=None):
    """Run FoI. Returns (LATENT dict, guider); the guider holds the keyword masks of the run.

    start: "source image" begins from the source image latent (the `concat_latent_image` that
    InstructPixToPixConditioning stored) noised to `denoise`, as the paper (80 %); "latent input"
    begins from `latent` (InstructPixToPixConditioning's own latent output is all zeros).
    """
    if start not in START_MODES:
        raise ValueError(f"'start' must be one of {START_MODES}, got {start!r}")
    check_sampling(steps, denoise=denoise)
    guider = foi_guider(model, positive, negative, config)
    sigmas = schedule(guider.model_patcher, steps, sampler_name, scheduler, denoise)
    samples = check_latent(model, latent_samples(model, latent), "latent_image",
                           noise_mask=latent.get("noise_mask"))
    init = source_latent(positive, samples) if start == "source image" else samples
    noise = initial_noise({**latent, "samples": samples}, seed)
    sampler = comfy.samplers.sampler_object(sampler_name)
    out = guider.sample(noise, init, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                        callback=callback or progress_callback(model, len(sigmas) - 1),
                        disable_pbar=progress_disabled(), seed=seed)
    return output_latent(latent, out.to(comfy.model_management.intermediate_device())), guider  # as comfy.sample
