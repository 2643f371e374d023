"""CPU time, memory and open files of a process tree, read from /proc (Linux only).

Counts every process of a proxy (a master and its workers, or one multi-threaded
process): utime+stime of each, VmHWM / VmRSS summed, and open file descriptors.
Reads only; never signals.
"""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (children of every thread), bounded depth."""
    found: list[int] = []
    frontier = [pid]
    for _ in range(8):  # proxies are two levels deep; 8 bounds a surprise
        if not frontier:
            break
        found += frontier
        nxt: list[int] = []
        for p in frontier:
            for task in _tasks(p):
                try:
                    nxt += [int(c) for c in
                            Path(f"/proc/{p}/task/{task}/children").read_text().split()]
                except (FileNotFoundError, ProcessLookupError):
                    continue
        frontier = nxt
    return found


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads, live and exited)."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / TICK


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_kib(pids: list[int]) -> int:
    """Sum of each process's peak resident set (VmHWM)."""
    return sum(_status_kib(p, "VmHWM:") for p in pids)


def rss_kib(pid: int) -> int:
    return _status_kib(pid, "VmRSS:")


def hwm_kib(pid: int) -> int:
    return _status_kib(pid, "VmHWM:")


def open_fds(pid: int) -> int | None:
    """File descriptors `pid` holds open now; None once it has exited."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
