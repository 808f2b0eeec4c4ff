"""The seed papers' tiny pipelines (`models.tiny_seeds`): every sub-model from config, fixed weights."""

from __future__ import annotations

import pytest
import torch

from compactfusion_xdit.models import registry, tiny_seeds

PIPELINES = {"tiny-svd": "StableVideoDiffusionPipeline", "tiny-cogvideox": "CogVideoXPipeline",
             "tiny-audioldm2": "AudioLDM2Pipeline"}


def weights(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            out.update({f"{name}.{k}": v for k, v in component.state_dict().items()})
    return out


def test_the_registry_names_them_with_their_pipelines():
    assert registry.TINY_SEEDS == tiny_seeds.NAMES == tuple(PIPELINES)
    for name, class_name in PIPELINES.items():
        assert registry.BUILTIN_CONFIGS[name][0] == class_name
    assert set(registry.UNET_PIPELINES) == {"StableVideoDiffusionPipeline", "AudioLDM2Pipeline"}


def test_unknown_name_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="tiny-svd, tiny-cogvideox, tiny-audioldm2"):
        tiny_seeds.build_pipeline("tiny-sdxl-video")


@pytest.mark.parametrize("name", list(PIPELINES))
def test_two_builds_have_bitwise_equal_weights_and_leave_the_global_rng_alone(name):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = tiny_seeds.build_pipeline(name)
    assert torch.equal(torch.rand(4), expected)
    a, b = weights(first), weights(tiny_seeds.build_pipeline(name))
    assert type(first).__name__ == PIPELINES[name] and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_image_is_a_fixed_rgb_gradient():
    image = tiny_seeds.default_image(8, 12)
    assert image.size == (12, 8) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((11, 7)) == (255, 255, 255)
