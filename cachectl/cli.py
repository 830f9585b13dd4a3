"""The `cachectl` command: parse, call the library, format. Nothing else lives here."""
from __future__ import annotations

import errno
import functools
import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click

from . import __version__, numerics
from .errors import CachectlError, few

# rich is imported where a table or a spinner is drawn: a third of a quick command's
# start-up, which `list` in a pipe, `--json` and `--help` never need
if TYPE_CHECKING:
    from rich.console import Console

# Only the variables the help names are read (--root's CACHECTL_ROOT): no option turns
# into an undocumented one, and none skips a confirmation.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns what a user can act on into one line and a non-zero exit, for every command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CachectlError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in _USER_ERRNOS:
                raise  # a bug: its traceback is the report
            where = exc.filename or "the cache"
            raise click.ClickException("%s: %s. %s" % (where, exc.strerror, _USER_ERRNOS[exc.errno])) from None


_USER_ERRNOS = {
    errno.ENOSPC: "Free space on that disk (cachectl prune frees the cache's), then try again.",
    errno.EDQUOT: "Free space within your quota (cachectl prune frees the cache's), then try again.",
    errno.EACCES: "Ask whoever runs the cache's daemon for access, or use a cache of your own with --root.",
    errno.EPERM: "Ask whoever runs the cache's daemon for access, or use a cache of your own with --root.",
    errno.EROFS: "That filesystem is read-only here: use a cache on a writable one with --root.",
}


SPINNER_AFTER = 0.5  # seconds: a step done sooner shows no spinner


@contextmanager
def _spinner(text: str, hidden: bool = False) -> Iterator[Callable[[str], None]]:
    """A transient spinner on stderr while a step takes more than SPINNER_AFTER; yields a
    renamer."""
    # --json, a pipe or a file: not even rich's import, which a quick command's budget cannot
    # afford; there a spinner would only leave a blank line before the answer
    if hidden or not sys.stderr.isatty():
        yield lambda what: None
        return
    import threading

    # started late, from a timer: a quick step (list, inspect, path) at a terminal pays
    # neither rich's import nor a drawing thread beside it, two fifths of list's time there
    lock = threading.Lock()
    shown: dict = {"text": text, "bar": None, "task": None, "over": False}

    def show() -> None:
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn

        with lock:
            if shown["over"]:
                return
            console = Console(stderr=True, markup=False, highlight=False)
            bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), transient=True,
                           disable=not console.is_terminal, console=console)
            bar.start()
            shown.update(bar=bar, task=bar.add_task(shown["text"]))

    def rename(what: str) -> None:
        with lock:
            shown["text"] = what
            if shown["bar"] is not None:
                shown["bar"].update(shown["task"], description=what)

    timer = threading.Timer(SPINNER_AFTER, show)
    timer.daemon = True
    timer.start()
    try:
        yield rename
    finally:
        timer.cancel()
        with lock:
            shown["over"] = True
            if shown["bar"] is not None:
                shown["bar"].stop()


def _warn(warnings) -> None:
    """What the store could not read: on stderr, so the answer on stdout stays whole."""
    for w in warnings:
        click.echo("warning: %s" % w, err=True)


def _emit_json(value) -> None:
    # indented for a person at a terminal; compact in a pipe, where json's C encoder makes
    # 10,000 rows in 0.1 s instead of 1.4 s
    click.echo(json.dumps(value, indent=2 if sys.stdout.isatty() else None, sort_keys=False))


def _console() -> Console:
    from rich.console import Console

    # a pipe gets wide rows rather than rows wrapped at 80 columns; no markup: names, paths
    # and errors come from files and users, and "[/]" in a path is not a style
    return Console(highlight=False, markup=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (n, unit)
        n /= 1000
    return str(n)


python_option = click.option(
    "--python", "python", metavar="PY", type=click.Path(dir_okay=False),
    help="Interpreter of the target environment (needs torch and timm only). Default: the timm beside cachectl.",
)
ema_option = click.option(
    "--ema/--no-ema", default=True,
    help="Of a training checkpoint holding both, use the EMA copy of the weights (the default, as timm's "
         "load_checkpoint does) or the other one.",
)
model_option = click.option(
    "--model", metavar="NAME",
    help="What the file is: decides between look-alikes, and is the model built in the target.",
)
prefix_option = click.option(
    "--prefix", "prefixes", multiple=True, metavar="PREFIX",
    help="Where a timm model sits in a larger state dict (e.g. backbone.); repeat for several. "
         "Default: looked for.",
)
source_timm_option = click.option(
    "--source-timm", metavar="VERSION",
    help="The timm release that saved the file, where releases that make its layout compute differently.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachectl")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), envvar="CACHECTL_ROOT",
              help="The cache's folder. Default: the platform's user data folder ($CACHECTL_ROOT).")
@click.pass_context
def main(ctx: click.Context, root: Path | None) -> None:
    """Convert timm checkpoints between timm releases, and keep them ready per environment.

    \b
    Examples:
      cachectl inspect swin_tiny.pth            what it is, which timm made it
      cachectl convert swin_tiny.pth -o out.safetensors
      cachectl convert old.pth --python /envs/timm06/bin/python --json
      cachectl env add timm06 --python /envs/timm06/bin/python
      cachectl add swin_tiny.pth                store it, convert it for every environment
      cachectl list                             what the cache holds
      cachectl path swin_tiny --env timm06      the file timm06 should load
      cachectl pin swin_tiny@2 --env prod       freeze prod on version 2
      cachectl prune --keep-last 3 --dry-run    what pruning would free
    """
    numerics.pin()  # before torch runs anything: proofs compare with the shipped fingerprints
    ctx.obj = root


def _cache(ctx: click.Context):
    from .cache import Cache

    top = ctx.find_root()
    # a root named by --root or CACHECTL_ROOT must exist: a typo is not a new store (cachectl
    # init or the daemon makes one); the default folder is made, as on a fresh machine
    return Cache(top.obj, create=top.get_parameter_source("root") == click.core.ParameterSource.DEFAULT)


@main.command()
@click.option("--group", metavar="GROUP",
              help="Share the store with GROUP: its members write and lock, whatever their umask.")
@json_option
@click.pass_context
def init(ctx: click.Context, group: str | None, as_json: bool) -> None:
    """Make a store at --root (default: $CACHECTL_ROOT, else the user data folder).

    An existing store is left as it is (with --group, shared from now on). A folder that
    holds other files is refused. Other commands refuse a --root or $CACHECTL_ROOT that
    does not exist.

    \b
    Examples:
      cachectl --root /shared/cachectl init --group mlteam
    """
    from .paths import default_root
    from .store import Store

    store = Store(ctx.find_root().obj or default_root()).init(group=group)
    if as_json:
        _emit_json({"root": str(store.root), "locks": store.locking.kind, "locks_why": store.locking.why,
                    "mode": oct(store.root.stat().st_mode & 0o7777)})
        return
    click.echo("store at %s (mode %s; %s locks: %s)" % (
        store.root, oct(store.root.stat().st_mode & 0o7777)[2:], store.locking.kind, store.locking.why))


@main.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@ema_option
@model_option
@prefix_option
@python_option
@json_option
def inspect(file: Path, ema: bool, model: str | None, prefixes: tuple[str, ...], python: str | None,
            as_json: bool) -> None:
    """Tell which architecture and timm releases produced FILE, reading headers only.

    FILE is a checkpoint (.safetensors, .pth, .pt, .bin, .pth.tar) or a Hugging Face
    snapshot folder. Nothing in it is executed. The answer says whether it loads as-is
    in the timm of --python (default: the one installed beside cachectl). A timm model
    inside a larger one (backbone., encoder., ...) is found under its prefix. Confidence
    `ambiguous` lists look-alikes that may compute differently: convert needs --model.

    \b
    Examples:
      cachectl inspect resnet50_a1.pth
      cachectl inspect mask_rcnn_swin_t.pth --prefix backbone.
      cachectl inspect ~/hub/models--timm--vit_base_patch16_224.augreg_in21k/snapshots/abc --json
    """
    from .inspection import inspect_file

    with _spinner("reading %s" % file.name, hidden=as_json):
        report = inspect_file(file, python, ema=ema, model=model, prefixes=prefixes or None)
    if as_json:
        _emit_json(report.to_json())
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("file", "%s (%s, %s, %d tensors, %.1fM parameters)" % (
            report.file, report.format, _size(report.size), report.tensors, report.parameters / 1e6)),
    ]
    for part in report.parts:
        arch = part.architecture or "(none in timm %s)" % report.installed_timm
        if part.architecture and part.architecture.split(".")[0] != part.source_architecture:
            arch += "  (%s in the producing release)" % part.source_architecture
        confidence = part.confidence if part.confidence != "partial" else "partial, score %.2f" % part.score
        if part.ambiguous:
            confidence = "ambiguous: %s or %s may compute differently; say which with --model NAME" % (
                part.source_architecture, ", ".join(c.architecture for c in part.ambiguous))
        else:
            confidence += " (chosen by %s)" % part.chosen_by
        rows += [
            ("architecture", arch + ("  under %s (%d tensors)" % (part.prefix, part.tensors) if part.prefix else "")),
            ("produced by timm", ", ".join(part.timm_versions)),
            ("confidence", confidence),
            ("num_classes", str(part.num_classes)),
        ]
        others = [c.architecture for c in part.alternatives if c not in part.ambiguous]
        if others:
            rows.append(("also matches", few(others, 5)))
        rows.append(("loads as-is in timm %s" % report.installed_timm,
                     "yes" if part.loads_as_is else "no: %s" % part.as_is_problem))
    if report.wrapped:
        rows.append(("other keys", "%d, kept unchanged by convert" % len(report.passthrough)))
    rows.append(("layout", report.layout))
    if report.container:
        rows.append(("weights from", "'%s'%s" % (report.container, (
            " (also in the file: %s; the other with --%s)" % (", ".join(report.other_containers),
                                                               "no-ema" if ema else "ema"))
            if report.other_containers else "")))
    if report.stripped_prefix:
        rows.append(("stripped prefix", report.stripped_prefix))
    for k, v in rows:
        table.add_row(k, v)
    _console().print(table)


@main.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the safetensors file. Default: NAME.timm-VERSION.safetensors in the current folder.")
@model_option
@prefix_option
@source_timm_option
@ema_option
@python_option
@json_option
def convert(file: Path, output: Path | None, model: str | None, prefixes: tuple[str, ...], ema: bool,
            python: str | None, source_timm: str | None, as_json: bool) -> None:
    """Write FILE as safetensors that load strictly in the target timm.

    The target is the timm of --python (default: the one beside cachectl). Upgrades and
    downgrades both work; the result is checked key by key and shape by shape against
    the target's own model before it is written. The output's metadata records the
    source sha256, the source and target releases, the model and every step.

    A timm model inside a larger one (backbone., pretrained.model., a teacher and a
    student) is converted in place: its keys only, every other key written back unchanged
    under its own name, so the wrapper loads the output strictly. Look-alikes that may
    compute differently are not guessed between: --model says which it is.

    \b
    Examples:
      cachectl convert swin_tiny_06.pth -o swin_tiny.safetensors
      cachectl convert levit_128.safetensors --python /envs/old/bin/python --json
      cachectl convert model_best.pth --model swinv2_tiny_window8_256
      cachectl convert upernet_swin_t.pth --prefix backbone.
    """
    from .convert import convert as run
    from .target import Target

    with _spinner("converting %s" % file.name, hidden=as_json), Target(python) as target:
        result = run(file, output, target, model=model, ema=ema, prefixes=prefixes or None, source_timm=source_timm)
    if as_json:
        _emit_json({
            "output": str(result.output),
            "model": {"name": result.model.name, "kwargs": dict(result.model.kwargs)},
            "source": str(result.source),
            "source_sha256": result.source_sha256,
            "source_timm_versions": list(result.source_timm_versions),
            "source_architecture": result.tag.best.architecture,
            "confidence": result.tag.confidence,
            "chosen_by": result.tag.chosen_by,
            "container": result.container,
            "other_containers": list(result.other_containers),
            "target_timm": result.target_timm,
            "steps": list(result.steps),
            "size": result.size,
            "prefixes": [p.prefix for p in result.parts],
            "passthrough": result.passthrough,
            "parts": [{"prefix": p.prefix, "model": {"name": p.model.name, "kwargs": dict(p.model.kwargs)},
                       "source_architecture": p.tag.best.architecture,
                       "source_timm_versions": list(p.tag.best.timm_versions)} for p in result.parts],
        })
        return
    console = _console()
    console.print("wrote %s (%s) for timm %s" % (result.output, _size(result.size), result.target_timm))
    if result.container:
        console.print("weights from '%s'%s" % (result.container, " (not %s: pass --%s for it)" % (
            ", ".join(result.other_containers), "no-ema" if ema else "ema") if result.other_containers else ""))
    if result.parts:
        for p in result.parts:
            kwargs = "".join(", %s=%r" % kv for kv in p.model.kwargs.items())
            console.print("under %s: timm.create_model(%r%s)" % (p.prefix, p.model.name, kwargs))
        console.print("%d other keys kept unchanged: load it into the wrapper model with load_state_dict(..., strict=True)"
                      % result.passthrough)
    else:
        kwargs = "".join(", %s=%r" % kv for kv in result.model.kwargs.items())
        console.print("load it with: model = timm.create_model(%r%s); model.load_state_dict(safetensors.torch.load_file(%r))"
                      % (result.model.name, kwargs, str(result.output)))
    for step in result.steps:
        console.print("  - %s" % step)


# -- the cache ---------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("--name", help="The name to store it under. Default: the file name without suffixes.")
@model_option
@prefix_option
@source_timm_option
@json_option
@click.pass_context
def add(ctx: click.Context, file: Path, name: str | None, model: str | None, prefixes: tuple[str, ...],
        source_timm: str | None, as_json: bool) -> None:
    """Store FILE as a new version of its name and convert it for every environment.

    The file is copied into the cache (its folder is never written to); the same bytes
    added again are not stored twice. This is what the daemon does for each new file.

    \b
    Examples:
      cachectl add /shared/weights/swin_tiny_06.pth --name swin_tiny
      cachectl add ~/hub/models--timm--resnet50.a1_in1k/snapshots/abc
      cachectl add model_best.pth --name cars --model swinv2_tiny_window8_256
    """
    with _cache(ctx) as cache, _spinner("reading %s" % file.name, hidden=as_json) as step:
        result = cache.add(file, name, progress=lambda env: step("converting for %s" % env),
                           model=model, prefixes=prefixes, source_timm=source_timm)
    if as_json:
        _emit_json({
            "name": result.version.name, "version": result.version.ref, "new_version": result.new_version,
            "sha256": result.source.sha256, "architecture": result.source.architecture,
            "timm_versions": list(result.source.timm_versions), "error": result.source.error,
            "environments": {l.env: {"converted": l.converted, "error": l.error} for l in result.links},
        })
        return
    console = _console()
    what = "added" if result.new_version else "already stored as"
    console.print("%s %s (%s, timm %s)" % (
        what, result.version.ref, result.source.architecture or "unidentified", ", ".join(result.source.timm_versions) or "?"))
    for link in result.links:
        console.print("  %s: %s" % (link.env, "ready" if link.converted else "failed: %s" % link.error))
    if any(l.error for l in result.links):
        sys.exit(1)


def _no_cycle_collection(command: Callable) -> Callable:
    """For the commands that read the whole store: they make 100,000 values and no cycles, and
    the collector's passes over them (a hundred, as they are made) found nothing at a tenth of
    `list`'s time. Its values are freed as they always are, when the command returns."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        collecting = gc.isenabled()
        gc.disable()
        try:
            return command(*args, **kwargs)
        finally:
            if collecting:
                gc.enable()

    return run


def _age(ts: float, now: float | None = None) -> str:
    """How long before `now` (else the time of the call)."""
    if now is None:
        import time

        now = time.time()
    s = max(0, now - ts)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return "%d%s" % (s // n, unit)
    return "%ds" % s


@main.command(name="list")
@click.argument("pattern", required=False, metavar="[PATTERN]")
@click.option("--env", help="Only this environment's view: its copies and pins.")
@click.option("-q", "--quiet", is_flag=True, help="Print NAME@VERSION only, one a line.")
@click.option("--sort", "sort_by", type=click.Choice(["name", "age", "size", "state"]), default="name",
              show_default=True, help="Order of the rows (age: newest first; size: largest first).")
@json_option
@click.pass_context
@_no_cycle_collection
def list_(ctx: click.Context, pattern: str | None, env: str | None, quiet: bool, sort_by: str, as_json: bool) -> None:
    """One row per name and version: what it is, where it is ready, pins, state.

    PATTERN (shell style: swin_*, *@1) keeps the matching names or NAME@VERSIONs. SOURCE
    is the stored file, CONVERTED its converted copies. STATE: ready; pending (converted
    when first asked for, or by the daemon); converting (a process is at it); failed.

    \b
    Examples:
      cachectl list
      cachectl list 'swin_*' --sort size
      cachectl list --env timm06 --json | jq '.[] | select(.state == "failed")'
      cachectl list -q 'old_*' | xargs cachectl rm --dry-run
    """
    import time
    from fnmatch import fnmatchcase

    with _cache(ctx) as cache, _spinner("reading the store"):
        snap = cache.scan()
        rows = cache.rows(env, snap)
    _warn(snap.warnings)
    if pattern:
        rows = [r for r in rows if fnmatchcase(r.name, pattern) or fnmatchcase(r.ref, pattern)]
    if sort_by != "name":  # rows come by name
        rows.sort(key={"age": lambda r: -r.created, "size": lambda r: -r.size,
                       "state": lambda r: (r.state, r.name, r.version)}[sort_by])
    if as_json:
        _emit_json([r.to_json() for r in rows])
        return
    if quiet:
        if rows:
            click.echo("\n".join(r.ref for r in rows))
        return
    if not rows:
        click.echo("nothing matches %s" % pattern if pattern else "the cache is empty: add a file with cachectl add FILE")
        return
    # plain columns, not a rich Table: rich lays out 10,000 rows in 10 s, this in 0.05 s;
    # names are typed into other commands, so they are never cut
    header = ("NAME@VERSION", "ARCHITECTURE", "MADE BY TIMM", "SOURCE", "CONVERTED", "READY IN", "PINNED IN", "AGE",
              "STATE")
    now = time.time()
    cells = [(r.ref, r.architecture or "?", ", ".join(r.timm_versions) or "?", _size(r.source_size),
              _size(r.converted_size), ", ".join(r.environments) or "-", ", ".join(r.pinned) or "-",
              _age(r.created, now), r.state) for r in rows]
    widths = [max(map(len, column)) for column in zip(header, *cells)]
    # one format for every row (sizes right-aligned, the last column unpadded): 10,000 rows
    # in 20 ms, where padding cell by cell took 0.2 s
    template = "  ".join(("%%%ds" if i in (3, 4) else "%%-%ds") % w for i, w in enumerate(widths[:-1])) + "  %s"

    def line(row, style=None) -> str:
        # click.echo drops styles in a pipe
        return template % (*row[:-1], click.style(row[-1], **style) if style else row[-1])

    out = [line(header, {"bold": True})]
    out += [line(c, {"fg": {"converting": "yellow", "failed": "red"}[c[-1]]}) if c[-1] in ("converting", "failed")
            else template % c for c in cells]
    out += ["%s serves %s" % (r.ref, ", ".join(r.served)) for r in rows if r.served]
    out += ["%s: %s" % (r.ref, r.error) for r in rows if r.error]
    click.echo("\n".join(out))


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@json_option
@click.pass_context
@_no_cycle_collection
def show(ctx: click.Context, ref: str, as_json: bool) -> None:
    """Everything about one entry: provenance, conversions per environment, files."""
    with _cache(ctx) as cache:
        snap = cache.scan()
        info = cache.show(ref, snap)
    _warn(snap.warnings)
    if as_json:
        _emit_json(info)
        return
    console = _console()
    src = info["source"]
    console.print("%s  from %s" % (info["version"], info["origin"]))
    if src is None:
        console.print("  its source manifest is missing or unreadable: cachectl verify %s says more" % info["version"])
    else:
        console.print("  sha256 %s, %s, %s" % (src["sha256"], _size(src["size"]), src["format"] or "format unknown"))
        if src["error"]:
            console.print("  not identified: %s" % src["error"])
        else:
            console.print("  %s, made by timm %s (%s)" % (src["architecture"] or "architecture unknown",
                                                          ", ".join(src["timm_versions"]) or "?",
                                                          src["confidence"] or "confidence unknown"))
    for served in info["served"]:
        console.print("  served as %s (pretrained=True with cachectl env activate)" % served)
    for env, e in sorted(info["environments"].items()):
        if e["state"] == "failed":
            console.print("  %s (timm %s): failed: %s" % (env, e["timm"], e["error"]))
        elif e["state"] == "pending":
            console.print("  %s (timm %s): pending: converted when first asked for (cachectl path %s --env %s)" % (
                env, e["timm"], info["version"], env))
        else:
            c = e["converted"]
            kwargs = ", ".join("%s=%r" % kv for kv in c["model_kwargs"].items())
            console.print("  %s (timm %s): %s(%s) at %s" % (env, e["timm"], c["model"], kwargs, e["path"]))
            for step in c["steps"]:
                console.print("      - %s" % step)


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--env", help="The environment that will load it. Default: default.")
@json_option
@click.pass_context
def path(ctx: click.Context, ref: str, env: str | None, as_json: bool) -> None:
    """Print the converted file ENV should load for NAME (its pin, else the newest).

    \b
    Examples:
      python train.py --weights "$(cachectl path swin_tiny --env timm06)"
      cachectl path swin_tiny --env timm06 --json    # the file and the model to build for it
    """
    # the first time for an environment it converts: seconds
    with _cache(ctx) as cache, _spinner("resolving %s" % ref):
        resolved = cache.resolve(ref, env)
    if as_json:
        c = resolved.converted
        _emit_json({"path": str(resolved.path), "version": resolved.version.ref, "env": resolved.env,
                    "model": {"name": c.model, "kwargs": dict(c.model_kwargs)}, "target_timm": c.target_timm})
        return
    click.echo(str(resolved.path))


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--env", required=True, help="The environment to pin in.")
@json_option
@click.pass_context
def pin(ctx: click.Context, ref: str, env: str, as_json: bool) -> None:
    """In ENV, make NAME resolve to VERSION (default: the newest now) until unpinned.

    ENV's view then serves that version to `pretrained=True`.
    """
    with _cache(ctx) as cache:
        version = cache.pin(ref, env)
    if as_json:
        _emit_json({"name": version.name, "version": version.ref, "env": env})
        return
    click.echo("%s pinned in %s" % (version.ref, env))


@main.command()
@click.argument("name")
@click.option("--env", required=True, help="The environment to unpin in.")
@json_option
@click.pass_context
def unpin(ctx: click.Context, name: str, env: str, as_json: bool) -> None:
    """Let NAME follow its newest version again in ENV."""
    with _cache(ctx) as cache:
        removed = cache.unpin(name, env)
    if as_json:
        _emit_json({"name": name, "env": env, "was_pinned": removed})
        return
    click.echo(("%s unpinned in %s" if removed else "%s was not pinned in %s") % (name, env))


@main.command()
@click.option("--env", help="Only this environment.")
@json_option
@click.pass_context
def pins(ctx: click.Context, env: str | None, as_json: bool) -> None:
    """The pins of every environment."""
    with _cache(ctx) as cache:
        envs = [cache.env(env)] if env else cache.known_environments()
        table = {e.name: cache.store.pins_of(e.name) for e in envs}
    if as_json:
        _emit_json(table)
        return
    from rich.table import Table

    out = Table(box=None, header_style="bold")
    for col in ("ENV", "NAME", "VERSION"):
        out.add_column(col, overflow="fold")  # names are typed into other commands: wrapped, never cut
    for e, p in table.items():
        for name, v in sorted(p.items()):
            out.add_row(e, name, str(v))
    _console().print(out if out.row_count else "no pins")


@main.command()
@click.option("--dry-run", is_flag=True, help="Show the plan and stop.")
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N", help="Keep the newest N versions of each name.")
@click.option("--older-than", metavar="AGE", help="Remove versions added longer ago than AGE (30d, 12h).")
@click.option("--max-size", metavar="SIZE", help="Remove the oldest versions until the cache fits in SIZE (20G).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
@json_option
@click.pass_context
def prune(ctx: click.Context, dry_run: bool, keep_last: int | None, older_than: str | None,
          max_size: str | None, yes: bool, as_json: bool) -> None:
    """Free disk: plan what goes and what it frees, ask, then delete.

    Never removes a pinned version, the newest version of a name or an entry being
    written. Also removes leftovers of interrupted writes.

    \b
    Examples:
      cachectl prune --keep-last 3 --dry-run
      cachectl prune --older-than 90d --max-size 500G --yes
    """
    from .prune import Policy, parse_age, parse_size, plan

    with _cache(ctx) as cache:
        policy = Policy(keep_last, parse_age(older_than) if older_than else None, parse_size(max_size) if max_size else None)
        with _spinner("reading the store"):
            snap = cache.scan()
            p = plan(cache.store, policy, snapshot=snap)
        _warn(snap.warnings)
        if as_json:
            _emit_json({"remove": [v.ref for v in p.versions], "kept": [{"version": r, "why": w} for r, w in p.kept],
                        "leftovers": [str(x) for x in p.leftovers], "freed": p.freed, "dry_run": dry_run,
                        "short_of": p.short_of})
        else:
            lines = ["remove %s" % v.ref for v in p.versions] + ["keep   %s (%s)" % kw for kw in p.kept]
            if p.leftovers:
                lines.append("remove %d leftovers of interrupted writes" % len(p.leftovers))
            click.echo("\n".join(lines + ["frees %s" % _size(p.freed)]))
        if not (dry_run or not (p.versions or p.blobs or p.leftovers)):
            if not yes and not click.confirm("Delete these?", default=False, err=True):
                raise click.ClickException("nothing deleted")
            with _spinner("deleting"):
                freed = p.execute(cache.store)
            if not as_json:
                click.echo("freed %s" % _size(freed))
    if p.short_of:
        raise click.ClickException(
            "the cache stays %s over --max-size %s: what remains is kept (pinned, the newest of its name, "
            "served by a view or being written; see above). Unpin or rm some of it, or ask for more room"
            % (_size(p.short_of), max_size))


@main.command()
@click.argument("refs", nargs=-1, required=True, metavar="NAME[@VERSION]...")
@click.option("--dry-run", is_flag=True, help="Show what would go and stop.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before deleting.")
@json_option
@click.pass_context
def rm(ctx: click.Context, refs: tuple[str, ...], dry_run: bool, yes: bool, as_json: bool) -> None:
    """Remove versions (NAME@VERSION) or whole names (NAME), and the files only they use.

    A pinned version is refused (unpin it first). Views stop serving what is removed;
    a file a view linked moments ago stays until a later prune, for readers on their way.

    \b
    Examples:
      cachectl rm swin_tiny@2 --dry-run
      cachectl rm old_experiment --yes
    """
    from .prune import removal

    with _cache(ctx) as cache:
        versions = []
        for ref in refs:
            if "@" in ref:
                versions.append(cache.find_version(ref))
            else:
                versions += cache.store.versions(ref) or [cache.find_version(ref)]  # the latter explains
        p = removal(cache.store, versions)
        if as_json:
            _emit_json({"remove": [v.ref for v in p.versions], "kept": [{"file": f, "why": w} for f, w in p.kept],
                        "freed": p.freed, "dry_run": dry_run})
        else:
            console = _console()
            for v in p.versions:
                console.print("remove %s" % v.ref, markup=False)
            for f, why in p.kept:
                console.print("keep   %s (%s; cachectl prune removes it later)" % (f, why), markup=False)
            console.print("frees %s" % _size(p.freed))
        if dry_run:
            return
        if not yes and not click.confirm("Delete these?", default=False, err=True):
            raise click.ClickException("nothing deleted")
        p.execute(cache.store)
        cache.refresh_views()


@main.command()
@click.argument("refs", nargs=-1, metavar="[NAME[@VERSION]]...")
@json_option
@click.pass_context
def verify(ctx: click.Context, refs: tuple[str, ...], as_json: bool) -> None:
    """Re-hash blobs and re-check converted files strictly against each environment's model.

    Works offline. Exits 1 and lists what is damaged, if anything is.
    """
    with _cache(ctx) as cache, _spinner("verifying", hidden=as_json) as step:
        problems = cache.verify(list(refs) or None, progress=lambda sha: step("re-hashing %s" % sha[:12]))
    if as_json:
        _emit_json({"ok": not problems, "problems": problems})
        if problems:
            sys.exit(1)
        return
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise click.ClickException("%d problems found" % len(problems))
    click.echo("all good")


@main.group()
def env() -> None:
    """Environments: each a Python with its own timm that the cache converts for."""


@env.command(name="add")
@click.argument("name")
@click.option("--python", "python", required=True, metavar="PY", help="The environment's interpreter (needs torch and timm).")
@json_option
@click.pass_context
def env_add(ctx: click.Context, name: str, python: str, as_json: bool) -> None:
    """Register NAME, run by PY; what is already cached converts for it on first use."""
    with _cache(ctx) as cache, _spinner("asking %s for its timm" % python, hidden=as_json) as step:
        e = cache.env_add(name, python, say=step)
        catalogued = e.timm in cache.catalogued_here()
    if as_json:
        _emit_json({"name": e.name, "python": e.python, "timm": e.timm, "torch": e.torch, "catalogued_here": catalogued})
        return
    click.echo("%s: timm %s, torch %s (%s)" % (e.name, e.timm, e.torch, e.python))
    if catalogued:
        click.echo("timm %s is not in cachectl's catalog (newer than it, or a release it skips): this store catalogued it from %s" % (e.timm, e.name))


@env.command(name="list")
@json_option
@click.pass_context
def env_list(ctx: click.Context, as_json: bool) -> None:
    """The registered environments and the timm each runs."""
    with _cache(ctx) as cache:
        envs = cache.environments()
    if as_json:
        _emit_json([{"name": e.name, "python": e.python, "timm": e.timm, "torch": e.torch, "probed": e.probed} for e in envs])
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "TIMM", "TORCH", "PYTHON"):
        table.add_column(col, overflow="fold")  # names and paths are typed elsewhere: wrapped, never cut
    for e in envs:
        table.add_row(e.name, e.timm, e.torch, e.python or "(the one cachectl runs in)")
    _console().print(table)


@env.command(name="rm")
@click.argument("name")
@json_option
@click.pass_context
def env_rm(ctx: click.Context, name: str, as_json: bool) -> None:
    """Forget NAME, its pins and view, and delete the converted files only it loaded."""
    with _cache(ctx) as cache, _spinner("removing %s" % name, hidden=as_json):
        freed = cache.env_rm(name)
    if as_json:
        _emit_json({"removed": name, "freed": freed})
        return
    click.echo("removed %s, freed %s" % (name, _size(freed)))


@env.command(name="refresh")
@click.argument("name")
@json_option
@click.pass_context
def env_refresh(ctx: click.Context, name: str, as_json: bool) -> None:
    """Re-probe NAME's timm; if it changed, convert what its names need for the new one."""
    with _cache(ctx) as cache, _spinner("asking %s for its timm" % name, hidden=as_json) as step:
        old, new = cache.env_refresh(name, progress=lambda sha: step("converting %s" % sha[:12]), say=step)
    if as_json:
        _emit_json({"name": name, "timm_before": old.timm, "timm": new.timm, "torch": new.torch})
        return
    if old.timm == new.timm:
        click.echo("%s: timm %s, unchanged" % (name, new.timm))
    else:
        click.echo("%s: timm %s -> %s, converted what it needs" % (name, old.timm, new.timm))


@env.command(name="activate")
@click.argument("name")
@click.option("--shell", type=click.Choice(["sh", "fish", "csh"]), default="sh", show_default=True,
              help="The syntax of the lines printed.")
@click.pass_context
def env_activate(ctx: click.Context, name: str, shell: str) -> None:
    """Print the variables that make NAME's own timm load the cache's files, offline.

    With them, unmodified code (`timm.create_model("resnet50.a1_in1k", pretrained=True)`,
    or `create_model("hf-hub:timm/...")`) loads the weights converted for NAME's timm from
    its view, and neither huggingface_hub nor torch.hub tries the network. Nothing of
    cachectl needs to be installed in NAME itself.

    \b
    Examples:
      eval "$(cachectl env activate prod)"
      cachectl env activate prod >> "$CONDA_PREFIX/etc/conda/activate.d/cachectl.sh"
    """
    import shlex

    from . import views

    with _cache(ctx) as cache:
        cache.env(name)
        variables = views.variables(cache.store, name)
    for key, value in variables.items():
        if shell == "fish":
            click.echo("set -gx %s %s;" % (key, shlex.quote(value)))
        elif shell == "csh":
            click.echo("setenv %s %s;" % (key, shlex.quote(value)))
        else:
            click.echo("export %s=%s" % (key, shlex.quote(value)))


@main.command()
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--as", "as_name", required=True, metavar="ARCH.TAG",
              help="The pretrained name to serve it as: ARCH.TAG, or a hub repo id ORG/NAME.")
@click.option("--env", help="Only in this environment's view. Default: every environment.")
@json_option
@click.pass_context
def publish(ctx: click.Context, ref: str, as_name: str, env: str | None, as_json: bool) -> None:
    """Serve NAME in the views as the pretrained model ARCH.TAG, for unmodified timm code.

    Without @VERSION the view follows NAME's pin, else its newest version. A checkpoint
    whose file or hub repo already names a pretrained model is served without this.
    A fine-tuned head (its own num_classes) needs a tag of its own, loaded with
    `create_model("hf-hub:timm/ARCH.TAG")`, whose config.json carries its classes.

    \b
    Examples:
      cachectl publish swin_ft --as swin_tiny_patch4_window7_224.ms_in1k
      cachectl publish resnet50_cars@3 --as resnet50.cars196 --env prod
    """
    with _cache(ctx) as cache:
        cache.publish(ref, as_name, env)
        plans = cache.refresh_views([env] if env else None)
    _print_views([p.to_json() for p in plans], as_json, only=as_name)


@main.command()
@click.argument("as_name", metavar="ARCH.TAG")
@click.option("--env", help="Only this environment's publication. Default: all of them.")
@json_option
@click.pass_context
def unpublish(ctx: click.Context, as_name: str, env: str | None, as_json: bool) -> None:
    """Stop serving what `publish --as ARCH.TAG` made the views serve."""
    with _cache(ctx) as cache, _spinner("updating the views", hidden=as_json):
        gone = cache.unpublish(as_name, env)
        cache.refresh_views(sorted({p.env for p in gone if p.env}) if all(p.env for p in gone) else None)
    if as_json:
        _emit_json({"unpublished": as_name, "envs": sorted({p.env or "*" for p in gone})})
        return
    click.echo("%s is no longer published%s" % (as_name, " in %s" % env if env else ""))


@main.group()
def views() -> None:
    """Views: per environment, the hub and torch.hub caches its unmodified timm reads."""


def _print_views(plans: list[dict], as_json: bool, only: str | None = None) -> None:
    """`plans`: view.json contents (views.ViewPlan.to_json), one per environment."""
    if as_json:
        _emit_json({p["env"]: p for p in plans})
        return
    console = _console()
    for p in plans:
        served = [s for s in p["served"] if only is None or s["pretrained"] == only or only in s["how"]]
        skipped = [s for s in p["skipped"] if only is None or s["pretrained"] == only]
        console.print("%s (timm %s): serves %d" % (p["env"], p["timm"], len(served)))
        for s in served:
            where = "hub %s" % s["hub_repo"] if s["hub_repo"] else "torch.hub %s" % s["checkpoint"]
            console.print("  %s <- %s (%s; %s)" % (s["pretrained"], s["version"], where, s["how"]))
        for s in skipped:
            console.print("  not served %s <- %s: %s" % (
                s["pretrained"], s["version"], s["reason"]))


@views.command(name="list")
@click.option("--env", help="Only this environment.")
@json_option
@click.pass_context
def views_list(ctx: click.Context, env: str | None, as_json: bool) -> None:
    """What each environment's view serves, and what it could not serve and why."""
    from . import views as views_

    with _cache(ctx) as cache:
        names = [cache.env(env).name] if env else [e.name for e in cache.environments()]
        plans = [views_.read(cache.store, n) or {"env": n, "timm": cache.env(n).timm, "served": [], "skipped": []}
                 for n in names]
    _print_views(plans, as_json)


@views.command(name="refresh")
@click.option("--env", help="Only this environment.")
@json_option
@click.pass_context
def views_refresh(ctx: click.Context, env: str | None, as_json: bool) -> None:
    """Rebuild the views now (the daemon and every command that changes them do it too)."""
    with _cache(ctx) as cache, _spinner("reading the views", hidden=as_json) as step:
        plans = cache.refresh_views([cache.env(env).name] if env else None,
                                    progress=lambda what: step("converting %s" % what))
    _print_views([p.to_json() for p in plans], as_json)


@views.command(name="verify")
@click.option("--env", help="Only this environment.")
@json_option
@click.pass_context
def views_verify(ctx: click.Context, env: str | None, as_json: bool) -> None:
    """Check that every link of the views resolves and every served file loads strictly.

    Exits 1 and lists the problems, if there are any.
    """
    with _cache(ctx) as cache, _spinner("checking the views", hidden=as_json):
        problems = cache.verify_views([cache.env(env).name] if env else None)
    if as_json:
        _emit_json({"ok": not problems, "problems": problems})
        sys.exit(1 if problems else 0)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise click.ClickException("%d problems found" % len(problems))
    click.echo("all views good")


# -- the catalog -------------------------------------------------------------------------


@main.group()
def catalog() -> None:
    """The layout catalog: the timm releases cachectl knows, what each model of each makes."""


@catalog.command(name="list")
@json_option
def catalog_list(as_json: bool) -> None:
    """The timm releases the catalog covers: models, and how far their fingerprints go."""
    from .catalog import Catalog
    from .fingerprint_build import load_shipped

    c = Catalog.load()
    fingerprinted = load_shipped()["releases"]
    rows = [{"timm": r, "models": len(c.models(r)), "failed": len(c.failed(r)),
             "fingerprints": len(fingerprinted.get(r, {}).get("models", {})),
             "fingerprints_complete": bool(fingerprinted.get(r, {}).get("complete"))} for r in c.releases]
    if as_json:
        _emit_json(rows)
        return
    for row in rows:
        click.echo("timm %-8s %5d models (%d not buildable), %d fingerprinted%s" % (
            row["timm"], row["models"], row["failed"], row["fingerprints"],
            "" if row["fingerprints_complete"] else " (partial)"))


@catalog.command(name="build")
@click.argument("versions", nargs=-1, metavar="[VERSION]...")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=2, show_default=True,
              help="Releases fingerprinted at once.")
@click.option("--fingerprints/--no-fingerprints", default=True, show_default=True,
              help="Also take the math fingerprints of releases whose fingerprints are not complete.")
@click.option("--first-only", is_flag=True,
              help="Fingerprint only the models the tests and math-change tables name (the release ships as partial).")
def catalog_build(versions: tuple[str, ...], jobs: int, fingerprints: bool, first_only: bool) -> None:
    """Add timm releases to the catalog inside this installation of cachectl.

    Each release is installed beside the others with pip (PIP_NO_INDEX=1 and
    PIP_FIND_LINKS=WHEELHOUSE work offline) under $CACHECTL_BUILD_DIR (default: your cache
    folder), every model is built without weights in an interpreter importing it and its
    layout recorded, then it is merged into the catalog; then its math fingerprints are
    taken (about 15 CPU minutes a release). Stopped or crashed, it goes on where it was.

    \b
    Examples:
      cachectl catalog build 1.0.32
      PIP_NO_INDEX=1 PIP_FIND_LINKS=/shared/wheelhouse cachectl catalog build 1.0.32
    """
    from .catalog_build import build

    build(list(versions), fingerprints=fingerprints, jobs=jobs, first_only=first_only,
          say=lambda line: click.echo(line, err=True))


# -- the daemon --------------------------------------------------------------------------


@main.command(context_settings={"ignore_unknown_options": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def daemon(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the daemon in the foreground: the same as cachectld (cachectl daemon --help)."""
    from cachectld.main import main as cachectld

    root = ctx.find_root().obj
    cachectld.main(args=(["--root", str(root)] if root else []) + list(args), prog_name="cachectl daemon")


@main.command()
@json_option
@click.pass_context
@_no_cycle_collection
def status(ctx: click.Context, as_json: bool) -> None:
    """Is a daemon running on this cache: what it watches, its queue, what it did, what failed.

    Exits 0 when a daemon is running, 3 when none is (as systemctl status does). Failed
    files are retried when they change: copy them again, or touch them.

    \b
    Examples:
      cachectl status
      cachectl status --json | jq '.daemon.failures[] | .path'
    """
    import time

    from cachectld.status import read_status

    with _cache(ctx) as cache:
        st = read_status(cache.store.root)
        failed = [r for r in cache.rows() if r.state == "failed"]
    running = st is not None and st.running()
    if as_json:
        _emit_json({"running": running, "daemon": st.to_json() if st else None,
                    "failed_entries": [r.to_json() for r in failed]})
        sys.exit(0 if running else 3)
    console = _console()
    if st is None:
        console.print("no daemon has run on this cache (%s): start one with cachectld (or systemctl start cachectld)"
                      % cache.store.root)
    else:
        if running:
            console.print("cachectld: running, up %s, pid %d on %s (status written %s ago, last full scan %s)" % (
                _age(st.started), st.pid, st.host, _age(st.updated),
                "%s ago" % _age(st.scanned) if st.scanned else "not yet"))
        else:
            console.print("cachectld: not running (%s %s ago; it was pid %d on %s)" % (
                "stopped" if st.stopped else "last seen", _age(st.stopped or st.updated), st.pid, st.host))
        for w in st.watch:
            console.print("  watching %s (%s)" % (str(w.path), "polling, %s" % w.why if w.polling else w.why))
        console.print("  %d worker%s; %d queued, %d waiting for writers, %d converting" % (
            len(st.workers), "" if len(st.workers) == 1 else "s", st.queued, st.waiting, len(st.in_flight)))
        for w in st.in_flight:
            console.print("  converting %s (%s, worker %d)" % (w.path, _age(w.since), w.pid))
        for r in st.recent[-10:]:
            what = ("stored as %s" % r.version if r.new_version else "already stored as %s" % r.version) if r.ok else "failed"
            console.print("  %s ago  %s: %s" % (_age(r.finished), r.path, what))
        for r in st.failures:
            console.print("failed %s: %s" % (r.path, r.error or ""))
    for r in failed:
        console.print("%s (from the store): %s" % (r.ref, r.error or ""))
    sys.exit(0 if running else 3)


if __name__ == "__main__":
    sys.exit(main())
