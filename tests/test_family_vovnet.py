"""VoVNet: ese_vovnet39b_evos changed its EvoNorm group count in timm 0.5 with no
argument to restore it, so files are refused across that change, both ways."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "ese_vovnet39b_evos"


@pytest.mark.parametrize("src,dst", [("0.4.12", INSTALLED), (INSTALLED, "0.4.12")])
def test_evonorm_groups_change_is_refused(targets, tmp_path, src, dst):
    made = make_checkpoint(src, MODEL)
    with pytest.raises(NoPlanError, match="%s computes differently" % MODEL):
        convert(made.path, tmp_path / "out.safetensors", targets(dst))
