"""PoolFormer (v1) across timm 0.9's move into `metaformer`: the head changed its math
(normalize then pool became pool then normalize, see cachectl/migrations/metaformer.py),
so files are refused both ways across it; 0.9 and later convert as they are."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

MODEL = "poolformer_s12"


@pytest.mark.parametrize("src,dst", [("0.9.2", INSTALLED), (INSTALLED, "0.9.2")])
def test_metaformer_poolformer_converts_with_equal_outputs(roundtrip, src, dst):
    result, diff = roundtrip(MODEL, src, dst)
    assert diff <= ATOL


# timm's own filter would load a 0.6.13 file into 1.0.31, off by ~1 on random weights
@pytest.mark.parametrize("src,dst", [("0.6.13", INSTALLED), (INSTALLED, "0.6.13")])
def test_poolformer_is_refused_across_the_head_change(targets, tmp_path, src, dst):
    made = make_checkpoint(src, MODEL)
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets(dst))
    assert MODEL in exc.value.problem
    assert "GroupNorm1" in exc.value.problem
