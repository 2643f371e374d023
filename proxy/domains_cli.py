"""The `tlsedge domains ...` and `tlsedge csr` commands: argument shapes and output.

Mirrors the platform's commands (domains-add, domains-ssl, ...). Every change goes
through the registry, so the CLI and the admin API apply the same rules; the
running proxy picks changes up from the store without a restart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from proxy.errors import TlsEdgeError


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    domains = sub.add_parser("domains", help="manage custom domains and their certificates")
    dsub = domains.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = dsub.add_parser("add", help="add a custom domain to an app")
    add.add_argument("domain")
    add.add_argument("--app", required=True)
    add.add_argument("--cert", help="PEM chain: your certificate, then intermediates")
    add.add_argument("--key", help="PEM private key (unencrypted)")
    add.add_argument("--no-letsencrypt", action="store_true",
                     help="do not obtain a Let's Encrypt certificate for it")
    remove = dsub.add_parser("remove", help="remove a custom domain")
    remove.add_argument("domain")
    ssl = dsub.add_parser("ssl", help="upload a custom certificate, or `disable` it")
    ssl.add_argument("domain")
    ssl.add_argument("disable", nargs="?", choices=["disable"],
                     help="remove the custom certificate (Let's Encrypt takes over)")
    ssl.add_argument("--cert")
    ssl.add_argument("--key")
    listing = dsub.add_parser("list", help="every domain with its certificate and status")
    listing.add_argument("--json", action="store_true")
    show = dsub.add_parser("show", help="one domain in detail")
    show.add_argument("domain")
    show.add_argument("--json", action="store_true")
    for p in (add, remove, ssl, listing, show):
        p.add_argument("-c", "--config", required=True)
    csr = sub.add_parser("csr", help="write a new private key (0600) and a CSR for a domain")
    csr.add_argument("domain")
    csr.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa")
    csr.add_argument("--out", default=".", help="folder for DOMAIN.key and DOMAIN.csr")
    csr.add_argument("-c", "--config", help="accepted for symmetry; not needed")


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise TlsEdgeError(f"--{what} FILE is required")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsEdgeError(f"{path}: cannot read: {exc.strerror}") from None


def _day(ts: float | None) -> str:
    if ts is None:
        return "-"
    days = int((ts - time.time()) // 86400)
    return f"{time.strftime('%Y-%m-%d', time.gmtime(ts))} ({days}d)"


def _print_table(views: list[dict[str, object]]) -> None:
    rows = [("DOMAIN", "APP", "CERTIFICATE", "EXPIRES", "LET'S ENCRYPT", "LAST ERROR")]
    for v in views:
        rows.append((str(v["name"]), str(v["app"]), str(v["in_use"]),
                     _day(v["expires_at"]),  # type: ignore[arg-type]
                     str(v["status_label"]), str(v["last_error"])[:60]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_one(v: dict[str, object]) -> None:
    print(f"domain:        {v['name']}\napp:           {v['app']}")
    print(f"certificate:   {v['in_use']} (expires {_day(v['expires_at'])})")  # type: ignore[arg-type]
    print(f"let's encrypt: {v['status_label']}"
          + (f" - {v['message']}" if v["message"] else ""))
    if v["last_error"]:
        print(f"last error:    {v['last_error']}")
    for source in ("custom", "acme"):
        cert = v[source]
        if isinstance(cert, dict):
            print(f"{source + ':':15}{', '.join(cert['names'])}; issuer {cert['issuer']}; "
                  f"valid until {_day(cert['not_after'])}")


def run(args: argparse.Namespace) -> int:
    if args.command == "csr":
        return _csr(args)
    return asyncio.run(_domains(args))


def _csr(args: argparse.Namespace) -> int:
    from proxy import names
    from proxy.certs.csr import key_and_csr, write_atomic

    domain = names.normalize(args.domain)
    key_pem, csr_pem = key_and_csr(domain, args.key_type)
    out = Path(args.out)
    key_path, csr_path = out / f"{domain}.key", out / f"{domain}.csr"
    if key_path.exists():
        raise TlsEdgeError(f"{key_path} exists; not overwriting a private key")
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(csr_path, csr_pem, mode=0o644)
    print(f"wrote {key_path} (keep it secret) and {csr_path} (send it to your CA)")
    return 0


async def _domains(args: argparse.Namespace) -> int:
    from proxy import app

    async with app.registry_for(args.config) as registry:
        action = args.action
        if action == "add":
            chain = _read(args.cert, "cert") if args.cert or args.key else None
            key = _read(args.key, "key") if args.cert or args.key else None
            view = await registry.add_domain(args.domain, args.app,
                                             letsencrypt=not args.no_letsencrypt,
                                             chain=chain, key=key)
            print(f"{view.name} added to {view.app}; certificate in use: {view.in_use}; "
                  f"Let's Encrypt: {view.status_label}")
        elif action == "remove":
            await registry.remove_domain(args.domain)
            print(f"{args.domain} removed")
        elif action == "ssl":
            if args.disable:
                view = await registry.remove_custom_certificate(args.domain)
                print(f"custom certificate of {view.name} removed; now serving: {view.in_use}")
            else:
                view = await registry.set_custom_certificate(
                    args.domain, _read(args.cert, "cert"), _read(args.key, "key"))
                print(f"custom certificate of {view.name} in use until "
                      f"{_day(view.expires_at)}")
        elif action == "list":
            views = [v.to_json() for v in await registry.views()]
            if args.json:
                json.dump(views, sys.stdout, indent=2)
                print()
            else:
                _print_table(views)
        elif action == "show":
            data = (await registry.view(args.domain)).to_json()
            if args.json:
                json.dump(data, sys.stdout, indent=2)
                print()
            else:
                _print_one(data)
    return 0
