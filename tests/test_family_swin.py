"""Swin v1 across the 0.9 layout change, both ways, proven on outputs."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "swin_tiny_patch4_window7_224"


@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), ("0.6.13", "0.9.16"), (INSTALLED, "0.6.13"), ("0.9.16", "0.6.13")])
def test_swin_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    if src == "0.6.13" or dst == "0.6.13":
        assert any("swin_transformer.downsample-at-stage-start" in s for s in result.steps)


def test_fine_tuned_swin_keeps_its_classes(roundtrip):
    result, diff = roundtrip(MODEL, "0.6.13", INSTALLED, kwargs={"num_classes": 7})
    assert result.model.kwargs["num_classes"] == 7
    assert result.tag.best.confidence == "exact-but-classifier"
    assert diff <= ATOL
