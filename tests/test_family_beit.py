"""BEiT across 0.9.16, which stopped saving `relative_position_index`: the generic
step drops it going up and fills it from a fresh model going down, no migration."""
import pytest

from conftest import ATOL, INSTALLED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "beit_base_patch16_224"


@pytest.mark.parametrize("src,dst,step", [("0.9.2", INSTALLED, "drop"), (INSTALLED, "0.9.2", "fill")])
def test_beit_converts_with_equal_outputs(roundtrip, src, dst, step):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert any(s.startswith(step + " ") and "buffers" in s for s in result.steps)
