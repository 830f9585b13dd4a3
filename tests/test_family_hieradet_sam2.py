"""HieraDet across the 1.0.20 LayerScale fix, both ways, proven on outputs."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "hieradet_small"


@pytest.mark.parametrize("src,dst", [("1.0.15", INSTALLED), (INSTALLED, "1.0.15")])
def test_hieradet_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("hieradet_sam2.layer-scale" in s for s in result.steps)
