"""FoI ("Focus on Your Instruction", Guo & Lin, CVPR 2024) on the DiT instruction-editing models
Flux Kontext, Flux.2 (reference editing) and Qwen-Image-Edit, as a ComfyUI guider. docs/foi.md ("DiT models").

Branches (one calc_cond_batch per model evaluation):
    instruction + image        eps(z, I, T)    the positive
    null instruction + image   eps(z, I, 0_T)  the negative with the reference image
    neither                    eps(z, 0_I, 0_T) only when s_I != 1 (its weight is 1 - s_I)
in the order that makes ComfyUI run the null's forward before or with the instruction's (its
image queries are needed for the instruction's attention modulation, attention/foi_dit.py):
[instruction, null] when the contexts have one length (Kontext: batched; a memory split takes
conds from the end), [null, instruction] when they differ (Qwen-Image-Edit: one forward each, in
list order); the neither branch last.

Guidance, Eq. 9 with the branches each model has:
    eps = eps_none + s_I (eps_img - eps_none) + s_T (eps_full - eps_img) * M_union
- Qwen-Image-Edit runs true CFG (cfg on the empty prompt with the image): that is Eq. 9 with
  s_I = 1 (eps_none drops out) and s_T = cfg; s_I != 1 adds the third branch (IP2P's image guidance).
- Flux Kontext (and Flux.2 [dev]) is guidance-distilled (one prediction per step, FluxGuidance inside the model):
  s_T = 1, s_I = 1, i.e. eps = eps_img + M_union (eps_full - eps_img), the masked combination of
  the instruction's and the empty instruction's predictions.
Step 0 has no masks yet (they are made from its attention): Eq. 1 (M_union = 1) and no modulation,
as on the UNet path; Eq. 9 for steps 1 .. < disentangle_fraction * steps, Eq. 1 after.
"""
from dataclasses import dataclass, field

import comfy.model_management
import comfy.model_sampling
import comfy.samplers

from ..attention.families import dit_family
from ..attention.foi_dit import INSTRUCTION_FIRST, NULL_FIRST, FoIDiTState, install_foi_dit
from ..attention.foi_modulation import xi
from ..masks.foi import DIT_MASK_UPSAMPLE
from ..masks.validate import check_number
from .common import (check_latent, check_sampling, initial_noise, latent_broadcast, latent_samples,
                     output_latent, progress_callback, progress_disabled, schedule)
from .foi import InstructionGuider, check_foi_settings, normalised_t, require_single_prompt

NO_IMAGE_KEY = "attention_edit_foi_no_image"  # a null conditioning's no-image encoding (Qwen-Image-Edit)


@dataclass(frozen=True)
class EditModel:
    """The little FoI needs to know per model: its name and defaults (guidance: module docstring)."""

    name: str
    s_T: float  # the official guidance this family starts from (docs/foi.md)
    reference: str  # how its conditioning gets the reference image (for errors)


KONTEXT = EditModel("Flux Kontext", 1.0, "ReferenceLatent (and FluxGuidance 2.5)")
# Flux.2 ([dev]: guidance-distilled like Kontext, FluxGuidance 4 in ComfyUI's template): its built-in
# reference editing, the reference latent(s) through ReferenceLatent
FLUX2 = EditModel("Flux.2", 1.0, "ReferenceLatent (and FluxGuidance 4)")
QWEN_EDIT = EditModel("Qwen-Image-Edit", 2.5, "Instruction Text Encode (Qwen-Image-Edit) with vae and image")


# the DiT family -> how FoI edits with it (the family's own refuses("FoI") is checked first)
EDIT_MODELS = {"Flux": KONTEXT, "Flux.2": FLUX2, "Qwen-Image": QWEN_EDIT}


def edit_model(model_patcher):
    """EditModel of a ModelPatcher, or a clear error for other models."""
    family = dit_family(model_patcher)
    name = getattr(family, "name", None)
    reason = family.refuses("FoI") if family is not None else None
    if name in EDIT_MODELS and reason is None:
        return EDIT_MODELS[name]
    kind = type(model_patcher.model.diffusion_model).__name__
    raise TypeError(
        f"{reason + '. ' if reason else ''}FoI for DiT models supports Flux Kontext, Flux.2 and Qwen-Image-Edit; "
        f"this model is {kind}{' (' + name + ')' if name else ''}. For InstructPix2Pix UNets use FoI Sampler / "
        "FoI Guider.")


@dataclass
class FoIDiTConfig:
    s_T: float = None  # None: the model's default (EditModel.s_T)
    s_I: float = 1.0
    gamma: int = 3
    tau: float = 0.5
    kernel_size: int = 3
    sigma: float = 0.5
    mask_upsample: int = DIT_MASK_UPSAMPLE  # Eq. 2 on the token map upsampled this many times (dit_keyword_masks)
    modulation: bool = True
    alphas: list = field(default_factory=list)
    disentangle_fraction: float = 0.75
    mask_blocks: str = ""  # families.parse_blocks spec; '' = the family default
    xi_scale: float = 0.05
    xi_power: float = 4

    def validate(self):
        if self.s_T is not None:  # None: the model's default
            check_number(self.s_T, "text_cfg", 0.0)
        check_foi_settings(self)
        check_number(self.mask_upsample, "mask_upsample", 1, 16, integer=True)
        return self


def flow_t(model_sampling, sigma):
    """t in [0, 1] for Eq. 7: a flow model's sigma is its time (1 = noise); others as the UNet path."""
    if isinstance(model_sampling, comfy.model_sampling.CONST):  # rectified flow: Flux, SD3, Qwen-Image
        return min(max(float(sigma), 0.0), 1.0)
    return normalised_t(model_sampling, sigma)


def dit_conds(positive, negative, model):
    """(null + image, instruction + image, neither) conds from the positive / negative."""
    require_single_prompt(positive, "positive")
    require_single_prompt(negative, "negative")
    pos_cond, pos_options = positive[0]
    if not pos_options.get("reference_latents"):
        raise ValueError(
            f"the positive conditioning carries no reference image: {model.name} edits the image it is given "
            f"through the conditioning. Pass the instruction (and the null instruction) through "
            f"{model.reference} before FoI.")
    neg_cond, neg_options = negative[0]
    filled = {key: pos_options[key] for key in ("reference_latents", "reference_latents_method", "guidance")
              if key in pos_options and key not in neg_options}
    null = [[neg_cond, {**neg_options, **filled}]]
    no_image = neg_options.get(NO_IMAGE_KEY)
    if no_image is not None:
        neither = no_image
    else:
        # the null's options (its guidance included), without the image: Eq. 9's eps(0_I, 0_T)
        neither = [[neg_cond, {k: v for k, v in {**neg_options, **filled}.items()
                               if k not in ("reference_latents", "reference_latents_method", NO_IMAGE_KEY)}]]
    return null, positive, neither


def branch_order(positive, null, family=None):
    """{branch: cond index}: instruction first when the contexts reach the model with one length
    (Family.text_length: Flux.2 pads both to 512), else the null."""
    length = family.text_length if family is not None else (lambda n: n)
    same = (length(positive[0][0].shape[1]), *positive[0][0].shape[2:]) == \
        (length(null[0][0].shape[1]), *null[0][0].shape[2:])
    return INSTRUCTION_FIRST if same else NULL_FIRST


class FoIDiTGuider(InstructionGuider):
    """FoI for Flux Kontext / Qwen-Image-Edit: masks at step 0, modulation, disentangled guidance."""

    def __init__(self, model_patcher, config=None):
        self.model = edit_model(model_patcher)
        self.family = dit_family(model_patcher)
        self.pixel_scale = self.family.pixel_scale(model_patcher.model.diffusion_model)  # 8; Flux.2 16
        config = config or FoIDiTConfig()
        self.state = FoIDiTState(mask_blocks=config.mask_blocks)
        super().__init__(install_foi_dit(model_patcher.clone(), self.state), config)
        if self.config.s_T is None:
            self.config.s_T = self.model.s_T

    def set_conds(self, positive, negative):
        instructions = self.set_instructions(positive)
        if positive and positive[0][0].shape[1] != instructions.n_tokens:
            raise ValueError(
                f"the positive conditioning has {positive[0][0].shape[1]} tokens but its instruction "
                f"\"{instructions.text[:60]}\" has {instructions.n_tokens}: a node between Instruction Text "
                "Encode and FoI changed the text (connect its output directly, through ReferenceLatent / "
                "FluxGuidance only).")
        null, full, neither = dit_conds(positive, negative, self.model)
        for name, conditioning in (("positive", positive), ("negative", negative)):
            for reference in conditioning[0][1].get("reference_latents") or []:
                check_latent(self.model_patcher, reference, name, f"reference latent ({self.model.reference})")
        self.state.branches = dict(branch_order(full, null, self.family))
        self.inner_set_conds({"negative": null, "positive": full, "neither": neither})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        cfg, state = self.config, self.state
        three = cfg.s_I != 1.0
        order = state.branches
        conds = [None] * (3 if three else 2)
        for branch, key in (("instruction", "positive"), ("null", "negative"), ("neither", "neither")):
            if order[branch] < len(conds):
                conds[order[branch]] = self.conds.get(key)
        extracting = state.phase == "extract"
        state.next_call(cfg.modulation, xi(flow_t(self.inner_model.model_sampling, timestep.max()),
                                           cfg.xi_scale, cfg.xi_power))
        out = comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)
        self.evaluations += 1
        if extracting:
            state.finish_extraction(cfg.gamma, cfg.tau, cfg.kernel_size, cfg.sigma, cfg.mask_upsample)

        out = self._pre_cfg(conds, out, x, timestep, model_options)
        image, full = out[order["null"]], out[order["instruction"]]
        none = out[order["neither"]] if three else image

        union = state.union(x.shape[-2:], x.device) if self._disentangles(timestep, extracting) else None
        if union is not None:
            union = latent_broadcast(union[:, 0], x)  # Qwen-Image: one-frame latents [B, C, 1, H, W]
        inputs = (conds[order["instruction"]], conds[order["null"]], conds[order["neither"]] if three else None)
        return self._guide(x, timestep, model_options, full, image, none, union, inputs, {"foi_union": union})


def foi_dit_guider(model, positive, negative, config=None):
    guider = FoIDiTGuider(model, config)
    guider.set_conds(positive, negative)
    guider.set_cfg(guider.config.s_T)
    return guider


def sample_foi_dit(model, positive, negative, latent, seed, steps, sampler_name="euler", scheduler="simple",
                   denoise=1.0, config=None, callback=None):
    """Run FoI on Kontext / Qwen-Image-Edit from `latent` (the encoded image or an empty latent
    of its size: these models take the source image through the conditioning). Returns (LATENT dict, guider)."""
    check_sampling(steps, denoise=denoise)
    guider = foi_dit_guider(model, positive, negative, config)
    sigmas = schedule(guider.model_patcher, steps, sampler_name, scheduler, denoise)
    samples = latent_samples(model, latent)
    noise = initial_noise({**latent, "samples": samples}, seed)
    sampler = comfy.samplers.sampler_object(sampler_name)
    out = guider.sample(noise, samples, sampler, sigmas, denoise_mask=latent.get("noise_mask"),
                        callback=callback or progress_callback(model, len(sigmas) - 1),
                        disable_pbar=progress_disabled(), seed=seed)
    return output_latent(latent, out.to(comfy.model_management.intermediate_device())), guider

