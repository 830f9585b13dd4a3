"""Families whose only change is timm 0.9 folding `*_in21k` models into their base name
with a pretrained tag: the file keeps its classifier size (num_classes), both ways."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

# (old name, new base name, classes of the in21k classifier)
RENAMED = [
    ("mobilenetv3_large_100_miil_in21k", "mobilenetv3_large_100", 11221),
    ("tf_efficientnetv2_s_in21k", "tf_efficientnetv2_s", 21843),
    ("mixer_b16_224_miil_in21k", "mixer_b16_224", 11221),
    ("resnetv2_50x1_bitm_in21k", "resnetv2_50x1_bit", 21843),
]


@pytest.mark.parametrize("old,new,classes", RENAMED, ids=[r[0] for r in RENAMED])
def test_in21k_model_upgrades_under_its_new_name(roundtrip, old, new, classes):
    result, diff = roundtrip(old, "0.6.13", INSTALLED)
    assert diff <= ATOL
    assert result.model.kwargs["num_classes"] == classes


@pytest.mark.parametrize("old,new,classes", RENAMED, ids=[r[1] for r in RENAMED])
def test_in21k_sized_model_goes_back(roundtrip, old, new, classes):
    result, diff = roundtrip(new, INSTALLED, "0.6.13", kwargs={"num_classes": classes})
    assert diff <= ATOL
    assert result.model.kwargs["num_classes"] == classes
