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
from typing import TYPE_CHECKING

from proxy import config
from proxy.errors import TlsEdgeError

if TYPE_CHECKING:
    from proxy.registry import Registry


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    domains = sub.add_parser("domains", help="manage custom domains and their certificates")
    dsub = domains.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = dsub.add_parser("add", help="add custom domains to an app (one or many)")
    add.add_argument("names", nargs="*", metavar="NAME")
    add.add_argument("--app", required=True)
    add.add_argument("--from-file", metavar="FILE",
                     help="more names, one a line ('-': standard input; # comments)")
    add.add_argument("--json", action="store_true", help="the result of each name as JSON")
    add.add_argument("--cert", help="PEM chain: your certificate, then intermediates")
    add.add_argument("--key", help="PEM private key (unencrypted)")
    add.add_argument("--no-letsencrypt", action="store_true",
                     help="do not obtain a Let's Encrypt certificate for it")
    add.add_argument("--challenge", choices=["http-01", "dns-01"],
                     help="how Let's Encrypt checks the domain (default http-01; dns-01, "
                          "the only way for a wildcard, needs the _acme-challenge CNAME)")
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
    retry = dsub.add_parser("retry", help="order (or check the DNS of) a domain now, without "
                            "waiting for its retry after a failure")
    retry.add_argument("domain")
    for p in (add, remove, ssl, listing, show, retry):
        p.add_argument("-c", "--config", default=config.default_path(),
                       help="the config file (default: $TLSEDGE_CONFIG, else "
                       f"{config.DEFAULT_PATH})")
    csr = sub.add_parser("csr", help="write a new private key (0600) and a CSR for names")
    csr.add_argument("domain", help="the first name: the CN, and the files' name")
    csr.add_argument("also", nargs="*", metavar="NAME",
                     help="more names for the certificate (subjectAltName)")
    csr.add_argument("--key-type", choices=["ecdsa", "rsa"], default="ecdsa")
    csr.add_argument("--out", default=".", help="folder for DOMAIN.key and DOMAIN.csr "
                     "(created 0700 if missing)")
    csr.add_argument("-c", "--config", help="accepted for symmetry; not needed")


def _read(path: str | None, what: str) -> bytes:
    if not path:
        raise TlsEdgeError(f"--{what} FILE is required")
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsEdgeError(f"{path}: cannot read: {exc.strerror}") from None


def _day(ts: float | None) -> str:
    """'2025-03-01 (in 12 days)', '2025-03-01 (expired 3 days ago)': the dashboard's words."""
    from proxy.registry import expiry_words

    if ts is None:
        return "-"
    return f"{time.strftime('%Y-%m-%d', time.gmtime(ts))} ({expiry_words(ts, time.time())})"


_HEADER = ("DOMAIN", "SOURCE", "APP", "CERTIFICATE", "EXPIRES", "LET'S ENCRYPT",
           "LAST ERROR")


def _print_table(views: list[dict[str, object]], widths: list[int] | None = None
                 ) -> list[int]:
    """Print rows (the header first when `widths` is None, the columns sized to this
    page); the widths used, for the next page of a stream."""
    rows = [] if widths is not None else [_HEADER]
    for v in views:
        rows.append((str(v["name"]), str(v.get("source", "store")), str(v["app"]),
                     str(v["in_use"]),
                     _day(v["expires_at"]),  # type: ignore[arg-type]
                     str(v["status_label"]), str(v["last_error"])[:60]))
    if widths is None:
        widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADER))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return widths


async def _list(registry: Registry, *, as_json: bool) -> None:
    """Every domain, printed a page at a time as it is read (a million domains never
    sit in memory at once). --json: one JSON array, a domain per line."""
    from proxy import listing

    widths: list[int] | None = None
    first = True
    if as_json:
        sys.stdout.write("[")
    async for views in listing.stream(registry):
        if as_json:
            for view in views:
                sys.stdout.write(("\n" if first else ",\n") + json.dumps(view.to_json()))
                first = False
        else:
            widths = _print_table([v.to_json() for v in views], widths)
    if as_json:
        sys.stdout.write("\n]\n")
    elif widths is None:
        _print_table([])


def _warn(warnings: tuple[str, ...]) -> None:
    """An accepted change that most clients will still refuse: said on stderr, exit 0."""
    for warning in warnings:
        print(f"tlsedge: warning: {warning}", file=sys.stderr)


def _print_one(v: dict[str, object]) -> None:
    print(f"domain:        {v['name']}\napp:           {v['app']}")
    if v.get("source") == "config":
        print("source:        config file (read-only here)")
    print(f"certificate:   {v['in_use']}; expires {_day(v['expires_at'])}")  # type: ignore[arg-type]
    print(f"let's encrypt: {v['status_label']}"
          + (f" - {v['message']}" if v["message"] else ""))
    if v["last_error"]:
        print(f"last error:    {v['last_error']}")
    warnings = v.get("warnings")
    for warning in warnings if isinstance(warnings, tuple | list) else ():
        print(f"warning:       {warning}")
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
    from proxy.atomicfile import write_atomic
    from proxy.certs.csr import key_and_csr

    domain = names.normalize(args.domain)
    also = [names.normalize(n, allow_wildcard=True) for n in args.also]
    key_pem, csr_pem = key_and_csr(domain, args.key_type, also)
    out = Path(args.out)
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_path, csr_path = out / f"{domain}.key", out / f"{domain}.csr"
    if key_path.exists():
        raise TlsEdgeError(f"{key_path} exists; not overwriting a private key")
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(csr_path, csr_pem, mode=0o644)
    print(f"wrote {key_path} (keep it secret) and {csr_path} (send it to your CA)")
    return 0


def _names(args: argparse.Namespace) -> list[str]:
    """The names of `domains add`: the arguments, then --from-file's lines."""
    found = list(args.names)
    if args.from_file:
        try:
            text = (sys.stdin.read() if args.from_file == "-"
                    else Path(args.from_file).read_text())
        except (OSError, UnicodeDecodeError) as exc:
            raise TlsEdgeError(f"{args.from_file}: cannot read: "
                               f"{getattr(exc, 'strerror', None) or exc}") from None
        found += [line.split("#", 1)[0].strip() for line in text.splitlines()]
        found = [n for n in found if n]
    if not found:
        raise TlsEdgeError("give the names to add (NAME ... or --from-file FILE)")
    return found


async def _add_one(registry: Registry, name: str, args: argparse.Namespace) -> int:
    """`domains add NAME`, with --cert/--key allowed."""
    from proxy.registry import Added

    chain = _read(args.cert, "cert") if args.cert or args.key else None
    key = _read(args.key, "key") if args.cert or args.key else None
    view = await registry.add_domain(name, args.app, letsencrypt=not args.no_letsencrypt,
                                     chain=chain, key=key, challenge=args.challenge)
    if args.json:
        print(json.dumps(Added(view.name, view).to_json(), indent=2))
    else:
        print(f"{view.name} added to {view.app}; certificate in use: {view.in_use}; "
              f"Let's Encrypt: {view.status_label}")
    _warn(view.warnings)
    return 0


async def _add(registry: Registry, args: argparse.Namespace) -> int:
    """One name: as it always was (with --cert/--key allowed). Several: each checked on
    its own, the valid ones added, one line (or JSON object) per name; exit 1 when
    one was rejected."""
    names = _names(args)
    if len(names) == 1 and not args.from_file:
        return await _add_one(registry, names[0], args)
    if args.cert or args.key:
        raise TlsEdgeError("--cert and --key go with one domain; add the others without")
    results = await registry.add_domains(names, args.app, letsencrypt=not args.no_letsencrypt,
                                         challenge=args.challenge)
    rejected = [r for r in results if r.view is None]
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    else:
        for r in results:
            if r.view is not None:
                print(f"{r.name} added to {args.app}; Let's Encrypt: {r.view.status_label}")
            else:
                print(f"{r.name}: not added: {r.error}")
        print(f"{len(results) - len(rejected)} added, {len(rejected)} rejected",
              file=sys.stderr)
    return 1 if rejected else 0


async def _domains(args: argparse.Namespace) -> int:
    from proxy.registry import open_registry

    async with open_registry(config.load(args.config)) as registry:
        action = args.action
        if action == "add":
            return await _add(registry, args)
        if action == "remove":
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
                _warn(view.warnings)
        elif action == "list":
            await _list(registry, as_json=args.json)
        elif action == "retry":
            view = await registry.retry(args.domain)
            print(f"retry of {view.name} requested; the running lifecycle starts at once "
                  f"(`tlsedge domains show {view.name}` follows it)")
        elif action == "show":
            data = (await registry.view(args.domain)).to_json()
            if args.json:
                json.dump(data, sys.stdout, indent=2)
                print()
            else:
                _print_one(data)
    return 0
