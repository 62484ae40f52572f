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
