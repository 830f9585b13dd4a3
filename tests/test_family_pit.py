"""PiT across the 0.9 move of pooling to the stage start, both ways, proven on outputs.

Distilled PiT also changed math without changing keys: timm 0.9.0-1.0.24 feed the class
token to `head_dist` too, 0.6.13 and 1.0.31 the distillation token, so only releases on
the same side of that bug can share a distilled checkpoint."""
import pytest
import timm

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint, run_in

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

@pytest.mark.parametrize("model,src,dst", [
    ("pit_ti_224", "0.6.13", INSTALLED), ("pit_ti_224", INSTALLED, "0.6.13"),
    ("pit_ti_distilled_224", "0.6.13", INSTALLED),
])
def test_pit_converts_with_equal_outputs(roundtrip, model, src, dst):
    result, diff = roundtrip(model, src, dst)
    assert diff <= ATOL
    assert any("pit.pool-at-stage-start" in s for s in result.steps)


def test_a_new_distilled_pit_is_converted_down_only_when_told_which_release_made_it(targets, tmp_path):
    # its layout is made by 0.9.2 to 1.0.31, which compute it two ways; 0.6.13 computes like
    # 1.0.31 only (the proof runs the migration in 0.6.13), so the file must say its release
    model = "pit_ti_distilled_224"
    made = make_checkpoint(INSTALLED, model)
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets("0.6.13"))
    assert "compute it in 2 ways" in exc.value.problem and "--source-timm" in exc.value.fix
    result = convert(made.path, tmp_path / "out.safetensors", targets("0.6.13"), source_timm=timm.__version__)
    assert any("pit.pool-at-stage-start" in s for s in result.steps)
    assert any(s.startswith("math: %s of timm 0.6.13 computes like" % model) for s in result.steps), result.steps
    got = run_in("0.6.13", {"name": result.model.name, "kwargs": dict(result.model.kwargs)}, result.output, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_distilled_pit_is_refused_for_the_releases_that_changed_its_math(targets, tmp_path):
    model = "pit_ti_distilled_224"
    made = make_checkpoint("0.6.13", model)
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets("0.9.16"))
    assert model in exc.value.problem
