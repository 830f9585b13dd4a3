"""The `cachectld` command (also `cachectl daemon`): parse settings, run the daemon."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cachectl import __version__, numerics
from cachectl.errors import CachectlError

from . import config, logs

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.command(context_settings=CONTEXT, epilog=(
    "Settings come from flags, then CACHECTL_* variables (CACHECTL_QUIET_SECONDS=5, "
    "CACHECTL_WATCH=/a:/b), then the TOML file, then defaults. SIGHUP reloads them; "
    "SIGTERM lets conversions in flight finish (stop_grace_seconds), then stops. "
    "See `cachectl status` for what a running daemon does."))
@click.version_option(__version__, prog_name="cachectld")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path),
              help="The cache's folder. Default: $CACHECTL_ROOT, else the platform's user data folder.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML settings file. Default: $CACHECTL_CONFIG, else ROOT/cachectld.toml when it exists.")
@click.option("--watch", "-w", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder to watch, with its subfolders; repeat for more. Default: ROOT/inbox (created).")
@click.option("--quiet-seconds", type=float, help="A file unchanged this long is complete (default 2).")
@click.option("--rescan-seconds", type=float, help="Seconds between full rescans (default 300).")
@click.option("--polling", type=click.Choice(config.POLLING),
              help="Poll instead of inotify; auto: on nfs, cifs, smb3, lustre, sshfs (default auto).")
@click.option("--poll-interval", type=float, help="Seconds between two polls of a polled folder (default 5).")
@click.option("--workers", type=int, help="Conversion processes (default 1).")
@click.option("--queue-size", type=int, help="Complete files waiting for a worker, at most (default 64).")
@click.option("--task-timeout-seconds", type=float, help="A conversion running longer fails (default 3600).")
@click.option("--memory-limit-mb", type=int,
              help="Address space a conversion may add to its worker; 0: no limit (default 0).")
@click.option("--stop-grace-seconds", type=float, help="On SIGTERM, how long conversions may still run (default 60).")
@click.option("-v", "--verbose", is_flag=True, help="Log debug lines too.")
def main(root: Path | None, config_file: Path | None, watch: tuple[Path, ...], verbose: bool, **settings) -> None:
    """Watch folders and convert every complete timm checkpoint that lands in them.

    Each checkpoint file (.safetensors .pth .pt .bin .pth.tar .ckpt), and each Hugging Face
    snapshot folder of a hub cache copied in whole, is stored and converted for every
    registered environment once its writer is done: closed, renamed into place, or
    unchanged for quiet_seconds. Files in watched folders are only ever read.

    \b
    Examples:
      cachectld                                  watch ROOT/inbox
      cachectld --watch /shared/weights --watch /shared/hub --workers 2
      CACHECTL_ROOT=/var/lib/cachectl cachectld --polling on
    """
    from .daemon import Daemon
    from .notify import Notifier

    numerics.pin()  # before torch runs anything, inherited by the workers it spawns
    logs.setup(logging.DEBUG if verbose else logging.INFO)
    flags = {k: v for k, v in settings.items() if v is not None}
    if watch:
        flags["watch"] = watch
    try:
        cfg = config.load(root, config_file, flags)
        daemon = Daemon(cfg, reload=lambda: config.load(root, config_file, flags), notifier=Notifier())
        code = daemon.run()
    except CachectlError as exc:
        raise click.ClickException(str(exc))
    sys.exit(code)
