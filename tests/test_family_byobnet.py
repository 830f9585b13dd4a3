"""BYOBNet: timm 0.5 rebuilt botnet26t_256 and its kin (fewer blocks per stage, other
attention widths) under the same names, and 0.6 changed the eps of the global-context
norm. The nets differ, so no weights carry over, and cachectl says so instead of guessing."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)


@pytest.mark.parametrize("src,dst", [("0.4.12", INSTALLED), (INSTALLED, "0.4.12")])
def test_rebuilt_botnet_has_no_plan(targets, tmp_path, src, dst):
    made = make_checkpoint(src, "botnet26t_256")
    with pytest.raises(NoPlanError, match="no plan loads strictly into botnet26t_256"):
        convert(made.path, tmp_path / "out.safetensors", targets(dst))


@pytest.mark.parametrize("src,dst,why", [
    ("0.4.12", INSTALLED, "gcresnet50t computes differently"),
    (INSTALLED, "0.4.12", "no plan loads strictly into gcresnet50t"),
])
def test_global_context_eps_change_is_refused(targets, tmp_path, src, dst, why):
    made = make_checkpoint(src, "gcresnet50t")
    with pytest.raises(NoPlanError, match=why):
        convert(made.path, tmp_path / "out.safetensors", targets(dst))
