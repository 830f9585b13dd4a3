"""ConvNeXt: the 0.9 renames of the in22k models carry over with their classifier size,
both ways; timm 0.5.4 normalises with another variance, so convnext_tiny_hnf, whose
0.5.4 layout is its own, is refused across that release, both ways."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

IN22K_CLASSES = 21841


def test_in22k_model_finds_its_new_name(roundtrip):
    result, diff = roundtrip("convnext_tiny_in22k", "0.6.13", INSTALLED)
    assert diff <= ATOL
    assert result.model.kwargs["num_classes"] == IN22K_CLASSES


def test_in22k_sized_model_goes_back(roundtrip):
    result, diff = roundtrip("convnext_tiny", INSTALLED, "0.6.13", kwargs={"num_classes": IN22K_CLASSES})
    assert diff <= ATOL
    assert result.model.kwargs["num_classes"] == IN22K_CLASSES


@pytest.mark.parametrize("src,dst", [("0.5.4", INSTALLED), (INSTALLED, "0.5.4")])
def test_hnf_is_refused_across_0_5_4(targets, tmp_path, src, dst):
    made = make_checkpoint(src, "convnext_tiny_hnf")
    with pytest.raises(NoPlanError, match="convnext_tiny_hnf computes differently"):
        convert(made.path, tmp_path / "out.safetensors", targets(dst))
