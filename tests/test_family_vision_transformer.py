"""Vision Transformer across its release changes, both ways, proven on outputs.

Grouped by change: the 0.9 renames into tags, the default heads that changed, the
layer scale 1.0 gave one model, and the pre-logits layer 0.6 removed (files that have
it are refused by 0.6+, files without it convert both ways)."""
import pytest

from cachectl.convert import convert
from cachectl.errors import NoPlanError
from conftest import ATOL, INSTALLED, make_checkpoint

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

# 0.9 made these tags of a base name: old names and tagged new names, plain and hybrid
RENAMED = [
    ("vit_tiny_patch16_224_in21k", "0.6.13", INSTALLED),
    ("vit_tiny_patch16_224.augreg_in21k", INSTALLED, "0.6.13"),
    ("vit_small_patch16_224_dino", "0.6.13", INSTALLED),  # saved without a head
    ("vit_small_patch16_224.dino", INSTALLED, "0.6.13"),
    ("vit_tiny_r_s16_p8_224_in21k", "0.6.13", INSTALLED),
    ("vit_tiny_r_s16_p8_224.augreg_in21k", INSTALLED, "0.6.13"),
]
# the release's default number of classes changed, the file keeps its own
DEFAULT_HEAD = [
    ("vit_base_r50_s16_224", "0.9.2", "0.9.16", 21843),  # then none by default
    ("vit_base_r50_s16_224", "0.9.16", "0.9.2", 0),
    ("vitamin_small_224", "1.0.20", INSTALLED, 384),  # then 768 by default
    ("vitamin_small_224", INSTALLED, "1.0.20", 768),
]
LAYER_SCALE = "vit_medium_patch16_reg4_gap_256"
PRE_LOGITS = "vit_base_r50_s16_224_in21k"


@pytest.mark.parametrize("model,src,dst", RENAMED)
def test_renamed_vit_converts_with_equal_outputs(roundtrip, model, src, dst):
    _, diff = roundtrip(model, src, dst)
    assert diff <= ATOL


@pytest.mark.parametrize("model,src,dst,classes", DEFAULT_HEAD)
def test_vit_keeps_its_head_across_default_changes(roundtrip, model, src, dst, classes):
    result, diff = roundtrip(model, src, dst)
    assert result.model.kwargs["num_classes"] == classes
    assert diff <= ATOL


@pytest.mark.parametrize("src,dst,init_values", [("0.9.16", INSTALLED, 0), (INSTALLED, "0.9.16", 1e-5)])
def test_vit_keeps_its_layer_scale(roundtrip, src, dst, init_values):
    result, diff = roundtrip(LAYER_SCALE, src, dst)
    assert result.model.kwargs["init_values"] == init_values
    assert diff <= ATOL


@pytest.mark.parametrize("dst", ["0.6.13", INSTALLED])
def test_vit_with_pre_logits_is_refused(targets, tmp_path, dst):
    made = make_checkpoint("0.5.4", PRE_LOGITS)
    with pytest.raises(NoPlanError) as exc:
        convert(made.path, tmp_path / "out.safetensors", targets(dst))
    assert "vit_base_r50_s16_224" in exc.value.problem and "representation_size" in exc.value.problem


def test_fine_tuned_vit_had_no_pre_logits_and_converts(roundtrip):
    # 0.5.4 removed the layer from these models built for other classes
    result, diff = roundtrip(PRE_LOGITS, "0.5.4", INSTALLED, kwargs={"num_classes": 10})
    assert result.model.kwargs == {"num_classes": 10}
    assert diff <= ATOL


def test_vit_without_pre_logits_goes_back_as_the_plain_model(roundtrip):
    result, diff = roundtrip("vit_base_r50_s16_224.orig_in21k", INSTALLED, "0.5.4")
    assert result.model.name == "vit_base_r50_s16_224"
    assert diff <= ATOL
