"""The catalog's copy of torchvision's weights enums (copied so that serving needs no torchvision)."""

from __future__ import annotations

import pytest
from torchvision.models import get_model_weights

from service.imaging import Interpolation, Preprocessing
from service.models.catalog import CATALOG


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_the_official_weights_are_torchvisions_own(name):
    spec = CATALOG[name]
    enum = get_model_weights(spec.arch)
    assert [w.tag for w in spec.official_weights] == [member.name for member in enum]
    for ours, member in zip(spec.official_weights, enum, strict=True):
        transform = member.transforms()
        assert ours.url == member.url
        assert ours.is_default == (member is enum.DEFAULT)
        assert ours.sha256_prefix in member.url
        assert ours.preprocessing == Preprocessing(
            resize_size=int(transform.resize_size[0]),
            crop_size=int(transform.crop_size[0]),
            interpolation=Interpolation(transform.interpolation.value),
            antialias=bool(transform.antialias),
            mean=tuple(transform.mean),
            std=tuple(transform.std),
        )
        assert len(member.meta["categories"]) == 1000
