"""masks/video.py on plain tensors: Wan's latent-frame -> decoded-frame mapping, per-video
normalisation and temporal smoothing (no ComfyUI needed)."""
import pytest
import torch

from ae_testlib.pack import pack_module

video = pack_module("masks.video")


@pytest.mark.parametrize("latent_frames, decoded", [(1, 1), (2, 5), (3, 9), (9, 33), (21, 81)])
def test_decoded_frames_and_their_latent_frames(latent_frames, decoded):
    assert video.pixel_frames(latent_frames) == decoded
    index = video.latent_frame_of(decoded, latent_frames)
    assert index[0] == 0 and index[-1] == latent_frames - 1
    for frame in range(1, decoded):  # frames 1-4 from latent frame 1, 5-8 from 2, ...
        assert index[frame] == (frame - 1) // 4 + 1


@pytest.mark.parametrize("bad", [0, 2, 4, 6, 32])
def test_frame_counts_wan_cannot_decode(bad):
    with pytest.raises(ValueError, match=f"{bad} frames, which Wan's VAE cannot decode: it decodes 1 \\+ 4k"):
        video.latent_frame_of(bad)


def test_a_weak_frame_stays_weak():
    """Min-max over the whole video: the frame where the word barely shows gets no mask."""
    maps = torch.zeros(1, 3, 4, 4)
    maps[0, 0, 1:3, 1:3] = 1.0
    maps[0, 1, 1:3, 1:3] = 0.2  # the word weak in latent frame 1
    masks = video.video_word_mask(maps, (8, 8), blur_sigma=0.0, threshold=0.5)
    assert masks.shape == (1, 9, 8, 8)
    assert masks[0, 0].sum() > 0 and masks[0, 1:5].sum() == 0 and masks[0, 5:].sum() == 0


def test_temporal_smoothing_spreads_along_frames_only():
    maps = torch.zeros(1, 5, 3, 3)
    maps[0, 2, 1, 1] = 1.0
    smooth = video.temporal_blur(maps, 1.0)
    series = smooth[0, :, 1, 1]
    assert series.argmax() == 2 and torch.isclose(series[1], series[3]) and series[1] > 0  # symmetric in time
    assert float(smooth[0][:, [0, 0, 2, 2], [0, 2, 0, 2]].abs().max()) == 0  # other pixels untouched
    assert torch.equal(video.temporal_blur(maps, 0.0), maps)
