"""The `tlsedge` command: argument parsing, exit codes, process environment.

The only module that calls sys.exit. Heavy imports happen after the environment
is set: OPENSSL_CONF (key-exchange groups) and PROMETHEUS_MULTIPROC_DIR must be in
place before `ssl` and `prometheus_client` are first imported.

No command shows a person a traceback: a refused input is one line per problem
(exit 1), a closed or broken stdout ends the command quietly, and an unexpected
error is one line (with its traceback only under TLSEDGE_DEBUG=1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from typing import Any

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def _openssl_environment() -> None:
    """OPENSSL_CONF (key-exchange groups), before anything imports ssl (asyncio does)."""
    if "OPENSSL_CONF" not in os.environ or os.environ.get("TLSEDGE_OPENSSL_CONF") == "1":
        os.environ["OPENSSL_CONF"] = str(resources.files("proxy.certs") / "openssl.cnf")
        os.environ["TLSEDGE_OPENSSL_CONF"] = "1"


def _prepare_environment(*, metrics_dir: bool) -> str | None:
    """Set process-wide settings that must precede the first ssl/prometheus import."""
    _openssl_environment()
    if not metrics_dir:
        # One-shot commands must not leave metric files for a dead pid in the dir the
        # supervisor serves from (check-config runs as ExecReload under systemd).
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    elif not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = tempfile.mkdtemp(prefix="tlsedge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return path
    return None


def version_text() -> str:
    """`tlsedge --version`: what a bug report needs to know about this install."""
    _prepare_environment(metrics_dir=False)
    import platform
    import ssl
    from importlib import metadata

    def of(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return (f"tlsedge {of('tlsedge')}\n"
            f"Python {platform.python_version()} ({sys.executable})\n"
            f"{ssl.OPENSSL_VERSION}\n"
            f"uvloop {of('uvloop')}")


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None
                 ) -> None:
        print(version_text())
        parser.exit()


def _config_option(p: argparse.ArgumentParser) -> None:
    from proxy.config import DEFAULT_PATH, default_path

    p.add_argument("-c", "--config", default=default_path(),
                   help=f"the config file (default: $TLSEDGE_CONFIG, else {DEFAULT_PATH})")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlsedge", description=__doc__.splitlines()[0])
    p.add_argument("--version", action=_Version, nargs=0,
                   help="show the version of tlsedge, Python, OpenSSL and uvloop")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _config_option(sub.add_parser("run", help="serve with a config file"))
    check = sub.add_parser("check-config", help="every check `run` makes before serving: "
                           "config, certificates, folders, ports")
    _config_option(check)
    reload = sub.add_parser("reload", help="validate the config, have the running node load "
                            "it, and wait for the outcome")
    _config_option(reload)
    demo = sub.add_parser("demo", help="serve a generated demo setup (certs, backend, admin)")
    demo.add_argument("--dir", default="./tlsedge-demo",
                      help="where to write the demo config, certificates and store")
    for name, port in (("https", 8443), ("http", 8080), ("metrics", 9448), ("admin", 9449)):
        demo.add_argument(f"--{name}-port", type=int, default=None,
                          help=f"default {port}, or a free port when it is taken")
    from proxy import domains_cli

    domains_cli.add_parsers(sub)
    cluster = sub.add_parser("cluster", help="the cluster seen through the store")
    cluster.add_argument("action", choices=["status"],
                         help="status: nodes, applied revisions, locks, etcd health")
    _config_option(cluster)
    store = sub.add_parser("store", help="maintenance of the store")
    store.add_argument("action", choices=["rekey"],
                       help="rekey: encrypt every private key in the store with the first "
                            "of store.encryption.key_files (resumable, safe while serving)")
    _config_option(store)
    worker = sub.add_parser("worker")  # internal: started by `run`
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--https-fd", type=int, required=True)
    worker.add_argument("--http-fd", type=int, required=True)
    worker.add_argument("--ready-fd", type=int, required=True)
    worker.add_argument("--snapshot-fd", type=int, default=-1)  # the supervisor's store read
    worker.add_argument("--sections-fd", type=int, default=-1)
    return p


def main(argv: list[str] | None = None) -> None:
    _survive_closed_streams()
    _openssl_environment()  # the parser imports modules that import ssl
    try:
        args = _parser().parse_args(argv)
    except SystemExit:  # --help, --version, a usage error: printed, maybe to no reader
        _flush_stdout()
        raise
    except BrokenPipeError:
        _drop_stdout()
        sys.exit(EXIT_OK)
    metrics_dir = _prepare_environment(metrics_dir=args.command in ("run", "demo", "worker"))
    try:
        code = _dispatch(args)
        _flush_stdout()
    except KeyboardInterrupt:
        code = EXIT_OK
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(code)


def _survive_closed_streams() -> None:
    """A command started with stdout or stderr closed (`tlsedge ... >&-`) gets None
    there from Python: give it /dev/null instead, so printing never raises."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115


def _flush_stdout() -> None:
    """Flush now, and point stdout at /dev/null when its reader is gone: the flush
    at exit would otherwise print 'Exception ignored ... BrokenPipeError'."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _drop_stdout()


def _drop_stdout() -> None:
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _fail(message: str) -> int:
    """Say why a command was refused: one line per problem, in the log once the
    command has set its logging up (`run` with JSON logs), else on stderr."""
    from proxy import logs

    for line in message.splitlines() or ["failed"]:
        if logs.is_setup():
            import logging

            logging.getLogger("tlsedge").error("%s", line)
        else:
            print(f"tlsedge: {line}", file=sys.stderr)
    return EXIT_REJECTED


def _dispatch(args: argparse.Namespace) -> int:
    from proxy.errors import TlsEdgeError

    try:
        return _command(args)
    except TlsEdgeError as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_OK  # the reader went away: what it did not read, it did not want
    except OSError as exc:  # a file or folder a command was pointed at
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}")
    except Exception as exc:
        if os.environ.get("TLSEDGE_DEBUG") == "1":
            raise
        return _fail(f"unexpected error: {type(exc).__name__}: {exc} (run again with "
                     "TLSEDGE_DEBUG=1 for the traceback, and report it)")


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        from proxy import app

        return app.run_supervisor(args.config)
    if args.command == "check-config":
        from proxy import app

        config = app.check_config(args.config)
        from proxy.store import check_encryption

        warning = check_encryption(config)
        if warning is not None:
            print(f"tlsedge: warning: {warning}", file=sys.stderr)
        from proxy.config import summary

        for line in summary(config):
            print(line)
        print(f"{args.config}: ok ({len(config.apps)} apps, {len(config.domains)} domains)")
        return EXIT_OK
    if args.command == "reload":
        from proxy import control

        control.reload(args.config, print)
        return EXIT_OK
    if args.command == "demo":
        from proxy import demo

        return demo.run(args.dir, https_port=args.https_port, http_port=args.http_port,
                        metrics_port=args.metrics_port, admin_port=args.admin_port)
    if args.command in ("domains", "csr"):
        from proxy import domains_cli

        return domains_cli.run(args)
    if args.command == "cluster":
        import asyncio

        from proxy import cluster
        from proxy import config as config_mod

        asyncio.run(cluster.print_status(config_mod.load(args.config)))
        return EXIT_OK
    if args.command == "store":
        from proxy.store.rekey import run_rekey

        return EXIT_OK if run_rekey(args.config, print) else EXIT_REJECTED
    if args.command == "worker":
        from proxy import config as config_mod
        from proxy import logs, worker

        settings = config_mod.load(args.config).logging
        logs.setup(settings.format, settings.level)
        return worker.run(args.config, args.https_fd, args.http_fd, args.ready_fd,
                          args.snapshot_fd, args.sections_fd)
    return EXIT_USAGE


if __name__ == "__main__":
    main()
