"""PiT across the 0.9 move of pooling to the stage start, both ways, proven on outputs.

Distilled PiT also changed math without changing keys: timm 0.9.2-1.0.20 feed the class
token to `head_dist` too, 0.6.13 and 1.0.31 the distillation token, so only releases on
the same side of that bug can share a distilled checkpoint."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODELS = ["pit_ti_224", "pit_ti_distilled_224"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13")])
def test_pit_converts_with_equal_outputs(roundtrip, model, src, dst):
    result, diff = roundtrip(model, src, dst)
    assert diff <= ATOL
    assert any("pit.pool-at-stage-start" in s for s in result.steps)


def test_distilled_pit_is_refused_for_the_releases_that_changed_its_math(targets, tmp_path):
    model = "pit_ti_distilled_224"
    made = make_checkpoint("0.6.13", model)
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets("0.9.16"))
    assert model in exc.value.problem
