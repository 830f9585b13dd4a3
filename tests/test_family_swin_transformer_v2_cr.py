"""Swin v2 "cr" across the 0.9 move of the classifier to `head.fc`, both ways, proven on outputs."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "swinv2_cr_tiny_224"


@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13")])
def test_swinv2_cr_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("swin_transformer_v2_cr.head-fc" in s for s in result.steps)
