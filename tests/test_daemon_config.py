"""The daemon's parts that need no process: settings, what it takes, when a file is complete."""
import os
from pathlib import Path

import pytest

from cachectld.candidates import Candidate, candidates
from cachectld.config import Config, ConfigError, load, watches
from cachectld.tracker import Tracker


def test_defaults_then_file_then_environment_then_flags(tmp_path):
    root = tmp_path / "root"
    cfg = load(root, None, {}, environ={})
    assert cfg.watch == (root / "inbox",) and cfg.quiet_seconds == 2 and cfg.rescan_seconds == 300
    assert (cfg.polling, cfg.workers, cfg.file) == ("auto", 1, None)

    root.mkdir()
    (root / "cachectld.toml").write_text('watch = ["drop", "/abs"]\nquiet_seconds = 7\nworkers = 3\npolling = "on"\n')
    cfg = load(root, None, {}, environ={})
    assert cfg.watch == (root / "drop", Path("/abs")) and cfg.file == root / "cachectld.toml"
    assert (cfg.quiet_seconds, cfg.workers, cfg.polling) == (7, 3, "on")

    env = {"CACHECTL_QUIET_SECONDS": "5", "CACHECTL_WATCH": "/e1%s/e2" % os.pathsep, "CACHECTL_WORKERS": "2"}
    cfg = load(root, None, {}, environ=env)
    assert (cfg.quiet_seconds, cfg.workers, cfg.watch) == (5, 2, (Path("/e1"), Path("/e2")))

    cfg = load(root, None, {"quiet_seconds": 0.5, "watch": (Path("/f"),)}, environ=env)
    assert (cfg.quiet_seconds, cfg.workers, cfg.watch, cfg.polling) == (0.5, 2, (Path("/f"),), "on")


def test_config_file_from_the_flag_or_the_environment(tmp_path):
    other = tmp_path / "elsewhere.toml"
    other.write_text("rescan_seconds = 60\n")
    assert load(tmp_path, other, {}, environ={}).rescan_seconds == 60
    assert load(tmp_path, None, {}, environ={"CACHECTL_CONFIG": str(other)}).rescan_seconds == 60


@pytest.mark.parametrize("text, says", [
    ("quiet_seconds = 'soon'", "quiet_seconds must be a number"),
    ("workers = 0", "workers must be at least 1"),
    ("workers = 1.5", "workers must be a whole number"),
    ("polling = 'sometimes'", "must be one of auto, on, off"),
    ("watch = 3", "must be a list of folders"),
    ("quite_seconds = 2", "unknown setting quite_seconds"),
    ("watch = [", "is not valid TOML"),
])
def test_bad_settings_name_the_file_and_the_fix(tmp_path, text, says):
    path = tmp_path / "cachectld.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as err:
        load(tmp_path, None, {}, environ={})
    assert says in str(err.value) and str(path) in str(err.value)


def test_bad_variable_and_missing_file_name_their_source(tmp_path):
    with pytest.raises(ConfigError, match=r"\$CACHECTL_WORKERS must be a whole number"):
        load(tmp_path, None, {}, environ={"CACHECTL_WORKERS": "two"})
    with pytest.raises(ConfigError, match="no such settings file"):
        load(tmp_path, tmp_path / "missing.toml", {}, environ={})


def test_polling_is_chosen_by_the_filesystem_under_each_folder(tmp_path):
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export %s nfs4 rw 0 0\n"
        "//nas/share %s cifs rw 0 0\n"
        "/dev/vdb %s ext4 rw 0 0\n" % (tmp_path / "nfs", tmp_path / "with\\040space", tmp_path / "nfs" / "local"))
    cfg = Config(root=tmp_path, watch=(tmp_path / "nfs" / "sub", tmp_path / "with space", tmp_path / "nfs" / "local",
                                       tmp_path / "plain"))
    got = {w.path.name: (w.polling, w.why) for w in watches(cfg, str(mounts))}
    assert got == {"sub": (True, "on a nfs4 mount"), "with space": (True, "on a cifs mount"),
                   "local": (False, "inotify"), "plain": (False, "inotify")}
    forced = Config(root=tmp_path, watch=(tmp_path / "plain",), polling="on")
    assert [(w.polling, w.why) for w in watches(forced, str(mounts))] == [(True, "polling = on")]


def test_what_is_taken_and_what_is_not(tmp_path):
    top = tmp_path / "inbox"
    take = ["a.pth", "sub/b.safetensors", "c.pth.tar", "d.ckpt", "e.bin", "f.pt"]
    skip = [".a.pth.Xy12", "a.pth.part", "a.safetensors.incomplete", "g.crdownload", "notes.txt", ".hidden/h.pth",
            "x.pth.tmp", "x.pth.lock"]
    for name in take + skip:
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(b"x")
    assert [c.unit for n in take for c in candidates(top / n, top)] == [top / n for n in take]
    assert [c for n in skip for c in candidates(top / n, top)] == []
    store = top / "store-v1"
    (store / "blobs").mkdir(parents=True)
    (store / "blobs" / "z.safetensors").write_bytes(b"x")
    assert candidates(store / "blobs" / "z.safetensors", top, excluded=(store,)) == []


def test_a_hub_cache_copied_whole_is_one_unit_per_snapshot(tmp_path):
    repo = tmp_path / "inbox" / "hub" / "models--timm--resnet18.a1_in1k"
    blob = repo / "blobs" / "0123abcd"
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    blob.parent.mkdir()
    blob.write_bytes(b"weights")
    (snapshot / "model.safetensors").symlink_to("../../blobs/0123abcd")
    (snapshot / "config.json").write_text("{}")
    top = tmp_path / "inbox"
    unit = [Candidate(snapshot, snapshot / "model.safetensors")]
    assert candidates(snapshot / "model.safetensors", top) == unit
    assert candidates(snapshot / "config.json", top) == unit
    assert candidates(blob, top) == unit  # the blob's writer closing completes the snapshot
    assert unit[0].signature() == (7, blob.stat().st_mtime_ns)  # of the blob, through the link
    assert candidates(repo / "refs" / "main", top) == []


def test_a_file_is_complete_when_closed_or_quiet_and_taken_again_only_when_changed(tmp_path):
    path = tmp_path / "a.pth"
    path.write_bytes(b"1234")
    c = Candidate(path, path)
    tracker = Tracker(quiet_seconds=2)
    assert tracker.observe(c, closed=False, now=100.0)
    assert tracker.take(now=101.9, room=10, busy=set()) == []  # not quiet for long enough
    assert tracker.next_due(set()) == 102.0
    with open(path, "ab") as f:  # a writer still at work (scp, rsync --inplace)
        f.write(b"56")
    tracker.observe(c, closed=False, now=101.0)
    assert tracker.take(now=102.5, room=10, busy=set()) == []  # changed at 101 (the event), due at 103
    assert tracker.take(now=103.5, room=10, busy={path}) == []  # queued or converting already
    [job] = tracker.take(now=103.5, room=10, busy=set())
    assert (job.path, job.signature) == (path, c.signature())
    tracker.finish(job)
    assert not tracker.observe(c, closed=True, now=104.0)  # a rescan or event that changed nothing
    assert tracker.take(now=200.0, room=10, busy=set()) == []

    os.utime(path, ns=(1, 2))  # changed: taken again, a second after the writer closed it
    assert tracker.observe(c, closed=True, now=300.0)
    assert tracker.take(now=300.5, room=10, busy=set()) == []  # a writer that reopens does so by then
    [again] = tracker.take(now=301.0, room=10, busy=set())
    assert again.signature == (6, 2)


def test_a_file_closed_after_every_append_is_taken_once_it_stops(tmp_path):
    path = tmp_path / "log.pth"
    path.write_bytes(b"1")
    c = Candidate(path, path)
    tracker = Tracker(quiet_seconds=5)
    tracker.observe(c, closed=True, now=0.0)
    taken = []
    for i in range(1, 20):  # appended and closed every half second for ten seconds
        with open(path, "ab") as f:
            f.write(b"x")
        os.utime(path, ns=(i, i))
        tracker.observe(c, closed=True, now=i / 2)
        taken += tracker.take(now=i / 2 + 0.4, room=10, busy=set())
    assert taken == []  # never while it grows, though every append ended in a close
    assert tracker.take(now=9.5 + 4.9, room=10, busy=set()) == []
    [job] = tracker.take(now=9.5 + 5.0, room=10, busy=set())  # quiet_seconds after the last append
    assert job.signature == c.signature()


def test_a_change_between_event_and_check_restarts_the_quiet_period(tmp_path):
    path = tmp_path / "a.pth"
    path.write_bytes(b"1")
    tracker = Tracker(quiet_seconds=2)
    tracker.observe(Candidate(path, path), closed=False, now=0.0)
    path.write_bytes(b"12")  # no event for it (a lost inotify event, or polling not yet round)
    assert tracker.take(now=5.0, room=10, busy=set()) == []
    assert tracker.next_due(set()) == 7.0
    assert len(tracker.take(now=7.0, room=10, busy=set())) == 1


def test_room_in_the_queue_limits_what_is_taken(tmp_path):
    tracker = Tracker(quiet_seconds=0)
    for i in range(5):
        p = tmp_path / ("%d.pth" % i)
        p.write_bytes(b"x")
        tracker.observe(Candidate(p, p), closed=True, now=0.0)
    assert [j.path.name for j in tracker.take(1.0, room=2, busy=set())] == ["0.pth", "1.pth"]
    assert tracker.waiting == 3


def test_what_was_done_is_forgotten_for_files_that_are_gone(tmp_path):
    kept, late, gone = (str(tmp_path / n) for n in ("kept.pth", "late.pth", "gone.pth"))
    Path(kept).write_bytes(b"x")
    Path(late).write_bytes(b"x")  # arrived behind the scan, and finished before it ended
    tracker = Tracker(quiet_seconds=0, done={gone: (1, 1), kept: (2, 2), late: (3, 3)})
    tracker.keep_done({kept})
    assert tracker.done_if_changed() == {kept: (2, 2), late: (3, 3)}
    assert tracker.done_if_changed() is None


def test_cachectl_daemon_is_cachectld():
    from click.testing import CliRunner

    from cachectl.cli import main

    result = CliRunner().invoke(main, ["daemon", "--help"])
    assert result.exit_code == 0 and "Usage: cachectl daemon" in result.output and "--quiet-seconds" in result.output
