"""MAG-Edit (Mao et al., arXiv 2312.11396) as a ComfyUI sampling procedure.

Two branches start from the inverted noise z_T of an INVERSION (samplers/inversion.py): the
reconstruction branch samples the source prompt with the per-step null-text embeddings and
retraces the source image; the editing branch samples the target prompt with Prompt-to-Prompt
injection from it (attention/injection.py). In each of the first `optimized_steps` steps the
editing latent is first optimised, `iterations` times, inside the mask M:

    z*_t <- z*_t - M * sigma_t * grad_{z*_t} (scale * L),   sigma_t = sqrt((1 - abar_t) / abar_t)

with L the token-ratio (and/or spatial-ratio) constraint of the edit words (masks/
magedit_losses.py) on the editing branch's post-injection cross-attention at 1/4 of the latent
(the official five "16x16" layers of SD1.x: down + up, no middle). Then both branches take the
regular CFG DDIM step, in one UNet call; in the last `blend_steps` steps the editing latent is
replaced by the reconstruction outside the mask dilated by one latent pixel (3x3 max-pool).

Latent scaling. The official latent is DDPM-scaled, z_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
and the UNet sees z_t. ComfyUI samples x = z_t / sqrt(abar_t) = x0 + sigma_t eps with
sigma_t = sqrt((1 - abar_t) / abar_t) (the official step factor is ComfyUI's sigma), and its
model feeds the UNet x / sqrt(1 + sigma_t^2) = x sqrt(abar_t) = z_t: the same input. With
s = sqrt(1 + sigma_t^2) = 1 / sqrt(abar_t), x = s z, so grad_z L = s grad_x L, and the official
update z' = z - M sigma_t grad_z L is, divided by sqrt(abar_t) (multiplied by s),

    x' = x - M * sigma_t * (1 + sigma_t^2) * grad_x L,

which is what `Editor.optimise` applies (the loss is differentiated with respect to ComfyUI's x).
The DDIM steps are the inversion's sigma-form steps (exact DDIM with eta 0), and the blend is
linear, so it commutes with the scaling.

Faster and smaller than the official loop, same results:
- the reconstruction pass an optimisation iteration needs is run once per step, not once per
  iteration: the reconstruction latent does not change during a step's iterations;
- each iteration's editing forward stops after the last loss layer (`StopForward`), so the
  decoder's higher-resolution blocks never run and autograd keeps only the activations up to
  that layer; the reconstruction pass stops there too and runs without autograd;
- replaced self-attention reuses the reconstruction's queries and keys through ComfyUI's
  attention kernel instead of storing probability matrices.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

import comfy.model_management
import comfy.samplers
import comfy.utils
import torch
import torch.nn.functional as F

from ..attention.injection import InjectionController, StopForward, align_prompts
from ..attention.layers import select_layers
from ..attention.tokens import PromptWordError, split_words, tokens_of
from ..masks.magedit_losses import LOSS_KINDS, combined_loss
from ..masks.validate import check_finite, check_number, mask_inside
from .common import check_latent, check_sampling, refuse_dit
from .grad import autograd_through, leaf, loss_and_grad, refuse_controlnet
from .inversion import (check_inversion, cross_attn_embeddings, ddim_step, guided_denoised, predicted_noise,
                        run_sampling_loop, with_cross_attn)

log = logging.getLogger("attention_edit")

LOSS_LEVEL = 2  # 1/4 of the latent: the official 16x16 layers of SD1.x at 512 px
LOSS_PARTS = ("input", "output")  # official: down_cross[4:6] + up_cross[0:3], no middle block
SELF_MIN_LEVEL = 1  # self-attention replaced at <= 32x32 of a 64x64 latent (official: <= 32**2)


@dataclass(frozen=True)
class MagEditConfig:
    """The official defaults (code_tr/edit.py, network.py)."""

    steps: int = 50
    cfg: float = 7.5
    optimized_steps: int = 25  # the first steps whose latent is optimised
    iterations: int = 15  # optimisation iterations per optimised step
    scale: float = 2.5  # loss weight (the official `--scale`)
    loss: str = "token"  # "token" (official code), "spatial" or "both" (paper)
    cross_fraction: float = 0.8  # cross-attention injection for steps < int(f * (steps + 1))
    self_fraction: float = 0.5  # self-attention replacement for steps < int(steps * f)
    blend_steps: int = 15  # blend with the reconstruction outside the mask in the last steps
    preview: bool = True  # keep the edit words' attention before / after optimisation

    def validate(self):
        """ValueError naming the MAG-Edit node input that is out of range."""
        check_sampling(self.steps, self.cfg)
        for name in ("optimized_steps", "blend_steps"):
            check_number(getattr(self, name), name, 0, self.steps, integer=True, hint="at most 'steps'")
        check_number(self.iterations, "iterations", 0, integer=True)
        check_number(self.scale, "scale", 0.0, 100.0, hint="the loss weight; official 2.5")
        check_number(self.cross_fraction, "cross_injection", 0.0, 1.0, hint="a fraction of the steps")
        check_number(self.self_fraction, "self_injection", 0.0, 1.0, hint="a fraction of the steps")
        if self.loss not in LOSS_KINDS:
            raise ValueError(f"'loss' must be one of {LOSS_KINDS}, got {self.loss!r}")

    @property
    def cross_steps(self):
        """Cross-attention injection runs for steps < this (P2P: int(0.8 * 51) = 40 of 50)."""
        return int(self.cross_fraction * (self.steps + 1))

    @property
    def self_steps(self):
        """Self-attention replacement runs for steps < this (P2P: int(50 * 0.5) = 25)."""
        return int(self.steps * self.self_fraction)

    def blends(self, step):
        return self.steps - step <= self.blend_steps


@dataclass
class MagEditResult:
    samples: torch.Tensor  # the edited latent, LATENT samples [B, C, H, W]
    reconstruction: torch.Tensor  # the reconstruction branch's result, LATENT samples
    losses: torch.Tensor  # [optimized steps, iterations, B]: the loss before each update
    latent_mask: torch.Tensor  # [Bm, 1, H, W] 0/1, the optimisation mask at latent size
    before: Optional[torch.Tensor] = None  # [B, gh, gw] edit words' map before optimising, mean over steps
    after: Optional[torch.Tensor] = None  # [B, gh, gw] the same after the step's iterations


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def prepare_mask(mask, latent_hw, grid_hw):
    """MASK (image or latent size; [H, W] or [B, H, W]) -> (latent 0/1 [Bm, 1, h, w], grid bool [Bm, gh, gw]).

    Nearest resizing and `!= 0`, as the official code (PIL mask -> nnf.interpolate -> != 0).
    Raises ValueError for an empty mask, one that vanishes at the attention resolution, or one
    whose aspect ratio does not match the latent's.
    """
    if mask is None:
        raise ValueError("MAG-Edit needs a MASK of the region to edit")
    mask = torch.as_tensor(mask)
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"the 'mask' input must be a MASK [H, W] or [B, H, W], got shape "
                         f"{tuple(mask.shape)}")
    h, w = latent_hw
    mh, mw = mask.shape[-2:]
    # One latent pixel of slack: an image whose size is not a multiple of 8 encodes to floor(size / 8).
    if abs(mh * w - mw * h) > max(mh, mw):
        raise ValueError(
            f"the mask is {mw}x{mh} but the latent is {w}x{h} ({8 * w}x{8 * h} px): their aspect ratios "
            "differ. Use a mask of the source image (same width and height) or of the latent.")
    inside = mask_inside(mask.float().cpu(), "mask")
    empty = [i for i in range(inside.shape[0]) if not inside[i].any()]
    if empty:
        raise ValueError(f"the mask is empty (all zero) for image(s) {empty}: paint or compute the region to edit")
    latent = F.interpolate(inside[:, None].float(), size=(h, w), mode="nearest")
    grid = F.interpolate(inside[:, None].float(), size=tuple(grid_hw), mode="nearest")[:, 0] != 0
    small = [i for i in range(grid.shape[0]) if not grid[i].any()]
    if small:
        raise ValueError(
            f"the mask of image(s) {small} vanishes at the attention resolution the loss reads "
            f"({grid_hw[1]}x{grid_hw[0]}): draw a larger region")
    return latent, grid


def edit_token_indices(target_tokens, words):
    """One list of target token positions per edit word (every piece of every occurrence)."""
    if not words:
        raise ValueError("type at least one edit word (comma-separated words of the target prompt)")
    indices = []
    for word in words:
        try:
            indices.append(target_tokens.positions(word))
        except PromptWordError as error:
            raise PromptWordError(f"edit word: {error}") from None
    return indices


def paired_conditioning(source, target, batch):
    """A CONDITIONING whose text is [source x batch; target x batch], for x = [x_rec; x_edit].

    Entries are paired by index; options come from the target's entry, its pooled output
    (SDXL) batched the same way as the text.
    """
    if len(source) != len(target):
        raise ValueError(f"the source and target conditionings have {len(source)} and {len(target)} "
                         "entries; MAG-Edit pairs them one to one (encode each prompt once)")
    paired = []
    for (src, src_options), (tgt, tgt_options) in zip(source, target):
        if src.shape[1:] != tgt.shape[1:]:
            raise ValueError(f"the source and target text embeddings differ in shape ({tuple(src.shape)} vs "
                             f"{tuple(tgt.shape)}); encode both prompts with the same CLIP")
        options = dict(tgt_options)
        cond = torch.cat([comfy.utils.repeat_to_batch_size(src, batch),
                          comfy.utils.repeat_to_batch_size(tgt, batch)])
        if src_options.get("pooled_output") is not None and tgt_options.get("pooled_output") is not None:
            options["pooled_output"] = torch.cat([
                comfy.utils.repeat_to_batch_size(src_options["pooled_output"], batch),
                comfy.utils.repeat_to_batch_size(tgt_options["pooled_output"], batch)])
        paired.append([cond, options])
    return paired


@dataclass
class Plan:
    """Everything checked and derived before sampling."""

    config: MagEditConfig
    alignment: object
    word_indices: list
    latent_mask: torch.Tensor  # [Bm, 1, h, w]
    grid_mask: torch.Tensor  # [Bm, gh, gw] bool
    blend_mask: torch.Tensor  # [Bm, 1, h, w], dilated by one latent pixel
    loss_layers: list
    batch: int
    latent_shape: tuple
    conds: dict = field(default_factory=dict)


def _same_text(conditioning, reference):
    if len(conditioning) != len(reference):
        return False
    return all(a[0].shape == b[0].shape and torch.equal(a[0].cpu(), b[0].cpu())
               for a, b in zip(conditioning, reference))


def check_inputs_match_inversion(inversion, source, negative, cfg):
    """The reconstruction branch only retraces the image with the INVERSION's own prompts."""
    if not _same_text(source, inversion.positive):
        raise ValueError(
            "the source positive is not the prompt the INVERSION was made with: connect the same "
            "source prompt to the Inversion node and to MAG-Edit")
    if not _same_text(negative, inversion.negative):
        raise ValueError(
            "the negative is not the one the INVERSION was made with (its null embeddings replace "
            "that negative's text): connect the same negative to the Inversion node and to MAG-Edit")
    if abs(cfg - inversion.cfg) > 1e-6 and inversion.null_embeddings is not None:
        log.warning("MAG-Edit: cfg %.2f differs from the %.2f the null-text inversion was optimised "
                    "for; the reconstruction will drift from the source image", cfg, inversion.cfg)


def plan_edit(model, inversion, source, target, negative, mask, edit_words, config):
    """Validate the inputs; raises ValueError with what to change."""
    config.validate()
    if config.steps != inversion.steps:
        raise ValueError(
            f"The INVERSION input has {inversion.steps} steps but steps is {config.steps}: set steps to "
            f"{inversion.steps}, or run the Inversion node with steps={config.steps}.")
    refuse_controlnet(source, target, negative)
    check_inputs_match_inversion(inversion, source, negative, config.cfg)
    source_tokens = tokens_of(source, "source positive")
    target_tokens = tokens_of(target, "target positive")
    source_tokens.require_single_chunk("MAG-Edit's source prompt")
    target_tokens.require_single_chunk("MAG-Edit's target prompt")
    words = split_words(edit_words) if isinstance(edit_words, str) else list(edit_words)
    word_indices = edit_token_indices(target_tokens, words)
    alignment = align_prompts(source_tokens, target_tokens)
    if not alignment.shared_positions:
        raise ValueError(
            f"the source prompt \"{source_tokens.text}\" and the target prompt \"{target_tokens.text}\" "
            "share no words: MAG-Edit keeps the image by injecting the shared words' attention. Write the "
            "target as the source with the edit applied (e.g. 'a cat on a sofa' -> 'a cat on a red sofa').")
    loss_layers = select_layers(model, LOSS_LEVEL, LOSS_PARTS)
    trajectory = inversion.trajectory
    check_latent(model, inversion.noise, "inversion", "noise")
    batch, latent_shape = trajectory.shape[1], tuple(trajectory.shape[1:])
    latent_hw = tuple(trajectory.shape[-2:])
    latent_mask, grid_mask = prepare_mask(mask, latent_hw, loss_layers[0].grid(*latent_hw))
    if latent_mask.shape[0] not in (1, batch):
        raise ValueError(f"the MASK has {latent_mask.shape[0]} masks for {batch} images; give one, or one per image")
    blend_mask = F.max_pool2d(latent_mask, kernel_size=3, stride=1, padding=1)
    conds = {"positive": paired_conditioning(source, target, batch), "negative": negative,
             "source": source, "target": target}
    return Plan(config=config, alignment=alignment, word_indices=word_indices, latent_mask=latent_mask,
                grid_mask=grid_mask, blend_mask=blend_mask, loss_layers=loss_layers, batch=batch,
                latent_shape=latent_shape, conds=conds)


# --------------------------------------------------------------------------------------------
# The editing run
# --------------------------------------------------------------------------------------------

def official_order(captured):
    """Captured (layer, map) pairs -> maps in the official list order, up-block layers first then
    down-block ones (`up_cross[0:3] + down_cross[4:6]`), each in execution order: the losses sum
    layers in list order, so float32 results match the official code's."""
    return [m for layer, m in captured if layer.part == "output"] + \
        [m for layer, m in captured if layer.part != "output"]


class Editor:
    """One MAG-Edit run inside ComfyUI sampling (model loaded, conds processed)."""

    def __init__(self, run, plan, controller, inversion, progress=None):
        self.run = run
        self.plan = plan
        self.config = plan.config
        self.controller = controller
        self.inversion = inversion
        device = run.x.device
        self.sigmas = leaf(inversion.sigmas.to(device, torch.float32))
        self.latent_mask = plan.latent_mask.to(device)
        self.blend_mask = plan.blend_mask.to(device)
        self.grid_mask = plan.grid_mask.to(device)
        grid = self.grid_mask
        self.loss_mask = grid[0] if grid.shape[0] == 1 else grid
        self.progress = progress or (lambda: None)
        self._null_entries = len(cross_attn_embeddings(run.conds["negative"]))
        nulls = inversion.null_embeddings
        if nulls is not None and nulls and len(nulls[0]) != self._null_entries:
            raise ValueError(
                f"the negative conditioning has {self._null_entries} text entries but the INVERSION's "
                f"null embeddings replace {len(nulls[0])}: connect the negative used by the Inversion node")
        self.before = []
        self.after = []

    def sigma(self, step, batch):
        return self.sigmas[step] * self.sigmas.new_ones(batch)

    def _uncond(self, step):
        """The joint call's unconditional conds: the negative with the step's null embeddings, twice."""
        negative = self.run.conds["negative"]
        if self.inversion.null_embeddings is None:
            return negative
        device = self.run.x.device
        embeddings = [torch.cat([e.to(device)] * 2) for e in self.inversion.null_embeddings[step]]
        return with_cross_attn(negative, embeddings)

    def _injection(self, step):
        return step < self.config.cross_steps, step < self.config.self_steps

    # ---- optimisation ---------------------------------------------------------------------
    def record_reconstruction(self, step, x_rec, early_stop=True):
        """The cond-only reconstruction pass the step's iterations inject from (no gradient);
        early_stop=False records every layer (for a full editing forward)."""
        cross, self_attention = self._injection(step)
        self.controller.configure("record", step, cross, self_attention, early_stop=early_stop)
        if not (cross or self_attention):
            return
        with torch.no_grad():
            self._cond_pass("source", x_rec, step)

    def _cond_pass(self, key, x, step):
        try:
            comfy.samplers.calc_cond_batch(self.run.model, [self.run.conds[key]], x, self.sigma(step, x.shape[0]),
                                           self.run.model_options)
        except StopForward:
            pass

    def loss(self, step, x_edit, early_stop=True):
        """Per-image loss [B] (scale included) of the editing branch at x_edit (needs
        `record_reconstruction(step, ...)` first when injection is active)."""
        cross, self_attention = self._injection(step)
        self.controller.configure("edit", step, cross, self_attention, capture=True, early_stop=early_stop)
        self._cond_pass("target", x_edit, step)
        maps = official_order(self.controller.captured)
        self.controller.captured = []
        if len(maps) != len(self.plan.loss_layers):
            raise RuntimeError(f"MAG-Edit captured {len(maps)} loss maps, expected {len(self.plan.loss_layers)}")
        return self.config.scale * combined_loss(self.config.loss, maps, self.loss_mask, self.plan.word_indices), maps

    def loss_and_grad(self, step, x_edit, early_stop=True):
        """(per-image loss [B], d loss / d x_edit, the loss maps) — x in ComfyUI's sampler space."""
        x = leaf(x_edit, requires_grad=True)
        kept = {}

        def loss_fn():
            loss, maps = self.loss(step, x, early_stop)
            kept["loss"], kept["maps"] = loss.detach(), [m.detach() for m in maps]
            return loss.sum()

        _, (grad,) = loss_and_grad(loss_fn, [x])
        return kept["loss"], grad, kept["maps"]

    def optimise(self, step, x_rec, x_edit):
        """The step's `iterations` updates of the editing latent; returns (x_edit, losses [iterations, B])."""
        self.record_reconstruction(step, x_rec)
        factor = sigma_step_factor(float(self.sigmas[step]))
        losses = []
        for iteration in range(self.config.iterations):
            comfy.model_management.throw_exception_if_processing_interrupted()
            loss, grad, maps = self.loss_and_grad(step, x_edit)
            if iteration == 0 and self.config.preview:
                self.before.append(self.word_map(maps))
            x_edit = (x_edit - self.latent_mask * (factor * grad)).detach()
            losses.append(loss)
            self.progress()
        return x_edit, (torch.stack(losses) if losses else None)

    def word_map(self, maps):
        """Edit words' map [B, gh, gw]: mean over loss layers, heads, each word's tokens, words."""
        gh, gw = self.grid_mask.shape[-2:]
        total = 0
        for indices in self.plan.word_indices:
            idx = torch.as_tensor(indices, device=maps[0].device)
            total = total + sum(m.index_select(-1, idx).mean(-1).mean(1) for m in maps) / len(maps)
        word = total / len(self.plan.word_indices)
        return word.reshape(word.shape[0], gh, gw).float()

    # ---- the regular step -----------------------------------------------------------------
    def joint_step(self, step, x_rec, x_edit, capture=False):
        """Both branches' CFG DDIM step in one UNet call, with injection; then the blend."""
        sigma, sigma_next = self.sigmas[step], self.sigmas[step + 1]
        if sigma_next != sigma:
            cross, self_attention = self._injection(step)
            self.controller.configure("joint", step, cross, self_attention, capture=capture)
            x = torch.cat([x_rec, x_edit])
            with torch.no_grad():
                denoised = guided_denoised(self.run.model, x, self.sigma(step, x.shape[0]),
                                           self.run.conds["positive"], self._uncond(step), self.config.cfg,
                                           self.run.model_options)
                x = ddim_step(x, predicted_noise(x, denoised, sigma), sigma, sigma_next)
            if capture and self.controller.captured:
                self.after.append(self.word_map(official_order(self.controller.captured)))
            self.controller.configure("off")
            x_rec, x_edit = x.split(x_rec.shape[0])
        if self.config.blends(step):
            x_edit = x_edit * self.blend_mask + x_rec * (1 - self.blend_mask)
        self.progress()
        return x_rec, x_edit

    def sample(self):
        """The whole run; returns (x_rec, x_edit, losses [optimized steps, iterations, B])."""
        x_rec = leaf(self.inversion.noise.to(self.run.x))
        x_edit = x_rec.clone()
        losses = []
        for step in range(self.config.steps):
            optimise = step < self.config.optimized_steps and self.config.iterations > 0
            if optimise:
                x_edit, step_losses = self.optimise(step, x_rec, x_edit)
                losses.append(step_losses)
            x_rec, x_edit = self.joint_step(step, x_rec, x_edit, capture=optimise and self.config.preview)
        losses = torch.stack(losses) if losses else torch.zeros(0, self.config.iterations, x_rec.shape[0])
        return x_rec, x_edit, losses


def with_editor(model, inversion, source, target, negative, mask, edit_words, config, fn, progress=None,
                observer=None):
    """Validate, patch a clone of `model`, start sampling and call fn(editor) -> tensor [2B, ...]
    (returned after process_latent_out). For the node, tests and benchmarks."""
    config = config or MagEditConfig()
    plan = plan_edit(model, inversion, source, target, negative, mask, edit_words, config)
    patched = model.clone()
    controller = InjectionController(plan.alignment, plan.loss_layers, SELF_MIN_LEVEL)
    controller.observer = observer
    controller.install(patched)
    shape = (2 * plan.batch,) + plan.latent_shape[1:]

    def loop(run):
        check_inversion(inversion, patched, config.steps)
        editor = Editor(run, plan, controller, inversion, progress)
        with autograd_through(run.model):
            return fn(editor)

    return run_sampling_loop(patched, plan.conds, torch.zeros(shape), inversion.sigmas, loop)


def progress_total(config):
    optimised = config.optimized_steps if config.iterations > 0 else 0
    return optimised * config.iterations + config.steps


def mag_edit(model, inversion, source, target, negative, mask, edit_words, config=None, progress=None,
             observer=None):
    """MAG-Edit on an INVERSION; returns a MagEditResult.

    source / target: annotated CONDITIONING (Attention Text Encode) of the source and target
    prompts; negative: the unconditional CONDITIONING (the Inversion node's); mask: MASK of the
    region to edit; edit_words: comma-separated words of the target prompt (or a list).
    progress(done, total) is called after every iteration and step.
    """
    refuse_dit(model, "MAG-Edit")
    config = config or MagEditConfig()
    total = progress_total(config)
    done = [0]

    def tick():
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    found = {}

    def fn(editor):
        x_rec, x_edit, losses = editor.sample()
        # Once, after sampling (NaN latents would also break the preview).
        check_finite(torch.cat([x_rec, x_edit]), "MAG-Edit's sampled latents")
        if editor.before or editor.after:
            check_finite(torch.stack(editor.before + editor.after), "MAG-Edit's edit-word attention")
        found["losses"] = losses.detach().cpu()
        found["before"] = torch.stack(editor.before).mean(0).cpu() if editor.before else None
        found["after"] = torch.stack(editor.after).mean(0).cpu() if editor.after else None
        found["latent_mask"] = editor.latent_mask.cpu()
        return torch.cat([x_rec, x_edit]).detach()

    out = with_editor(model, inversion, source, target, negative, mask, edit_words, config, fn,
                      progress=tick, observer=observer)
    reconstruction, samples = out.split(out.shape[0] // 2)
    return MagEditResult(samples=samples, reconstruction=reconstruction, losses=found["losses"],
                         latent_mask=found["latent_mask"], before=found["before"], after=found["after"])


def sigma_step_factor(sigma):
    """The factor on grad_x L of the official update: sigma (1 + sigma^2) (see the module docstring)."""
    return sigma * (1.0 + sigma * sigma)


__all__ = ["MagEditConfig", "MagEditResult", "Editor", "mag_edit", "with_editor", "plan_edit", "prepare_mask",
           "paired_conditioning", "edit_token_indices", "sigma_step_factor"]
