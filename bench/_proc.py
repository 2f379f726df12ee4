"""What the kernel says about a process: CPU time and memory, from /proc.

Reading /proc from outside costs the measured process nothing, which matters
when the thing measured is the daemon's own CPU use.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of proc(5)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and Pss of ``pid`` in KiB (empty if it is gone).

    Pss counts a page shared by n processes as 1/n page: the fair figure for
    a daemon made of several worker processes, whose RSS values each count
    the shared libraries in full."""
    out: dict[str, int] = {}
    for path, names in ((f"/proc/{pid}/status", ("VmRSS", "VmHWM")),
                        (f"/proc/{pid}/smaps_rollup", ("Pss",))):
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for line in text.splitlines():
            name, _, value = line.partition(":")
            if name in names:
                out[name] = int(value.split()[0])
    return out


def thread_statuses(pid: int) -> Iterator[tuple[int, dict[str, str]]]:
    """(thread id, its /proc status fields) for every thread of ``pid``;
    threads that end while being read are left out."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        yield int(task.name), dict(
            (name, value.strip()) for name, _, value in
            (line.partition(":") for line in text.splitlines()))


def spin(start_at: float, seconds: float) -> float:
    """Burn CPU from monotonic time ``start_at`` for ``seconds`` of wall time;
    return the CPU seconds obtained in that window."""
    import time

    time.sleep(max(0.0, start_at - time.monotonic()))
    end = start_at + seconds
    c0 = time.process_time()
    while time.monotonic() < end:
        sum(range(1000))
    return time.process_time() - c0


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
