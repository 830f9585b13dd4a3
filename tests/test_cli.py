"""`cachectl inspect` and `cachectl convert` driven as a user would, on real files."""
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from cachectl.cli import main
from conftest import INSTALLED, make_checkpoint


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


@pytest.mark.slow
def test_inspect_old_swin_names_its_release_and_that_it_does_not_load(tmp_path):
    made = make_checkpoint("0.6.13", "swin_tiny_patch4_window7_224")
    result = invoke("inspect", made.path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"] == "swin_tiny_patch4_window7_224"
    assert "0.6.13" in report["timm_versions"] and "1.0.31" not in report["timm_versions"]
    assert report["confidence"] == "exact"
    assert report["num_classes"] == 1000
    assert report["loads_as_is"] is False
    assert report["alternatives"] == []


def test_inspect_fine_tuned_checkpoint_reports_its_classes(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18", {"num_classes": 10})
    report = json.loads(invoke("inspect", made.path, "--json").output)
    assert report["architecture"] == "resnet18"
    assert report["confidence"] == "exact-but-classifier"
    assert report["num_classes"] == 10
    assert report["loads_as_is"] is True  # with num_classes=10, as convert says


def test_inspect_headless_checkpoint_is_num_classes_zero(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18", {"num_classes": 0})
    report = json.loads(invoke("inspect", made.path, "--json").output)
    assert (report["architecture"], report["num_classes"]) == ("resnet18", 0)


def test_inspect_damaged_layout_is_partial_with_a_score(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18")
    state = torch.load(made.path, weights_only=True)
    for k in [k for k in state if k.startswith("layer4.1.")]:
        del state[k]
    torch.save(state, tmp_path / "resnet18_pruned.pth")
    report = json.loads(invoke("inspect", tmp_path / "resnet18_pruned.pth", "--json").output)
    assert report["confidence"] == "partial"
    assert report["architecture"] == "resnet18"
    assert 0.8 < report["score"] < 1.0
    # without its name, the look-alike of another math (blur pooling) is not ruled out
    torch.save(state, tmp_path / "pruned.pth")
    report = json.loads(invoke("inspect", tmp_path / "pruned.pth", "--json").output)
    assert report["confidence"] == "ambiguous"
    assert "resnetblur18" in {report["source_architecture"]} | {c["architecture"] for c in report["ambiguous"]}


def test_shared_layout_is_decided_by_file_name(tmp_path):
    made = make_checkpoint(INSTALLED, "deit_tiny_patch16_224")
    named = tmp_path / "deit_tiny_patch16_224-finetune.pth"
    named.write_bytes(made.path.read_bytes())
    report = json.loads(invoke("inspect", named, "--json").output)
    assert report["architecture"] == "deit_tiny_patch16_224"
    assert "vit_tiny_patch16_224" in [a["architecture"] for a in report["alternatives"]]
    other = tmp_path / "vit_tiny_patch16_224.pth"
    other.write_bytes(made.path.read_bytes())
    assert json.loads(invoke("inspect", other, "--json").output)["architecture"] == "vit_tiny_patch16_224"


@pytest.mark.slow
def test_inspect_human_output_says_what_it_is(tmp_path):
    made = make_checkpoint("0.6.13", "levit_128s")
    result = invoke("inspect", made.path)
    assert result.exit_code == 0
    assert "levit_128s" in result.output and "0.6.13" in result.output and "loads as-is" in result.output


@pytest.mark.slow
def test_convert_json_and_metadata_record_provenance(tmp_path):
    made = make_checkpoint("0.6.13", "levit_128s")
    out = tmp_path / "levit.safetensors"
    result = invoke("convert", made.path, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output)
    assert answer["output"] == str(out)
    assert answer["model"] == {"name": "levit_128s", "kwargs": {"num_classes": 1000}}
    assert "0.6.13" in answer["source_timm_versions"]
    # checked strictly, and what the fingerprints could say of its math, said out loud
    assert any(step.startswith("strict check") for step in answer["steps"])
    assert answer["steps"][-1].startswith("math: ")
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["cachectl.source_sha256"] == answer["source_sha256"]
    assert meta["cachectl.target_timm"] == answer["target_timm"]
    assert json.loads(meta["cachectl.steps"]) == answer["steps"]
    assert meta["cachectl.model"] == "levit_128s"


def test_convert_without_a_plan_exits_non_zero_and_lists_differences(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18")
    result = CliRunner().invoke(main, ["convert", str(made.path), "--model", "resnet34", "-o", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 1
    assert "no plan loads strictly into resnet34" in result.output
    assert "missing layer1.2" in result.output or "missing" in result.output
    assert not (tmp_path / "x.safetensors").exists()


def test_convert_refuses_unsafe_pickle_with_exit_code(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "bad.pth")])
    assert result.exit_code == 1
    assert "refused" in result.output and "bad.pth" in result.output


def test_target_interpreter_without_timm_is_a_clear_error(tmp_path):
    made = make_checkpoint(INSTALLED, "resnet18")
    result = CliRunner().invoke(main, ["convert", str(made.path), "--python", str(tmp_path / "nope" / "python")])
    assert result.exit_code == 1
    assert "cannot run this interpreter" in result.output


def test_shell_completion_offers_commands():
    env = {"_CACHECTL_COMPLETE": "bash_complete", "COMP_WORDS": "cachectl pr", "COMP_CWORD": "1"}
    result = CliRunner().invoke(main, [], env=env, prog_name="cachectl")
    assert result.output.split() == ["plain,prune"]


def test_files_of_one_header_are_each_identified_by_what_they_say(tmp_path):
    # a process remembers headers and layouts it has met: byte-identical headers under
    # other names must still be told apart by their names, and an anonymous one said ambiguous
    import timm
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_b0").state_dict().items()}
    first = tmp_path / "tf_efficientnet_b0.safetensors"
    save_file(state, first)
    answers = {}
    for name in ("tf_efficientnet_b0", "efficientnet_b0", "model_best", "tf_efficientnet_b0"):
        path = tmp_path / (name + ".safetensors")
        if path != first:
            path.write_bytes(first.read_bytes())
        report = json.loads(invoke("inspect", path, "--json").output)
        answers.setdefault(name, []).append((report["source_architecture"], report["confidence"]))
    assert answers["tf_efficientnet_b0"] == [("tf_efficientnet_b0", "exact")] * 2
    assert answers["efficientnet_b0"] == [("efficientnet_b0", "exact")]
    assert answers["model_best"][0][1] == "ambiguous"
