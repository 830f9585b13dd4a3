"""The timm a conversion is for, asked through cachectl/_agent.py.

In-process for the timm installed beside cachectl; otherwise a long-lived agent in the
target interpreter (which needs torch and timm only), spoken to in JSON lines, with
tensors passed as safetensors files in a private temporary folder.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, TypeVar

import torch

from . import numerics
from .errors import TargetError
from .layout import Layout
from .tempnames import pid_alive, process_ticks

T = TypeVar("T")
AGENT = Path(__file__).resolve().parent / "_agent.py"
# Run the agent file as a script without its folder on sys.path, so cachectl's own
# module names never shadow the target's packages.
_BOOT = (
    "import sys; p = sys.argv[1]; sys.path = [x for x in sys.path if x not in ('', '.')]; "
    "exec(compile(open(p).read(), p, 'exec'), {'__name__': '__main__', '__file__': p})"
)


@dataclass(frozen=True)
class TargetInfo:
    python: str
    timm: str
    torch: str
    hub: bool


@dataclass(frozen=True)
class ModelSpec:
    """What the target's model `name` built with `kwargs` wants to load."""

    name: str
    kwargs: Mapping[str, object]
    layout: Layout
    buffers: frozenset[str]  # persistent buffers (in the state dict)
    classifier: tuple[str, ...]
    num_classes: int | None
    default_num_classes: int | None
    family: str


# a Target's scratch folder names its process: `cachectl-target-<pid>-<start ticks>-<random>`
TMP_PREFIX = "cachectl-target-"


def _sweep_folders_of_dead_processes() -> None:
    """Remove this user's scratch folders whose process is gone: a process killed by a
    signal runs no finalizer, and a daemon's tests kill many."""
    root = Path(tempfile.gettempdir())
    for folder in root.glob(TMP_PREFIX + "*-*-*"):
        pid, ticks = folder.name[len(TMP_PREFIX):].split("-")[:2]
        try:
            st = folder.lstat()
        except FileNotFoundError:
            continue
        if (pid.isdigit() and st.st_uid == os.getuid() and stat.S_ISDIR(st.st_mode)
                and not pid_alive(int(pid), int(ticks) if ticks.isdigit() else None)):
            shutil.rmtree(folder, ignore_errors=True)


class Target:
    """A timm installation to convert for. `python=None` means the one beside cachectl."""

    def __init__(self, python: str | os.PathLike | None = None):
        # absolute, not resolved: a venv's python is a symlink that must stay one
        self.python = os.path.abspath(python) if python else None
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        _sweep_folders_of_dead_processes()
        self._tmp = Path(tempfile.mkdtemp(prefix="%s%d-%s-" % (TMP_PREFIX, os.getpid(), process_ticks(os.getpid()))))
        # removed by close(), else when the Target is collected or the interpreter exits: a
        # command that never closes its targets leaves no folder behind in /tmp
        self._remove_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, True)
        self._agent = None
        self._info: TargetInfo | None = None
        # a daemon converts many files of one model: what the target says of a model is
        # asked once per process, never once per file
        self._specs: dict[str, ModelSpec] = {}
        self._cfgs: dict[str, dict | None] = {}
        self._names: dict[str, str | None] = {}
        self._buffers: dict[str, dict[str, torch.Tensor]] = {}
        self._remembered: dict[str, object] = {}

    def __enter__(self) -> "Target":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        self._remove_tmp()

    def _call(self, op: str, **args):
        if self.python is None:
            if self._agent is None:
                from . import _agent

                self._agent = _agent
            try:
                return self._agent.OPS[op](**args)
            except Exception as exc:  # the target's failure, reported like the subprocess's
                raise TargetError(None, "timm %s: %s failed (%s: %s)" % (self._agent.timm.__version__, op, type(exc).__name__, exc))
        with self._lock:
            proc = self._start()
            proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        if not line:
            code = proc.poll()
            self._proc = None
            raise TargetError(self.python, "the target interpreter died during %s (exit %s)" % (op, code),
                              "Check that it runs: %s -c 'import timm, torch'." % self.python)
        reply = json.loads(line)
        if not reply["ok"]:
            raise TargetError(None, "timm in %s: %s failed (%s)" % (self.python, op, reply["error"]))
        return reply["result"]

    def _start(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            try:
                self._proc = subprocess.Popen(
                    [self.python, "-c", _BOOT, str(AGENT), "serve"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                    text=True, cwd=self._tmp, preexec_fn=_die_with_parent(os.getpid()), env=numerics.pinned(os.environ),
                )
            except OSError as exc:
                raise TargetError(self.python, "cannot run this interpreter (%s)" % exc.strerror,
                                  "Give the path of a Python that has torch and timm.")
        return self._proc

    def info(self) -> TargetInfo:
        if self._info is None:
            raw = self._call("info")
            self._info = TargetInfo(python=raw["executable"], timm=raw["timm"], torch=raw["torch"], hub=raw.get("hub", False))
        return self._info

    def resolve_name(self, name: str) -> str | None:
        if name not in self._names:
            self._names[name] = self._call("resolve_name", name=name)
        return self._names[name]

    def remember(self, key: str, compute: Callable[[], T]) -> T:
        """What `compute` answers for this target and `key`, computed once per process:
        for answers that depend on the model and the releases, never on a file's bytes."""
        if key not in self._remembered:
            self._remembered[key] = compute()
        return self._remembered[key]

    def describe(self, name: str, kwargs: Mapping[str, object]) -> ModelSpec:
        key = json.dumps([name, kwargs], sort_keys=True)
        if key not in self._specs:
            self._specs[key] = self._describe(name, kwargs)
        return self._specs[key]

    def _describe(self, name: str, kwargs: Mapping[str, object]) -> ModelSpec:
        raw = self._call("describe", name=name, kwargs=dict(kwargs))
        return ModelSpec(
            name=name, kwargs=dict(kwargs), layout=Layout.from_rows(raw["keys"]),
            buffers=frozenset(raw["buffers"]), classifier=tuple(raw["classifier"]),
            num_classes=raw["num_classes"], default_num_classes=raw["default_num_classes"],
            family=raw["family"],
        )

    def pretrained_cfg(self, name: str) -> dict | None:
        """This timm's pretrained config for `name` (None: it has none), as JSON."""
        key = "pretrained_cfg:" + name
        if key not in self._cfgs:
            self._cfgs[key] = self._call("pretrained_cfg", name=name)
        return self._cfgs[key]

    def buffer_values(self, spec: ModelSpec, keys: list[str]) -> dict[str, torch.Tensor]:
        """The deterministic buffers `keys` of a fresh `spec` model (shared: never write into them)."""
        from safetensors.torch import load_file

        key = json.dumps([spec.name, spec.kwargs, sorted(keys)], sort_keys=True)
        if key not in self._buffers:
            out = self._tmp / "buffers.safetensors"
            self._call("buffers", name=spec.name, kwargs=dict(spec.kwargs), keys=keys, out_path=str(out))
            try:
                self._buffers[key] = load_file(out)
            finally:
                out.unlink(missing_ok=True)
        return dict(self._buffers[key])

    def run_fixed(self, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], input_size: tuple[int, ...]) -> dict:
        """What the target model computes on the fingerprint's fixed input with `tensors`
        loaded strictly: {"shape", "sum", "abs", "values"} (see _fingerprint.summarize)."""
        from safetensors.torch import save_file

        src = self._tmp / "run-in.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, src)
        try:
            return self._call("run_fixed", name=spec.name, kwargs=dict(spec.kwargs), in_path=str(src),
                              input_size=list(input_size))
        finally:
            src.unlink(missing_ok=True)

    def apply_filter(self, spec: ModelSpec, tensors: Mapping[str, torch.Tensor],
                     ordered: bool = False) -> tuple[dict[str, torch.Tensor] | None, str]:
        """The target timm's own checkpoint filter applied to `tensors`, or None and why not.

        `ordered`: hand them over in their own order, as torch.load would, rather than in
        the sorted order safetensors gives."""
        from safetensors.torch import load_file, save_file

        src, dst = self._tmp / "filter-in.safetensors", self._tmp / "filter-out.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, src)
        try:
            result = self._call("apply_filter", name=spec.name, kwargs=dict(spec.kwargs), in_path=str(src), out_path=str(dst),
                                **({"order": list(tensors)} if ordered else {}))
            if not result["applied"]:
                return None, result["reason"]
            return load_file(dst), result["filter"]
        finally:
            src.unlink(missing_ok=True)
            dst.unlink(missing_ok=True)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """For Popen: the target interpreter is killed with the process that started it, even
    one killed by SIGKILL (a killed `cachectl add` leaves no interpreter converting on)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the agent still ends when its stdin closes
        return None

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above
            os._exit(1)

    return arm
