"""A timm not in cachectl's catalog (newer than it): the store catalogues it from the environment that
runs it, so a new timm release never needs a new cachectl (issue 9, part 3)."""
import json

import pytest
from click.testing import CliRunner

from cachectl.cache import Cache
from cachectl.catalog import Catalog
from cachectl.cli import main
from conftest import ATOL, make_checkpoint, python_for, run_in
from tools.timm_releases import UNCATALOGUED

pytestmark = pytest.mark.slow  # real timm releases: the full tier only (make test-fast skips it)


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_an_environment_on_a_release_the_catalog_lacks_is_catalogued_and_its_files_tagged(tmp_path, monkeypatch,
                                                                                         catalog_without):
    catalog_without(UNCATALOGUED)
    root = tmp_path / "root"
    monkeypatch.setenv("CACHECTL_ROOT", str(root))
    cli("init")
    out = cli("env", "add", "new", "--python", python_for(UNCATALOGUED))
    assert "timm %s is not in cachectl's catalog (newer than it, or a release it skips): this store catalogued it" % UNCATALOGUED in out
    assert (root / "catalog" / "dumps" / ("%s.jsonl" % UNCATALOGUED)).is_file()

    made = make_checkpoint(UNCATALOGUED, "resnet18")
    added = json.loads(cli("add", made.path, "--name", "r18", "--json"))
    assert UNCATALOGUED in added["timm_versions"], added
    path = cli("path", "r18", "--env", "new").strip()
    got = run_in(UNCATALOGUED, {"name": "resnet18", "kwargs": {}}, path, tmp_path)
    assert (got - made.logits).abs().max().item() <= ATOL

    # another process (a daemon, the Python API) reads the same catalog; the shipped one is untouched
    with Cache(root, create=False) as cache:
        assert UNCATALOGUED in cache.catalog.releases
        assert cache.catalog.fingerprint("1.0.31", "resnet18") is not None  # shipped fingerprints kept
    assert UNCATALOGUED not in Catalog.load().releases
