"""CoAtNet across the 0.9 head change, both ways: old files load into newer releases
built with the old head; the new head's pre-logits layer has no way back."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "coatnet_0_224"
OLD_HEAD = {"head_hidden_size": 0}


@pytest.mark.parametrize("dst", [INSTALLED, "0.9.16"])
def test_old_coatnet_loads_with_the_old_head(roundtrip, dst):
    result, diff = roundtrip(MODEL, "0.6.13", dst)
    assert diff <= ATOL
    assert result.model.kwargs["head_hidden_size"] == 0


def test_new_coatnet_with_the_old_head_goes_back(roundtrip):
    result, diff = roundtrip(MODEL, INSTALLED, "0.6.13", kwargs=OLD_HEAD)
    assert diff <= ATOL
    assert "head_hidden_size" not in result.model.kwargs


def test_new_coatnet_with_pre_logits_cannot_go_back(targets, tmp_path):
    made = make_checkpoint(INSTALLED, MODEL)
    with pytest.raises(NoPlanError, match=MODEL):
        convert(made.path, tmp_path / "out.safetensors", targets("0.6.13"))
