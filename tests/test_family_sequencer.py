"""Sequencer2d across the 0.9 regrouping into stages, both ways, proven on outputs."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "sequencer2d_s"


@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13")])
def test_sequencer_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any("sequencer.stages" in s for s in result.steps)
