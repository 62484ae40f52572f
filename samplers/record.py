"""KSampler that records cross-attention maps on the side (UNet cross-attention, DiT joint attention)."""
from ..attention.dit_families import dit_family
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
                     normalise="text"):
    """Sample like KSampler on a patched clone; return (LATENT, ATTENTION_MAPS)."""
    check_sampling(steps, cfg, denoise)
    samples = check_latent(model, latent_samples(model, latent), "latent_image", noise_mask=latent.get("noise_mask"))
    prompt, prompt_name = (positive, "positive") if branch == "cond" else (negative, "negative")
    patched = model.clone()
    sigmas = schedule(patched, steps, sampler_name, scheduler, denoise)
    recorder = make_recorder(patched, branch, recorded_length(prompt), level, parts, dit_blocks, normalise)
    recorder.install(patched, samples.shape[-2:], sigmas)  # the latent sampled (an empty one may be resized)
    out = ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, sigmas,
                  denoise=denoise)
    return out, recorder.maps(annotation_of(prompt), no_words_reason(prompt, prompt_name))
