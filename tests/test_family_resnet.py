"""ResNet: ecaresnext50t_32x4d across its 1.0.31 depth change, both ways, proven on
outputs; releases before 0.9 cannot build the 50-layer net under that name."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "ecaresnext50t_32x4d"


@pytest.mark.parametrize("src,dst,layers", [("1.0.20", INSTALLED, [2, 2, 2, 2]), (INSTALLED, "1.0.20", [3, 4, 6, 3])])
def test_ecaresnext_keeps_its_depth(roundtrip, src, dst, layers):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL
    assert result.model.kwargs["layers"] == layers


def test_ecaresnext_of_the_same_depth_needs_no_override(roundtrip):
    result, diff = roundtrip(MODEL, "1.0.20", "0.6.13")
    assert diff <= ATOL
    assert "layers" not in result.model.kwargs


def test_deep_ecaresnext_has_no_plan_before_0_9(targets, tmp_path):
    made = make_checkpoint(INSTALLED, MODEL)
    with pytest.raises(NoPlanError, match=MODEL):
        convert(made.path, tmp_path / "out.safetensors", targets("0.6.13"))
