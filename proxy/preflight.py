"""What a node needs of the machine, checked before it serves: folders and files it
writes, and the ports it listens on. Needs no traffic and changes nothing.

`check-config` reports every problem found here at once (one line each, naming the
key); `run` makes the same checks, then creates the folders that are missing
(`prepare`), so a config pointing the access log at /var/log/tlsedge/ starts on a
machine where that folder does not exist yet.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from proxy.config import Config, parse_address

_LISTENERS = ("https", "http", "metrics", "admin")


def _writable_folder(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (made if missing), or None if they can."""
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            return f"{folder} cannot be created"
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == folder else f"cannot be created in {probe}"
        return f"{folder} {what} by this user"
    return None


def _writable_file(file: Path) -> str | None:
    if file.is_dir():
        return f"{file} is a folder"
    if file.exists():
        return None if os.access(file, os.W_OK) else f"{file} is not writable by this user"
    return _writable_folder(file.parent)


def path_problems(config: Config) -> list[tuple[str, str]]:
    """(key, reason) for every file or folder the node would fail to write."""
    found: list[tuple[str, str]] = []
    if config.store.backend == "files":
        why = _writable_folder(Path(config.store.path))
        if why:
            found.append(("store.path", why))
    log = config.access_log
    if log.enabled and log.path:
        why = _writable_file(Path(log.path))
        if why:
            found.append(("access_log.path", why))
    if config.listen.admin is not None:
        token = Path(config.admin.token_file)
        if token.exists():
            if not os.access(token, os.R_OK):
                found.append(("admin.token_file", f"{token} is not readable by this user"))
        else:
            why = _writable_folder(token.parent)
            if why:
                found.append(("admin.token_file", f"cannot create {token}: {why}"))
    return found


def port_problems(config: Config) -> list[tuple[str, str]]:
    """(key, reason) for every listen address that is taken, not ours to bind, or
    given to two listeners."""
    found: list[tuple[str, str]] = []
    seen: dict[tuple[str, int], str] = {}
    for key in _LISTENERS:
        address = config.listen.address(key)
        if address is None:
            continue
        host, port = parse_address(address, where=f"listen.{key}")
        other = seen.setdefault((host, port), key)
        if other != key:
            found.append((f"listen.{key}", f"{address} is listen.{other}'s address too"))
            continue
        why = _bind_problem(host, port)
        if why:
            found.append((f"listen.{key}", f"cannot listen on {address}: {why}"))
    return found


def _bind_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as the node binds it: dual-stack
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def prepare(config: Config) -> None:
    """Create the folders the node writes in when they are missing: the store's and the
    admin token's (0700: they hold keys), the access log's (0750, like /var/log/nginx).

    Raises OSError; `run` has checked with path_problems that it can."""
    if config.store.backend == "files":
        Path(config.store.path).mkdir(mode=0o700, parents=True, exist_ok=True)
    if config.listen.admin is not None:
        Path(config.admin.token_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = config.access_log
    if log.enabled and log.path:
        Path(log.path).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
