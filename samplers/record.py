"""KSampler that records cross-attention maps on the side."""
from ..attention.recorder import AttentionRecorder
from ..attention.tokens import annotation_of, no_words_reason
from .common import check_latent, check_sampling, ksample, latent_samples, schedule


def sample_recording(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                     denoise=1.0, level=2, parts=("input", "output"), branch="cond"):
    """Sample like KSampler on a patched clone; return (LATENT, ATTENTION_MAPS)."""
    check_sampling(steps, cfg, denoise)
    check_latent(model, latent_samples(model, latent), "latent_image", noise_mask=latent.get("noise_mask"))
    prompt, prompt_name = (positive, "positive") if branch == "cond" else (negative, "negative")
    patched = model.clone()
    sigmas = schedule(patched, steps, sampler_name, scheduler, denoise)
    recorder = AttentionRecorder(level=level, parts=parts, branch=branch, n_tokens=prompt[0][0].shape[1])
    recorder.install(patched, latent["samples"].shape[-2:], sigmas)
    out = ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, sigmas,
                  denoise=denoise)
    return out, recorder.maps(annotation_of(prompt), no_words_reason(prompt, prompt_name))
