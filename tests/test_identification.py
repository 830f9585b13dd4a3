"""Look-alikes, renames and training checkpoints: converted equal, or refused, never different.

Files are made by real old releases; conversions are run in the target and compared with
what the producing release computed.
"""
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cachectl.catalog import Catalog
from cachectl.cli import main
from cachectl.identify import AMBIGUOUS, identify
from cachectl.reader import Checkpoint
from conftest import ATOL, INSTALLED, make_checkpoint, run_in

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def convert_and_run(path: Path, tmp_path: Path, *extra) -> tuple[dict, "torch.Tensor"]:
    out = tmp_path / (path.stem + ".converted.safetensors")
    result = invoke("convert", path, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    return answer, run_in(INSTALLED, answer["model"], out, tmp_path)


def anonymous(made, tmp_path: Path, name: str = "model_best.pth") -> Path:
    folder = tmp_path / "anon"
    folder.mkdir(exist_ok=True)
    return Path(shutil.copyfile(made.path, folder / name))


# -- look-alikes: one layout, other math ------------------------------------------------------


def test_tf_efficientnet_b0_ap_from_0_6_13_is_named_by_its_file_and_converts_equal(tmp_path):
    made = make_checkpoint("0.6.13", "tf_efficientnet_b0_ap")
    named = anonymous(made, tmp_path, "tf_efficientnet_b0_ap.pth")
    report = json.loads(invoke("inspect", named, "--json").output)
    assert report["source_architecture"] == "tf_efficientnet_b0_ap"  # not efficientnet_b0
    assert report["confidence"] == "exact" and report["chosen_by"] == "the file name"
    answer, got = convert_and_run(named, tmp_path)
    assert answer["model"]["name"].startswith("tf_efficientnet_b0")
    assert (got - made.logits).abs().max().item() <= ATOL


def test_anonymous_tf_efficientnet_is_ambiguous_and_not_guessed(tmp_path):
    made = make_checkpoint("0.6.13", "tf_efficientnet_b0_ap")
    path = anonymous(made, tmp_path)
    report = json.loads(invoke("inspect", path, "--json").output)
    assert report["confidence"] == AMBIGUOUS
    names = {report["source_architecture"]} | {c["architecture"] for c in report["ambiguous"]}
    assert {"efficientnet_b0", "tf_efficientnet_b0"} <= names
    result = invoke("convert", path, "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "--model" in result.output
    assert not (tmp_path / "x.safetensors").exists()
    answer, got = convert_and_run(path, tmp_path, "--model", "tf_efficientnet_b0")
    assert (got - made.logits).abs().max().item() <= ATOL


def test_anonymous_swinv2_window8_is_ambiguous_then_converts_equal_with_model(tmp_path):
    made = make_checkpoint("0.9.16", "swinv2_tiny_window8_256")
    path = anonymous(made, tmp_path)
    report = json.loads(invoke("inspect", path, "--json").output)
    assert report["confidence"] == AMBIGUOUS
    names = {report["source_architecture"]} | {c["architecture"] for c in report["ambiguous"]}
    assert names == {"swinv2_tiny_window8_256", "swinv2_tiny_window16_256"}
    human = invoke("inspect", path).output
    assert "ambiguous" in human and "--model" in human

    out = tmp_path / "guess.safetensors"
    result = invoke("convert", path, "-o", out)
    assert result.exit_code == 1
    assert "--model" in result.output and "swinv2_tiny_window8_256" in result.output
    assert not out.exists()

    answer, got = convert_and_run(path, tmp_path, "--model", "swinv2_tiny_window8_256")
    assert answer["model"]["name"].startswith("swinv2_tiny_window8_256")
    assert (got - made.logits).abs().max().item() <= ATOL


def test_add_refuses_to_guess_and_records_model_when_told(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("CACHECTL_ROOT", str(tmp_path / "root"))
    made = make_checkpoint("0.9.16", "swinv2_tiny_window8_256")
    path = anonymous(made, tmp_path)
    answer = json.loads(invoke("add", path, "--name", "cars", "--json").output)
    assert answer["environments"]["default"]["converted"] is None
    assert "--model" in answer["environments"]["default"]["error"]

    result = invoke("add", path, "--name", "cars", "--model", "swinv2_tiny_window8_256", "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["environments"]["default"]["error"] is None
    converted = Path(invoke("path", "cars").output.strip())
    got = run_in(INSTALLED, {"name": "swinv2_tiny_window8_256", "kwargs": {"num_classes": 1000}}, converted, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


# -- renames: the producing releases across a model's names --------------------------------------


def test_renamed_model_saved_by_new_release_is_tagged_with_every_release(tmp_path):
    made = make_checkpoint("0.9.2", "resnetv2_50x1_bitm")
    report = json.loads(invoke("inspect", made.path, "--json").output)
    assert report["source_architecture"] == "resnetv2_50x1_bitm"
    assert {"0.4.12", "0.6.13", "0.9.2", "0.9.16", "1.0.31"} <= set(report["timm_versions"])
    answer, got = convert_and_run(made.path, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL


def test_in21k_vit_range_follows_its_rename_in_the_catalog():
    # the layout timm 0.9.2 and later save for `vit_base_patch16_224_in21k` (a deprecated
    # name there), asked of the catalog alone: a real file of it weighs 400 MB
    catalog = Catalog.load()
    entry = catalog.models("0.6.13")["vit_base_patch16_224_in21k"]
    layout = catalog.layout(entry.layout_index)
    path = Path("vit_base_patch16_224_in21k.pth")
    tag = identify(Checkpoint(path=path, weights=path, format="torch-zip", layout=layout, tensors={}), catalog)
    assert tag.best.architecture == "vit_base_patch16_224_in21k"
    assert tag.best.timm_versions == catalog.releases


# -- training checkpoints: the copy timm itself loads ---------------------------------------------


def test_training_checkpoint_converts_to_what_timm_load_checkpoint_gives(tmp_path):
    made = make_checkpoint("0.6.13", "levit_128s", fmt="training")  # logits of timm's load_checkpoint
    answer, got = convert_and_run(made.path, tmp_path)
    assert answer["container"] == "state_dict_ema" and answer["other_containers"] == ["state_dict"]
    assert (got - made.logits).abs().max().item() <= ATOL
    explicit, got_ema = convert_and_run(made.path, tmp_path, "--ema")
    assert explicit["container"] == "state_dict_ema"
    assert (got_ema - made.logits).abs().max().item() <= ATOL

    other, got_other = convert_and_run(made.path, tmp_path, "--no-ema")
    assert other["container"] == "state_dict"
    assert (got_other - made.logits).abs().max().item() > 1e-3  # the other weights, as asked
    human = invoke("inspect", made.path).output
    assert "state_dict_ema" in human and "--no-ema" in human


# -- a deprecation that names another model ----------------------------------------------------


def _header_only(catalog, release, name):
    """A checkpoint of `name` as `release` saves it, without its 800 MB of weights: what
    identification and the choice of a target model see."""
    layout = catalog.layout(catalog.models(release)[name].layout_index)
    path = Path("%s.pth" % name)
    return Checkpoint(path=path, weights=path, format="torch-zip", layout=layout, tensors={})


def test_ig_resnext_is_never_converted_into_the_model_its_deprecation_names(targets, monkeypatch):
    # timm maps ig_resnext101_32x16d to resnext101_32x8d.fb_wsl_ig1b_ft_in1k: another width,
    # whose strict check fails; the look-alikes of the same layout are tried next, but only
    # those known to compute the same
    import cachectl.convert as convert_module

    catalog = Catalog.load()
    ckpt = _header_only(catalog, "0.6.13", "ig_resnext101_32x16d")
    tag = identify(ckpt, catalog)
    assert tag.best.architecture == "ig_resnext101_32x16d" and tag.chosen_by == "the file name"

    def choices():
        return [c.name for c in convert_module._model_choices(tag, ckpt, targets(INSTALLED), catalog, None)]

    known = [c for c in tag.alternatives if convert_module.math_agrees(catalog, tag.best, c)]
    assert choices()[0] == "resnext101_32x8d.fb_wsl_ig1b_ft_in1k"  # timm's own table first
    assert all(n.split(".")[0] in {c.architecture for c in known} for n in choices()[1:])
    # where the catalog knows they compute the same (its fingerprints), the look-alike follows
    real = convert_module.math_agrees
    monkeypatch.setattr(convert_module, "math_agrees", lambda cat, a, b: real(cat, a, b) or {
        a.architecture, b.architecture} == {"ig_resnext101_32x16d", "resnext101_32x16d"})
    assert "resnext101_32x16d" in [n.split(".")[0] for n in choices()[1:]]
    # and with --model, only what the user named
    assert [c.name for c in convert_module._model_choices(tag, ckpt, targets(INSTALLED), catalog, "resnext101_32x16d")] == [
        "resnext101_32x16d"]
