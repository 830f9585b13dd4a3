"""The scan index: a scan of a store that did not change reads no manifest, and a scan
through the index always equals one that reads every manifest, whatever changed the store
(its own commands, a hand edit in place, a deleted index)."""
import json
import os
import time

import pytest
import torch
from click.testing import CliRunner

from cachectl import scan as scan_module
from cachectl.cli import main
from cachectl.scan import INDEX_NAME, scan
from cachectl.store import Store
from benchmarks.store_scan import build as fill_store
from conftest import INSTALLED, make_checkpoint

SMALL = "mobilenetv3_small_050"
# what changed this recently is read, not indexed: short here, and waited out, so that each
# step's changes are indexed by the next scan (the timestamp tick is ms on the filesystems
# tests run on)
RACY = 0.05


@pytest.fixture
def root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("CACHECTL_ROOT", str(root))
    monkeypatch.setattr(scan_module, "RACY_SECONDS", RACY)
    return root


@pytest.fixture
def reads(monkeypatch):
    """The manifests each scan reads from the indexed folders (the store's, not each
    environment's few files), by path."""
    seen: list[str] = []
    build = scan_module._build

    def counted(path, *args):
        if "/store-v1/" in path:
            seen.append(path)
        return build(path, *args)

    monkeypatch.setattr(scan_module, "_build", counted)
    return seen


def cli(*args, input=None):
    result = CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def indexed_and_read(root, reads) -> tuple:
    """(a scan through the index, the manifests it read, a scan that reads every manifest)."""
    time.sleep(2 * RACY)
    reads.clear()
    indexed = scan(Store(root))
    read = list(reads)
    (root / "store-v1" / INDEX_NAME).unlink()
    every = scan(Store(root))  # a new Store: nothing remembered in memory either
    return indexed, read, every


def test_the_index_is_used_and_equals_reading_every_manifest(root, reads, tmp_path):
    made = make_checkpoint(INSTALLED, SMALL)
    path = tmp_path / "net.pth"
    state = torch.load(made.path, weights_only=True)
    for i in range(3):  # add: three versions of a name
        torch.save({k: v + i if v.is_floating_point() else v for k, v in state.items()}, path)
        cli("add", path)
    first, _, every = indexed_and_read(root, reads)
    assert first == every and len(first.versions) == 3 and len(first.links) == 3
    assert not first.warnings

    # nothing changed: no manifest is read, and the index is not written again
    time.sleep(2 * RACY)
    scan(Store(root))
    index = root / "store-v1" / INDEX_NAME
    written = index.stat().st_mtime_ns
    reads.clear()
    assert scan(Store(root)) == every and reads == []
    assert index.stat().st_mtime_ns == written

    # convert: said again what the file is, it is identified and converted anew
    cli("add", path, "--model", SMALL)
    snap, read, every = indexed_and_read(root, reads)
    assert snap == every and snap.sources[snap.versions[-1].source].model == SMALL
    assert read and all("/%s" % snap.versions[-1].source[:16] in p for p in read), read  # only what it rewrote

    # pin, rm, prune
    cli("pin", "net@1", "--env", "default")
    snap, _, every = indexed_and_read(root, reads)
    assert snap == every and snap.pins["default"] == {"net": 1}
    cli("rm", "net@2", "--yes")
    snap, read, every = indexed_and_read(root, reads)
    assert snap == every and [v.ref for v in snap.versions] == ["net@1", "net@3"]
    assert read == [str(root / "store-v1" / "names" / "net.json")]
    cli("unpin", "net", "--env", "default")
    cli("prune", "--keep-last", "1", "--yes")
    snap, _, every = indexed_and_read(root, reads)
    assert snap == every and [v.ref for v in snap.versions] == ["net@3"]
    assert len(snap.sources) == 1

    # a manifest edited in place by hand: same inode, same size, other content
    scan(Store(root))
    (sha,) = snap.sources
    manifest = root / "store-v1" / "sources" / ("%s.json" % sha)
    before = os.stat(manifest)
    text = manifest.read_text()
    assert '"confidence": "exact"' in text
    time.sleep(2 * RACY)
    with open(manifest, "r+") as f:
        f.write(text.replace('"confidence": "exact"', '"confidence": "EXACT"'))
    after = os.stat(manifest)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    snap, read, every = indexed_and_read(root, reads)
    assert read == [str(manifest)]
    assert snap == every and snap.sources[sha].confidence == "EXACT"

    # a deleted index: every manifest is read again, the same answer
    scan(Store(root))
    time.sleep(2 * RACY)
    index.unlink()
    reads.clear()
    assert scan(Store(root)) == every and len(reads) == len(every.sources) + len(every.converted) + 1 + len(every.links)
    assert index.is_file()


def test_damaged_and_newer_manifests_warn_on_every_scan_and_a_damaged_index_is_rebuilt(root, reads):
    store = Store(root).init()
    sources = store.sources
    (sources / ("%s.json" % ("a" * 64))).write_text("{not json")
    (sources / ("%s.json" % ("b" * 64))).write_text(json.dumps({"format": 99}))
    time.sleep(2 * RACY)
    warned = scan(Store(root)).warnings
    assert len(warned) == 2 and "is damaged" in warned[0] and "newer cachectl (format 99" in warned[1]
    reads.clear()
    assert scan(Store(root)).warnings == warned and len(reads) == 2  # never indexed: read and reported each time

    (store.base / INDEX_NAME).write_text('{"format": 1, "index": %d, "folders": {"store-v1/sources": 7}}'
                                         % scan_module.INDEX_LAYOUT)
    assert scan(Store(root)).warnings == warned  # a damaged index is no warning: it is rebuilt
    head = (store.base / INDEX_NAME).read_text().split("\n")[0]  # then one line per field of the values
    assert json.loads(head)["folders"]["store-v1/sources"]["kind"] == "source"

    # an index of the layout before (one JSON document, values inline) is rebuilt, not misread
    (store.base / INDEX_NAME).write_text(json.dumps({"format": 1, "index": 1, "folders": {}}))
    assert scan(Store(root)).warnings == warned
    head = (store.base / INDEX_NAME).read_text().split("\n")[0]
    assert json.loads(head)["index"] == scan_module.INDEX_LAYOUT


def test_a_field_damaged_in_the_index_is_one_line_naming_it(root):
    """The index's values are parsed when first read, after the scan chose the index: a line
    of them damaged by hand is an error that says what to do, not a traceback or wrong rows."""
    fill_store(root, 3)
    time.sleep(2 * RACY)
    assert "m0@1" in cli("list")  # writes the index
    index = root / "store-v1" / INDEX_NAME
    head, *lines = index.read_bytes().split(b"\n")
    folder = json.loads(head)["folders"]["store-v1/sources"]
    at = folder["cols"] + folder["fields"].index("architecture")
    lines[at] = lines[at][:-1]  # its closing bracket
    index.write_bytes(b"\n".join([head, *lines]))
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "%s: is damaged (its architecture values). Remove it" % index in result.output
    index.unlink()
    assert "m0@1" in cli("list")  # rebuilt
