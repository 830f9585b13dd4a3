"""README's first minutes on a fresh machine: the default folder and its parents do not exist yet."""
from click.testing import CliRunner

from cachectl.cli import main


def test_a_cache_whose_folder_and_parents_are_missing_is_made(tmp_path, monkeypatch):
    # ~/.local/share/cachectl on a machine where ~/.local/share was never made
    root = tmp_path / "home" / ".local" / "share" / "cachectl"
    monkeypatch.setenv("CACHECTL_ROOT", str(root))
    result = CliRunner().invoke(main, ["pins"])
    assert result.exit_code == 0, result.output
    assert (root / "CACHEDIR.TAG").is_file()
