"""The `criserver` command: serve, check, version, config."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import criserver
from criserver import config as config_mod
from criserver import image_cli, logs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="criserver", description=criserver.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the CRI daemon")
    _config_args(serve)
    serve.add_argument("--listen", help="unix:///path/to/socket")
    serve.add_argument("--root", help="persistent state directory")
    serve.add_argument("--state", help="volatile state directory")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))

    check = commands.add_parser("check", help="check the host's prerequisites")
    _config_args(check)

    commands.add_parser("version", help="print the version")

    image_cli.add_parser(commands)
    _config_args(commands.choices["image"])

    config_cmd = commands.add_parser("config", help="configuration helpers")
    config_sub = config_cmd.add_subparsers(dest="config_command", required=True)
    config_sub.add_parser("default", help="print the complete default config, commented")

    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"criserver {criserver.__version__} (CRI runtime.v1)")
        return 0
    if args.command == "config":
        from criserver.backends.microvm.backend import MicroVMOptions
        from criserver.backends.runc.backend import RuncOptions

        print(config_mod.render_default({"microvm": MicroVMOptions(), "runc": RuncOptions()}),
              end="")
        return 0
    try:
        overrides = {f"daemon.{key}": value for key, value in (
            ("listen", getattr(args, "listen", None)),
            ("root", getattr(args, "root", None)),
            ("state", getattr(args, "state", None)),
            ("log_level", getattr(args, "log_level", None)),
        ) if value is not None}
        config = config_mod.load(args.config, overrides)
    except config_mod.ConfigError as exc:
        print(f"criserver: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "image":
        return image_cli.run(args, args.endpoint or config.daemon.listen)
    if args.command == "check":
        from criserver.check import run_checks

        return run_checks(config)
    return _serve(config)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=config_mod.DEFAULT_CONFIG_PATH,
                        help=f"TOML config file (default {config_mod.DEFAULT_CONFIG_PATH}, "
                             "optional)")


def _serve(config: config_mod.Config) -> int:
    import uvloop

    from criserver.daemon import StartupError, serve

    logs.setup(config.daemon.log_level, config.daemon.log_format)
    log = logging.getLogger("criserver")
    try:
        return uvloop.run(serve(config))
    except (StartupError, config_mod.ConfigError) as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
