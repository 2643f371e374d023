"""Compiles the benchmark's small C helpers (benchmarks/c/) with gcc at run time.

Binaries go to benchmarks/.cache/bin, named by a hash of their source, so an edit
rebuilds and a rerun does not. Needs gcc and libssl-dev (scripts/setup.sh test).
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "c"
BIN = Path(__file__).resolve().parent / ".cache" / "bin"


class BuildError(RuntimeError):
    pass


def _build(name: str, flags: list[str], libs: list[str], suffix: str) -> Path:
    source = SOURCES / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags + libs).encode()).hexdigest()[:12]
    out = BIN / f"{name}-{digest}{suffix}"
    if out.exists():
        return out
    BIN.mkdir(parents=True, exist_ok=True)
    (BIN.parent / ".gitignore").write_text("*\n")
    tmp = out.with_name(out.name + ".tmp")
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", *flags, "-o", str(tmp), str(source), *libs,
           "-lssl", "-lcrypto"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise BuildError(f"gcc failed for {source.name} (is libssl-dev installed? "
                         f"`apt-get install libssl-dev`):\n{done.stderr}")
    tmp.replace(out)
    return out


def noresume_shim() -> Path:
    """The LD_PRELOAD library that makes every client handshake a full one."""
    return _build("noresume", ["-shared", "-fPIC"], ["-ldl"], ".so")


def hold_conns() -> Path:
    """The client that opens and holds many idle keep-alive TLS connections."""
    return _build("holdconns", [], [], "")


def sni_client() -> Path:
    """The client that sends a different SNI name on each connection."""
    return _build("sniclient", [], [], "")
