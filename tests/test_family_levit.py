"""LeViT across the 0.9 regrouping into stages, both ways: timm 1.0.14+ converts neither."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "levit_128s"


@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), ("0.4.12", "0.9.16"), (INSTALLED, "0.6.13"), ("0.9.16", "0.4.12")])
def test_levit_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("levit.stages" in s for s in result.steps)
