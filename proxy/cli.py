"""The `tlsedge` command: argument parsing, exit codes, process environment.

The only module that calls sys.exit. Heavy imports happen after the environment
is set: OPENSSL_CONF (key-exchange groups) and PROMETHEUS_MULTIPROC_DIR must be in
place before `ssl` and `prometheus_client` are first imported.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from importlib import resources

EXIT_OK, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2


def _prepare_environment(*, metrics_dir: bool) -> str | None:
    """Set process-wide settings that must precede the first ssl/prometheus import."""
    if "OPENSSL_CONF" not in os.environ or os.environ.get("TLSEDGE_OPENSSL_CONF") == "1":
        os.environ["OPENSSL_CONF"] = str(resources.files("proxy.certs") / "openssl.cnf")
        os.environ["TLSEDGE_OPENSSL_CONF"] = "1"
    if not metrics_dir:
        # One-shot commands must not leave metric files for a dead pid in the dir the
        # supervisor serves from (check-config runs as ExecReload under systemd).
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    elif not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        path = tempfile.mkdtemp(prefix="tlsedge-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return path
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tlsedge", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", required=True)
    check = sub.add_parser("check-config", help="validate a config and its certificates")
    check.add_argument("-c", "--config", required=True)
    demo = sub.add_parser("demo", help="serve a generated demo setup (certs, backend)")
    demo.add_argument("--dir", default="./tlsedge-demo",
                      help="where to write the demo config, certificates and store")
    demo.add_argument("--https-port", type=int, default=8443)
    demo.add_argument("--http-port", type=int, default=8080)
    demo.add_argument("--metrics-port", type=int, default=9100)
    from proxy import domains_cli

    domains_cli.add_parsers(sub)
    cluster = sub.add_parser("cluster", help="the cluster seen through the store")
    cluster.add_argument("action", choices=["status"],
                         help="status: nodes, applied revisions, locks, etcd health")
    cluster.add_argument("-c", "--config", required=True)
    worker = sub.add_parser("worker")  # internal: started by `run`
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--https-fd", type=int, required=True)
    worker.add_argument("--http-fd", type=int, required=True)
    worker.add_argument("--ready-fd", type=int, required=True)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    metrics_dir = _prepare_environment(metrics_dir=args.command in ("run", "demo", "worker"))
    try:
        code = _dispatch(args)
    except KeyboardInterrupt:
        code = EXIT_OK
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    sys.exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    from proxy.errors import TlsEdgeError

    try:
        if args.command == "run":
            from proxy import app

            return app.run_supervisor(args.config)
        if args.command == "check-config":
            from proxy import app

            config = app.check_config(args.config)
            print(f"{args.config}: ok ({len(config.apps)} apps, {len(config.domains)} domains)")
            return EXIT_OK
        if args.command == "demo":
            from proxy import demo

            return demo.run(args.dir, https_port=args.https_port, http_port=args.http_port,
                            metrics_port=args.metrics_port)
        if args.command in ("domains", "csr"):
            from proxy import domains_cli

            return domains_cli.run(args)
        if args.command == "cluster":
            import asyncio

            from proxy import cluster
            from proxy import config as config_mod

            asyncio.run(cluster.print_status(config_mod.load(args.config)))
            return EXIT_OK
        if args.command == "worker":
            from proxy import app, worker

            app.setup_logging()
            return worker.run(args.config, args.https_fd, args.http_fd, args.ready_fd)
    except TlsEdgeError as exc:
        print(f"tlsedge: {exc}", file=sys.stderr)
        return EXIT_REJECTED
    return EXIT_USAGE


if __name__ == "__main__":
    main()
