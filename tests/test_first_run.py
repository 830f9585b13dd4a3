"""README's first minutes on a fresh machine: the default folder and its parents do not exist yet."""
from click.testing import CliRunner

from cachectl.cli import main
from cachectld.config import load


def test_a_cache_whose_folder_and_parents_are_missing_is_made(tmp_path, monkeypatch):
    # ~/.local/share/cachectl on a machine where ~/.local/share was never made
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.delenv("CACHECTL_ROOT", raising=False)
    root = home / ".local" / "share" / "cachectl"
    assert load(None, None, {}).root == root  # the daemon's default (make daemon) is the same folder
    result = CliRunner().invoke(main, ["pins"])
    assert result.exit_code == 0, result.output
    assert (root / "CACHEDIR.TAG").is_file()


def test_a_missing_cachectl_root_is_refused_like_a_missing_root(tmp_path, monkeypatch):
    typo = tmp_path / "cachectl-sotre"
    monkeypatch.setenv("CACHECTL_ROOT", str(typo))
    result = CliRunner().invoke(main, ["pins"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "%s: does not exist" % typo in lines[0], result.output
    assert "cachectl --root %s init" % typo in lines[0] and "cachectld --root %s" % typo in lines[0]
    assert not typo.exists()
    # made on purpose, by init (or by the daemon, whose root CACHECTL_ROOT names), it is a store
    assert CliRunner().invoke(main, ["init"]).exit_code == 0
    assert CliRunner().invoke(main, ["pins"]).exit_code == 0
