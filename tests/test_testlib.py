"""The test helpers themselves: a tiny model whose weights depend on leftover memory makes every
test on it pass or fail by chance."""
import pytest
import torch

from ae_testlib import dit_text


def _filled_empty(empty, value):
    """torch.empty whose memory holds `value`: stands in for whatever leftover memory holds."""
    def filled(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(value) if tensor.is_floating_point() else tensor
    return filled


@pytest.mark.parametrize("family", dit_text.FAMILIES)
def test_tiny_text_encoders_initialise_every_weight(family, comfy_host, monkeypatch):
    """Every parameter of the tiny T5 / CLIP / Qwen encoders is set by the helper, whatever the
    allocated memory held: builds over NaN-filled and over 3.0-filled memory are finite and equal."""
    dit_text.require_dit_clip(family)
    build = dit_text.build_dit_clip.__wrapped__  # not the cached one
    params = []
    for leftover in (float("nan"), 3.0):
        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", _filled_empty(torch.empty, leftover))
            params.append(dict(build(family).cond_stage_model.named_parameters()))
    over_nan, over_three = params
    assert over_nan.keys() == over_three.keys()
    for name, param in over_nan.items():
        assert torch.isfinite(param).all(), f"{family}: {name} left as allocated"
        assert torch.equal(param, over_three[name]), f"{family}: {name} depends on the allocated memory"


@pytest.mark.parametrize("family, ip2p", [("sd15", False), ("sd15", True), ("sd2", False), ("sdxl", False),
                                          ("sdxl", True)])
def test_tiny_unet_config_is_what_the_host_detects_from_its_weights(family, ip2p, comfy_host):
    """The tiny UNets are built from a config dict: it must hold exactly what the running host's
    own model detection reads from their weights, so a field a newer ComfyUI adds to UNet
    detection shows up here instead of as a model that differs from a loaded checkpoint."""
    import comfy.model_detection

    from ae_testlib import host

    model = host.build_model(family, ip2p=ip2p)
    prefix = "model.diffusion_model."
    state_dict = {prefix + key: value for key, value in model.model.diffusion_model.state_dict().items()}
    detected = comfy.model_detection.detect_unet_config(state_dict, prefix)
    ours = model.model.model_config.unet_config
    assert {key: (ours.get(key), value) for key, value in detected.items() if ours.get(key) != value} == {}


@pytest.mark.parametrize("family, expected", [("flux", "Flux"), ("chroma", "Chroma"), ("sd3", "SD3"),
                                              ("qwen", "QwenImage")])
def test_tiny_dits_are_the_class_the_host_detects(family, expected, comfy_host):
    """dit_host builds each tiny DiT from the config the host's detection reads from a checkpoint
    skeleton; the supported_models class it picks is the family's own, and the built model's
    weights are detected as that config again (the tiny widths aside)."""
    import comfy.model_detection

    from ae_testlib import dit_host

    model = dit_host.build(family)
    assert type(model.model.model_config).__name__ == expected
    redetected = comfy.model_detection.detect_unet_config(model.model.diffusion_model.state_dict(), "")
    tiny = set(dit_host._TINY[family])  # the widths set after detection (older hosts assume the full ones)
    assert {key: value for key, value in redetected.items() if key not in tiny} == \
        {key: value for key, value in dit_host.detected_config(family).items() if key not in tiny}
