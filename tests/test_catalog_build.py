"""`cachectl catalog build`: a release is merged into the shipped catalog, each layout once."""
import gzip
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cachectl.catalog import Catalog, compact, index_path, version_key
from cachectl.catalog_build import dump, merge, shipped
from cachectl.cli import main
from cachectl.errors import CachectlError
from cachectl.layout import layout_id
from tools.timm_releases import RELEASES_DIR, UNIMPORTABLE


def _dump(path, release, models, deprecated):
    with open(path, "w") as f:
        for name, rec in models.items():
            f.write(json.dumps({"model": name, "started": True}) + "\n")
            f.write(json.dumps({"model": name, **rec}) + "\n")
        f.write(json.dumps({"model": "crashed_net", "started": True}) + "\n")  # took the process down: skipped
        f.write(json.dumps({"model": "__tables__", "timm": release, "deprecated": deprecated}) + "\n")


def _catalog(tmp_path, index) -> Catalog:
    """The merged index as the catalog reads it (its layouts are checked in the list itself)."""
    with gzip.open(tmp_path / index_path().name, "wt", compresslevel=1) as f:
        json.dump(compact(index), f)
    return Catalog.load(tmp_path / index_path().name)


def test_merging_no_dump_keeps_the_shipped_catalog_as_it_is():
    index, layouts = shipped()
    assert merge(index, layouts, {}) == (index, layouts)


def test_a_new_release_is_added_sharing_the_layouts_it_has_in_common(tmp_path):
    index, layouts = shipped()
    old = Catalog.load()
    resnet = old.models("1.0.31")["resnet18"]
    keys = [[k, list(s.shape), s.dtype] for k, s in old.layout(resnet.layout_index).tensors]
    new_keys = [["stem.weight", [8, 3, 3, 3], "float32"], ["head.fc.weight", [10, 8], "float32"],
                ["head.fc.bias", [10], "float32"]]
    _dump(tmp_path / "9.9.9.jsonl", "9.9.9", {
        "resnet18": {"keys": keys, "classifier": list(resnet.classifier), "default_num_classes": 1000,
                     "family": resnet.family, "tags": {"a1_in1k": {"hf_hub_id": "timm/resnet18.a1_in1k"}}},
        "newnet": {"keys": new_keys, "classifier": ["head.fc"], "default_num_classes": 10, "family": "newnet"},
        "brokennet": {"error": "RuntimeError: no"},
    }, {"oldnet": "newnet.tag"})
    new_index, new_layouts = merge(index, layouts, {"9.9.9": tmp_path / "9.9.9.jsonl"})
    assert len(new_layouts) == len(layouts) + 1  # resnet18's layout is not stored again
    merged = _catalog(tmp_path, new_index)
    assert merged.releases == tuple(sorted(old.releases + ("9.9.9",), key=version_key))
    models = merged.models("9.9.9")
    assert set(models) == {"resnet18", "newnet"}
    assert merged.failed("9.9.9") == {"brokennet": "RuntimeError: no"}
    assert merged.deprecated("9.9.9") == {"oldnet": "newnet.tag"}
    assert models["resnet18"].layout_index == resnet.layout_index  # stored once, shared
    assert new_layouts[models["newnet"].layout_index] == new_keys
    assert [t.tag for t in merged.tags("9.9.9", "resnet18")] == ["a1_in1k"]
    # every release the catalog had is unchanged
    for release in old.releases:
        assert merged.models(release) == old.models(release)
    lid = layout_id((k, s) for k, s, _ in new_keys)
    assert [(e.name, e.release) for e in merged.by_layout(lid)] == [("newnet", "9.9.9")]


def test_catalog_list_names_every_release():
    result = CliRunner().invoke(main, ["catalog", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["timm"] for r in rows] == list(Catalog.load().releases)
    assert all(r["models"] > 500 for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(sys.version_info < (3, 11), reason="timm 0.6.11 imports before Python 3.11")
def test_a_release_that_does_not_import_is_said_to_at_once(tmp_path, monkeypatch):
    # timm 0.6.11 declares dataclass fields that Python 3.11 refuses: the build says so
    # and why, instead of retrying twenty times and blaming a model
    monkeypatch.setenv("CACHECTL_BUILD_DIR", str(tmp_path))  # the dump; the release where the tests keep theirs
    monkeypatch.setenv("CACHECTL_TIMM_RELEASES", str(RELEASES_DIR))
    with pytest.raises(CachectlError) as caught:
        dump(UNIMPORTABLE, say=lambda _: None)
    assert "timm 0.6.11 does not import in %s (ValueError: mutable default" % sys.executable in str(caught.value)
    assert "Catalogue it with a Python that imports it, or leave it out." in str(caught.value)


def _fingerprint_dump(out, first):
    """The fingerprint dump as `cachectl catalog build` runs it, under the installed timm."""
    from cachectl.releases import BOOT, script

    subprocess.run([sys.executable, "-c", BOOT, script("_fingerprint_dump.py"), str(out), str(first), "--first-only"],
                   check=True, cwd="/", env=dict(os.environ, OMP_NUM_THREADS="1"))
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_a_model_the_dump_died_in_once_is_tried_again_and_twice_is_recorded_as_crashed(tmp_path):
    """A build stopped from outside (a machine shut down, a session's end) leaves the model in
    flight started without a result: it must be fingerprinted on resuming, not written off as
    crashed; a model the process died in twice is recorded as crashed and not run a third time."""
    first = tmp_path / "first.txt"
    first.write_text("resnet18\n")
    once = tmp_path / "once.jsonl"
    once.write_text(json.dumps({"model": "resnet18", "started": True}) + "\n")
    results = [r for r in _fingerprint_dump(once, first) if not r.get("started")]
    assert [r["model"] for r in results] == ["resnet18"] and "fingerprint" in results[0], results

    twice = tmp_path / "twice.jsonl"
    twice.write_text((json.dumps({"model": "resnet18", "started": True}) + "\n") * 2)
    records = _fingerprint_dump(twice, first)
    assert records[2:] == [{"model": "resnet18", "error": "crashed the fingerprinting process"}], records
