"""Record cross-attention probabilities during ComfyUI sampling, as running sums on the device.

The recorder sets attn2 replace patches on a model clone, only on the layers of one resolution
level. Each patch returns exactly what the layer would return without it (the inner patch such as
IPAdapter's, or ComfyUI's own attention) and adds softmax(QK^T/sqrt(d)) of the chosen branch to a
running sum, so memory does not grow with the number of steps.
"""
import torch

from .layers import ReplacePatch, install_replace, select_layers
from .maps import AttentionMaps
from .tokens import ANNOTATION_KEY

BRANCHES = {"cond": 0, "uncond": 1}
BRANCH_INPUTS = {0: "positive", 1: "negative"}  # the guider's conds key of each branch
CONDS_KEY = "attention_edit_record_conds"


def head_probs(q, k, heads):
    """softmax(Q K^T / sqrt(d)) per head, in float32: [batch, heads, queries, keys]."""
    batch, queries, inner = q.shape
    dim_head = inner // heads
    qh = q.reshape(batch, queries, heads, dim_head).transpose(1, 2).float()
    kh = k.reshape(batch, k.shape[1], heads, dim_head).transpose(1, 2).float()
    return (torch.matmul(qh, kh.transpose(-1, -2)) * dim_head ** -0.5).softmax(dim=-1)


def attention_probs(q, k, heads):
    """softmax(Q K^T / sqrt(d)) averaged over heads, in float32: [batch, queries, keys]."""
    return head_probs(q, k, heads).mean(dim=1)


def fold_tokens(x, n_tokens):
    """[..., keys] -> [..., n_tokens]. ComfyUI batches conds of different lengths by repeating each
    to a common length; the probabilities of a prompt's repeated copies add up to its own."""
    keys = x.shape[-1]
    if keys == n_tokens:
        return x
    if keys % n_tokens:
        raise ValueError(f"cross-attention has {keys} keys, not a multiple of the prompt's {n_tokens} tokens")
    return x.reshape(*x.shape[:-1], keys // n_tokens, n_tokens).sum(-2)


def step_of_sigma(schedule, sigma):
    """Index i of the sampling step whose interval (schedule[i+1], schedule[i]] holds sigma."""
    later = (schedule[1:] >= sigma * (1 - 1e-4)).sum()
    return min(int(later), len(schedule) - 2)


class _RecordingPatch(ReplacePatch):
    def __init__(self, recorder, layer, inner):
        super().__init__(inner)
        self.recorder = recorder
        self.layer = layer

    def __call__(self, q, k, v, extra_options):
        out = self.attend(q, k, v, extra_options)
        self.recorder.observe(self.layer, q, k, extra_options)
        return out


def branch_rows(chunks, branch, batch, device, keep=None):
    """(rows, count): the batch rows of every chunk of cond `branch` in a call whose chunks are
    `chunks` (cond_or_uncond), as a slice (a view) when they are contiguous, else an index
    tensor; (None, 0) when the call has none. keep: None, or one bool per chunk (False leaves
    a chunk of the branch out: another prompt of that branch, AttentionRecorder.chunks_kept)."""
    per_chunk = batch // len(chunks)
    picked = [i for i, kind in enumerate(chunks) if kind == branch and (keep is None or keep[i])]
    if not picked:
        return None, 0
    if picked == list(range(picked[0], picked[-1] + 1)):
        return slice(picked[0] * per_chunk, (picked[-1] + 1) * per_chunk), len(picked)
    index = [i * per_chunk + j for i in picked for j in range(per_chunk)]
    return torch.tensor(index, device=device), len(picked)


class AttentionRecorder:
    """Running mean of cross-attention maps over chosen layers, steps, branch and tokens.

    level: resolution level (2 = 1/4 of the latent, "16x16" for SD1.x at 512 px).
    parts: UNet parts to record ("input", "middle", "output").
    branch: "cond" or "uncond".
    steps: None for every step, else a container of step indices (needs the schedule).
    n_tokens: the recorded prompt's token count; keys of longer batched contexts are folded to it.
    """

    family = None  # the DiT family the maps come from (DiTRecorder); None for UNet layers
    normalise = None  # DiT rows: "text" or "joint" (DiTRecorder); None for UNet cross-attention
    frames = None  # video (Wan): latent frames, the maps' frame axis; None for images
    pixel_scale = 8  # pixels per latent cell (the VAE's spatial factor)

    def __init__(self, level=2, parts=("input", "output"), branch="cond", steps=None, n_tokens=None):
        if branch not in BRANCHES:
            raise ValueError(f"'branch' must be one of {list(BRANCHES)}, got {branch!r}")
        self.level = level
        self.parts = tuple(parts)
        self.branch = BRANCHES[branch]
        self.steps = None if steps is None else set(steps)
        self.n_tokens = n_tokens  # the recorded prompt's token count (None: the first call's key count)
        self.recorded = None  # uuids of the branch's annotated conds when plain ones are mixed in
        self._continued = None  # ATTENTION_MAPS of an earlier sampler to add in (continue_from)
        self.layers = []
        self.schedule = None
        self.latent_hw = None
        self.reset()

    def reset(self):
        self.total = None  # [batch, h*w, tokens] float32 on the sampling device
        self.count = 0
        self.steps_seen = set()
        self._last_sigma = (None, None)

    def install(self, model_clone, latent_hw, schedule=None):
        """Patch `model_clone` (a ModelPatcher.clone(), never the caller's model) and return it."""
        self.layers = select_layers(model_clone, self.level, self.parts)
        self.latent_hw = tuple(latent_hw)
        self.schedule = None if schedule is None else schedule.detach().float().cpu()
        for layer in self.layers:
            install_replace(model_clone, "attn2", layer,
                            lambda inner, layer=layer: _RecordingPatch(self, layer, inner))
        self.watch_conds(model_clone)
        return model_clone

    def watch_conds(self, model_clone):
        """Conditioning Combine of an Attention Text Encode prompt and a plain one gives the branch
        two conds, which ComfyUI may batch into one call: cond_or_uncond cannot tell them apart,
        but each cond has a uuid (transformer_options["uuids"], one per chunk). An OUTER_SAMPLE
        wrapper reads the guider's conds once per run and keeps the annotated ones' uuids."""
        import comfy.patcher_extension

        model_clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CONDS_KEY,
                                         self._outer_sample)

    def _outer_sample(self, executor, *args, **kwargs):
        conds = (getattr(executor.class_obj, "conds", None) or {}).get(BRANCH_INPUTS[self.branch]) or []
        annotated = [cond for cond in conds if ANNOTATION_KEY in cond]
        # only a mix needs telling apart: all annotated (or none, a plain prompt) records every chunk
        mixed = 0 < len(annotated) < len(conds)
        self.recorded = {cond.get("uuid") for cond in annotated} if mixed else None
        return executor(*args, **kwargs)

    def chunks_kept(self, options):
        """None (every chunk of the branch is the recorded prompt's), or one bool per chunk."""
        if self.recorded is None:
            return None
        uuids = options.get("uuids")
        if uuids is None or None in self.recorded:
            raise RuntimeError(
                "this ComfyUI does not say which prompt each batch row belongs to, so a prompt joined to the "
                "recorded one (Conditioning Combine with a plain CLIP Text Encode) cannot be left out of its "
                "maps. Record with the Attention Text Encode prompt alone, or encode every joined prompt "
                "with Attention Text Encode.")
        return [uuid in self.recorded for uuid in uuids]

    @property
    def grid(self):
        return self.layers[0].grid(*self.latent_hw)

    def _current_step(self, extra_options):
        sigmas = extra_options.get("sigmas")
        schedule = self.schedule
        if schedule is None and extra_options.get("sample_sigmas") is not None:
            schedule = self.schedule = extra_options["sample_sigmas"].detach().float().cpu()
        if sigmas is None or schedule is None:
            return None
        if self._last_sigma[0] is not sigmas:  # one look-up per UNet call, not per layer
            self._last_sigma = (sigmas, step_of_sigma(schedule, float(sigmas.max())))
        return self._last_sigma[1]

    def observe(self, layer, q, k, extra_options):
        h, w = self.grid
        if q.shape[1] != h * w:
            return  # an area-conditioned chunk, not the whole latent
        if self.steps is not None:
            step = self._current_step(extra_options)
            if step is None or step not in self.steps:
                return
            self.steps_seen.add(step)
        rows, count = branch_rows(extra_options.get("cond_or_uncond") or [0], self.branch, q.shape[0], q.device,
                                  self.chunks_kept(extra_options))
        if rows is None:
            return
        if self.n_tokens is None:
            self.n_tokens = k.shape[1]
        probs = fold_tokens(attention_probs(q[rows], k[rows], extra_options["n_heads"]), self.n_tokens)
        probs = probs.reshape(count, -1, *probs.shape[1:]).sum(0)
        if self.total is None:
            self.total = torch.zeros_like(probs)
        self.total += probs
        self.count += count

    def mean(self):
        """Mean map so far, [batch, h, w, tokens] ([batch, frames, h, w, tokens] for video), or None
        before anything was recorded."""
        self._merge_continued()
        if self.total is None:
            return None
        return (self.total / self.count).reshape(self.total.shape[0], *self.grid, self.total.shape[-1])

    def maps(self, tokens=None, no_words=None):
        """The recording as an ATTENTION_MAPS object (no_words: why `tokens` is None)."""
        mean = self.mean()
        if mean is None:
            raise RuntimeError(
                "no cross-attention was recorded: the sampling ran no step at the chosen layers. Check "
                "that 'steps' is at least 1 and 'denoise' above 0 (denoise 0 runs no step), that the "
                "conditioning covers the whole image (no area or mask conditioning alone), and, for the "
                "negative (uncond) branch, that cfg is not 1.0 (ComfyUI then skips the negative prompt)"
            )
        return AttentionMaps(probs=mean, tokens=tokens, latent_hw=self.latent_hw, level=self.level,
                             no_words=no_words, family=self.family, normalise=self.normalise,
                             frames=self.frames, pixel_scale=self.pixel_scale, count=self.count)

    def continue_from(self, maps, input_name="attention_maps"):
        """Start from the running mean of `maps` (an earlier sampler's recording of the same
        latent, e.g. Wan 2.2 14B's high-noise expert before its low-noise one), so the maps this
        recorder returns are the mean over both samplers' steps. Call after install."""
        what = (self.family or "UNet", self.normalise, self.level, tuple(self.latent_hw), self.frames)
        theirs = (maps.family or "UNet", maps.normalise, maps.level, tuple(maps.latent_hw), maps.frames)
        if what != theirs or not maps.count:
            raise ValueError(
                f"'{input_name}' cannot be continued here: it was recorded on {theirs[0]} ({theirs[1] or 'UNet'} rows, "
                f"latent {theirs[3]}, frames {theirs[4]}, level {theirs[2]}), this sampler records {what[0]} "
                f"({what[1] or 'UNet'} rows, latent {what[3]}, frames {what[4]}, level {what[2]}). Connect the maps "
                "of the previous sampler of the same latent, recorded with the same settings.")
        self._continued = maps

    def _merge_continued(self):
        maps, self._continued = self._continued, None
        if maps is None:
            return
        previous = maps.probs.reshape(maps.probs.shape[0], -1, maps.probs.shape[-1]) * maps.count
        if self.total is None:
            self.total, self.count = previous.clone(), maps.count
            return
        if previous.shape != self.total.shape:
            raise ValueError(f"'attention_maps' to continue hold {tuple(maps.probs.shape)} maps (batch, grid, tokens); "
                             f"this sampler's are {(self.total.shape[0], *self.grid, self.total.shape[-1])}: "
                             "connect the previous sampler of the same latent and prompt")
        self.total += previous.to(self.total.device)
        self.count += maps.count
