"""pytest fixtures on the real ComfyUI host (models are cached per session: building is cheap,
but each test must not mutate them; tests that patch use model.clone())."""
import functools

import pytest
import torch

from . import host
from .pack import pack_module


@functools.lru_cache(maxsize=None)
def model(family="sd15", ip2p=False):
    return host.build_model(family, ip2p=ip2p)


@functools.lru_cache(maxsize=None)
def clip(family="sd15"):
    return host.build_clip(family)


def encode(family, text):
    nodes = pack_module("nodes")
    with torch.inference_mode():
        return nodes.encode.AttentionTextEncode().run(clip(family), text)[0]


@pytest.fixture(scope="session")
def comfy_host():
    return host.import_host()
