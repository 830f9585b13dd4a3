"""A timm model inside a larger one: found under its prefix, converted in place, the rest kept.

The timm parts are made by timm 0.6.13 and wrapped as detection, segmentation and depth
code saves them; the output must load strictly into the wrapper in timm 1.0.31 (the
installed one) and its timm parts must compute what they computed in 0.6.13.
"""
import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from cachectl.cli import main
from conftest import ATOL, INSTALLED, make_checkpoint, run_in

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)

SWIN = "swin_tiny_patch4_window7_224"
VIT = "vit_tiny_patch16_224"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def wrap(made_path: Path, prefix: str, extra: dict[str, torch.Tensor], out: Path, container: str | None = None) -> Path:
    state = torch.load(made_path, weights_only=True)
    wrapped = {prefix + k: v for k, v in state.items()}
    wrapped.update(extra)
    torch.save({container: wrapped, "meta": {"epoch": 12, "framework": "mm"}} if container else wrapped, out)
    return out


def convert(path: Path, tmp_path: Path, *extra) -> tuple[dict, Path]:
    out = tmp_path / (path.stem + ".timm-1.0.safetensors")
    result = invoke("convert", path, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output), out


def timm_part(output: Path, prefix: str, tmp_path: Path) -> Path:
    state = load_file(output)
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    path = tmp_path / ("%s.safetensors" % prefix.strip(".").replace(".", "_"))
    save_file(part, path)
    return path


def head(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))


class SegModel(nn.Module):
    """What mmseg's UperNet looks like to load_state_dict: `backbone.` is timm's."""

    def __init__(self, name, kwargs):
        super().__init__()
        self.backbone = timm.create_model(name, **kwargs)
        self.decode_head = nn.Module()
        self.decode_head.conv_seg = nn.Conv2d(768, 19, 1)


class DepthModel(nn.Module):
    """DPT's layout: the timm ViT at `pretrained.model.`, its own layers at `scratch.`."""

    def __init__(self, name, kwargs):
        super().__init__()
        self.pretrained = nn.Module()
        self.pretrained.model = timm.create_model(name, **kwargs)
        self.scratch = nn.Module()
        self.scratch.layer1_rn = nn.Conv2d(192, 64, 3, bias=False)


@pytest.fixture(scope="module")
def swin():
    return make_checkpoint("0.6.13", SWIN)


@pytest.fixture(scope="module")
def vit():
    return make_checkpoint("0.6.13", VIT)


def test_swin_inside_backbone_converts_and_the_wrapper_loads_strictly(swin, tmp_path):
    extra = {"decode_head.conv_seg.weight": head(19, 768, 1, 1), "decode_head.conv_seg.bias": head(19)}
    path = wrap(swin.path, "backbone.", extra, tmp_path / ("upernet_%s.pth" % SWIN), container="state_dict")

    report = json.loads(invoke("inspect", path, "--json").output)
    assert report["prefixes"] == ["backbone."] and report["passthrough"] == 2
    assert report["source_architecture"] == SWIN and report["confidence"] == "exact"
    assert "0.6.13" in report["timm_versions"] and report["loads_as_is"] is False

    answer, out = convert(path, tmp_path)
    assert answer["prefixes"] == ["backbone."] and answer["passthrough"] == 2
    assert answer["parts"][0]["model"]["name"].startswith(SWIN)
    with safe_open(out, "pt") as f:
        assert json.loads(f.metadata()["cachectl.parts"])[0]["prefix"] == "backbone."

    state = load_file(out)
    for k, v in extra.items():
        assert torch.equal(state[k], v), k
    model = answer["parts"][0]["model"]
    SegModel(model["name"], model["kwargs"]).load_state_dict(state, strict=True)
    got = run_in(INSTALLED, model, timm_part(out, "backbone.", tmp_path), tmp_path)
    assert (got - swin.logits).abs().max().item() <= ATOL


def test_vit_inside_pretrained_model_converts_and_the_wrapper_loads_strictly(vit, tmp_path):
    extra = {"scratch.layer1_rn.weight": head(64, 192, 3, 3)}
    path = wrap(vit.path, "pretrained.model.", extra, tmp_path / ("dpt_%s.pth" % VIT))
    answer, out = convert(path, tmp_path)
    assert answer["prefixes"] == ["pretrained.model."] and answer["passthrough"] == 1
    assert answer["parts"][0]["source_architecture"] == VIT  # named by the file, not deit_tiny
    state = load_file(out)
    assert torch.equal(state["scratch.layer1_rn.weight"], extra["scratch.layer1_rn.weight"])
    model = answer["parts"][0]["model"]
    DepthModel(model["name"], model["kwargs"]).load_state_dict(state, strict=True)
    got = run_in(INSTALLED, model, timm_part(out, "pretrained.model.", tmp_path), tmp_path)
    assert (got - vit.logits).abs().max().item() <= ATOL


def test_teacher_and_student_are_both_converted(swin, vit, tmp_path):
    teacher = {"teacher." + k: v for k, v in torch.load(swin.path, weights_only=True).items()}
    student = {"student." + k: v for k, v in torch.load(vit.path, weights_only=True).items()}
    path = tmp_path / ("distill_%s_to_%s.pth" % (SWIN, VIT))
    torch.save({"model": {**teacher, **student, "proj.weight": head(192, 768)}}, path)
    answer, out = convert(path, tmp_path)
    assert sorted(answer["prefixes"]) == ["student.", "teacher."] and answer["passthrough"] == 1
    by_prefix = {p["prefix"]: p for p in answer["parts"]}
    for prefix, made in (("teacher.", swin), ("student.", vit)):
        got = run_in(INSTALLED, by_prefix[prefix]["model"], timm_part(out, prefix, tmp_path), tmp_path)
        assert (got - made.logits).abs().max().item() <= ATOL


def test_explicit_prefix_and_a_prefix_with_no_model(swin, tmp_path):
    path = wrap(swin.path, "encoder.", {"decoder.weight": head(4, 4)}, tmp_path / "seg.pth")
    answer, _ = convert(path, tmp_path, "--prefix", "encoder.")
    assert answer["prefixes"] == ["encoder."] and answer["passthrough"] == 1
    result = invoke("convert", path, "--prefix", "decoder", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 1 and "decoder" in result.output


def test_a_file_with_no_timm_model_anywhere_says_so(tmp_path):
    torch.save({"encoder.weight": head(4, 4), "decoder.weight": head(4, 4)}, tmp_path / "other.pth")
    result = invoke("inspect", tmp_path / "other.pth")
    assert result.exit_code == 1
    assert "under any prefix" in result.output and "--prefix" in result.output
