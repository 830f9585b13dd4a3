"""Swin v2 across the 0.9 move of patch merging to the stage start, both ways, proven on outputs."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "swinv2_tiny_window8_256"


@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13"), ("0.9.16", "0.6.13")])
def test_swinv2_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("swin_transformer_v2.downsample-at-stage-start" in s for s in result.steps)
