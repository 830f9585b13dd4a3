"""The `cachectl` command: parse, call the library, format. Nothing else lives here."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import CachectlError

CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CACHECTL", "max_content_width": 100}


def _emit_json(value) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def _fail(exc: CachectlError) -> click.ClickException:
    return click.ClickException(str(exc))


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


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
ema_option = click.option("--ema", is_flag=True, help="Use the EMA copy of the weights when the file holds one.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of a table.")


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cachectl")
def main() -> None:
    """Convert timm checkpoints between timm releases, and keep them ready per environment.

    \b
    Examples:
      cachectl inspect swin_tiny.pth            what it is, which timm made it
      cachectl convert swin_tiny.pth -o out.safetensors
      cachectl convert old.pth --python /envs/timm06/bin/python --json
    """


@main.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@ema_option
@python_option
@json_option
def inspect(file: Path, ema: bool, python: str | None, as_json: bool) -> None:
    """Tell which architecture and timm releases produced FILE, reading headers only.

    FILE is a checkpoint (.safetensors, .pth, .pt, .bin, .pth.tar) or a Hugging Face
    snapshot folder. Nothing in it is executed. The answer says whether it loads as-is
    in the timm of --python (default: the one installed beside cachectl).

    \b
    Examples:
      cachectl inspect resnet50_a1.pth
      cachectl inspect ~/hub/models--timm--vit_base_patch16_224.augreg_in21k/snapshots/abc --json
    """
    from .inspection import inspect_file
    from .target import Target

    try:
        with Target(python) as target:
            report = inspect_file(file, target, ema=ema)
    except CachectlError as exc:
        raise _fail(exc)
    if as_json:
        _emit_json(report.to_json())
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    arch = report.architecture or "(none in timm %s)" % report.installed_timm
    if report.architecture and report.architecture.split(".")[0] != report.source_architecture:
        arch += "  (%s in the producing release)" % report.source_architecture
    confidence = report.confidence if report.confidence != "partial" else "partial, score %.2f" % report.score
    rows = [
        ("file", "%s (%s, %s, %d tensors, %.1fM parameters)" % (
            report.file, report.format, _size(report.size), report.tensors, report.parameters / 1e6)),
        ("architecture", arch),
        ("produced by timm", ", ".join(report.timm_versions)),
        ("confidence", "%s (chosen by %s)" % (confidence, report.chosen_by)),
        ("num_classes", str(report.num_classes)),
        ("layout", report.layout),
    ]
    if report.container:
        rows.append(("weights from", "'%s'%s" % (report.container, (
            " (also in the file: %s)" % ", ".join(report.other_containers)) if report.other_containers else "")))
    if report.stripped_prefix:
        rows.append(("stripped prefix", report.stripped_prefix))
    if report.alternatives:
        rows.append(("also matches", ", ".join(c.architecture for c in report.alternatives[:5])
                     + (" and %d more" % (len(report.alternatives) - 5) if len(report.alternatives) > 5 else "")))
    rows.append(("loads as-is in timm %s" % report.installed_timm,
                 "yes" if report.loads_as_is else "no: %s" % report.as_is_problem))
    for k, v in rows:
        table.add_row(k, v)
    _console().print(table)


@main.command()
@click.argument("file", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the safetensors file. Default: NAME.timm-VERSION.safetensors in the current folder.")
@click.option("--model", metavar="NAME", help="Build this model in the target instead of the identified one.")
@ema_option
@python_option
@json_option
def convert(file: Path, output: Path | None, model: str | None, ema: bool, python: str | None, as_json: bool) -> None:
    """Write FILE as safetensors that load strictly in the target timm.

    The target is the timm of --python (default: the one beside cachectl). Upgrades and
    downgrades both work; the result is checked key by key and shape by shape against
    the target's own model before it is written. The output's metadata records the
    source sha256, the source and target releases, the model and every step.

    \b
    Examples:
      cachectl convert swin_tiny_06.pth -o swin_tiny.safetensors
      cachectl convert levit_128.safetensors --python /envs/old/bin/python --json
    """
    from .convert import convert as run
    from .target import Target

    try:
        with Target(python) as target:
            result = run(file, output, target, model=model, ema=ema)
    except CachectlError as exc:
        raise _fail(exc)
    if as_json:
        _emit_json({
            "output": str(result.output),
            "model": {"name": result.model.name, "kwargs": dict(result.model.kwargs)},
            "source": str(result.source),
            "source_sha256": result.source_sha256,
            "source_timm_versions": list(result.source_timm_versions),
            "source_architecture": result.tag.best.architecture,
            "confidence": result.tag.best.confidence,
            "target_timm": result.target_timm,
            "steps": list(result.steps),
            "size": result.size,
        })
        return
    console = _console()
    console.print("wrote [bold]%s[/bold] (%s) for timm %s" % (result.output, _size(result.size), result.target_timm))
    kwargs = "".join(", %s=%r" % kv for kv in result.model.kwargs.items())
    console.print("load it with: model = timm.create_model(%r%s); model.load_state_dict(safetensors.torch.load_file(%r))"
                  % (result.model.name, kwargs, str(result.output)))
    for step in result.steps:
        console.print("  - %s" % step)


if __name__ == "__main__":
    sys.exit(main())
