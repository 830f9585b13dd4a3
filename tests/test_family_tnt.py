"""TNT across the 1.0.20 projection fix: old files load into 1.0.20+ built with
`legacy=True` and legacy files go back; the fixed projection has no way back."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "tnt_s_patch16_224"
LEGACY = {"legacy": True}


@pytest.mark.parametrize("src", ["0.6.13", "1.0.15"])
def test_old_tnt_loads_with_the_legacy_projection(roundtrip, src):
    result, diff = roundtrip(MODEL, src, INSTALLED)
    assert result.model.kwargs["legacy"] is True
    assert diff <= ATOL


def test_legacy_tnt_goes_back(roundtrip):
    result, diff = roundtrip(MODEL, INSTALLED, "1.0.15", kwargs=LEGACY)
    assert "legacy" not in result.model.kwargs
    assert diff <= ATOL


def test_tnt_with_the_fixed_projection_cannot_go_back(targets, tmp_path):
    made = make_checkpoint(INSTALLED, MODEL)
    with pytest.raises(NoPlanError, match=MODEL):
        convert(made.path, tmp_path / "out.safetensors", targets("1.0.15"))
