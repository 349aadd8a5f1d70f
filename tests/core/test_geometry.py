"""Video geometry: the Wan 2.1 rules restated from first principles (16 fps, 4T − 3 frames)."""

import pytest

from headforcing_core import geometry as g


@pytest.mark.parametrize("latent", [1, 2, 7, 21, 240])
def test_latent_and_video_frames_round_trip(latent):
    video = g.video_frames_for(latent)
    assert video == 1 + 4 * (latent - 1)  # the first latent frame decodes to one frame, every other to four
    assert g.latent_frames_for(video) == latent
    # ComfyUI's Wan rule rounds down: the 3 frame counts past a boundary give the same latent count
    assert g.latent_frames_for(video + 3) == latent and g.latent_frames_for(video + 4) == latent + 1


def test_seconds_rules():
    assert g.video_frames_for_seconds(5) == 81  # Wan's 81-frame, 5-second clip
    assert g.video_frames_for_seconds(60) == 961
    assert g.latent_frames_for(g.video_frames_for_seconds(60)) == 241
    # what a continuation of s seconds adds: 4 latent frames = 16 video frames per second
    assert g.latent_frames_for_seconds(60) == 240 and g.added_video_frames(240) == 960
    assert g.latent_frames_for_seconds(0.01) == 1
    assert g.seconds_of(21) == 81 / 16
    assert g.seconds_to_chunked_frames(5, 3) == 21 and g.seconds_to_chunked_frames(0.1, 3) == 3


def test_chunks_and_model_calls():
    assert g.chunk_bounds(21, 7, 3) == [(21, 3), (24, 3), (27, 1)]
    assert g.chunk_bounds(0, 0, 3) == []
    with pytest.raises(ValueError, match="frames per block"):
        g.chunk_bounds(0, 3, 0)
    assert g.model_calls(21, 3, 4) == 7 * 5
    # Causal Forcing++: the first chunk of a 2-step model takes 4 steps
    assert g.model_calls(5, 1, 2, first_steps=4) == 5 * 3 + 2
    assert g.model_calls(0, 1, 2, first_steps=4) == 0


def test_the_longest_video_is_the_samplers_length_limit():
    assert g.MAX_LATENT_FRAMES == g.latent_frames_for(g.video_frames_for_seconds(g.MAX_VIDEO_SECONDS)) == 4_000_001
