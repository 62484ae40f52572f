"""KSampler that records cross-attention maps on the side (UNet cross-attention, DiT joint attention)."""
from ..attention.families import dit_family
from ..attention.dit_recorder import DiTRecorder
from ..attention.recorder import AttentionRecorder
from ..attention.tokens import annotation_of, no_words_reason, recorded_length
from .common import check_latent, check_sampling, ksample, latent_samples, schedule


def make_recorder(model, branch, n_tokens, level=2, parts=("input", "output"), dit_blocks="",
                  normalise="text"):
    """The recorder for this model: UNet layers by resolution level, DiT models by block."""
    if dit_family(model) is not None:  # (neither a UNet nor a supported DiT: the error names those)
        return DiTRecorder(branch=branch, n_tokens=n_tokens, blocks=dit_blocks, normalise=normalise)
    return AttentionRecorder(level=level, parts=parts, branch=branch, n_tokens=n_tokens)


def sample_recording(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                     denoise=1.0, level=2, parts=("input", "output"), branch="cond", dit_blocks="",
                     normalise="text", advanced=None, previous=None):
    """Sample like KSampler on a patched clone; return (LATENT, ATTENTION_MAPS).
    advanced: KSamplerAdvanced's controls for ksample (add_noise, start_step, last_step,
    force_full_denoise); previous: ATTENTION_MAPS of an earlier sampler of this latent to continue
    (Wan 2.2 14B: the high-noise expert's stage, then the low-noise one's)."""
    check_sampling(steps, cfg, denoise)
    samples = check_latent(model, latent_samples(model, latent), "latent_image", noise_mask=latent.get("noise_mask"))
    prompt, prompt_name = (positive, "positive") if branch == "cond" else (negative, "negative")
    patched = model.clone()
    sigmas = schedule(patched, steps, sampler_name, scheduler, denoise)
    recorder = make_recorder(patched, branch, recorded_length(prompt), level, parts, dit_blocks, normalise)
    # the latent sampled (an empty one may be resized): (H, W), or (F, H, W) with a frame axis
    recorder.install(patched, samples.shape[2:], sigmas)
    if previous is not None:
        recorder.continue_from(previous)
    out = ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, sigmas,
                  denoise=denoise, **(advanced or {}))
    return out, recorder.maps(annotation_of(prompt), no_words_reason(prompt, prompt_name))
