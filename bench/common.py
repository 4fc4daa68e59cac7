"""Helpers shared by the benchmarks: release binaries, loaders on free ports, memory sampling."""

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CONVEYOR_BIN points the benchmarks at other builds (for before/after comparisons).
BIN = os.environ.get("CONVEYOR_BIN", os.path.join(ROOT, "target", "release"))


def proc_kib(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


def minor_faults(pid):
    """Minor page faults of a process so far (/proc/PID/stat field 10): pages it touched that
    needed no disk read, as when an allocator hands out fresh pages or a mapped page is first
    touched."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def tree_rss_kib(pid):
    """RSS of a process and all its descendants (DataLoader workers, transform workers)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += proc_kib(p, "VmRSS:")
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                stack += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return total


class AnonSampler(threading.Thread):
    """Samples a process's anonymous RSS (mapped dataset pages are file-backed and excluded)."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak_kib, self.stop = pid, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_kib(self.pid, "RssAnon:"))
            self.stop.wait(0.05)


def start_loader(datasets, extra=()):
    """Starts a release loader-server on a free port serving {name: path}; returns (process, address)."""
    env = dict(os.environ, LOADER_LOG="warn")
    args = [os.path.join(BIN, "loader-server"), "--listen", "127.0.0.1:0"]
    for name, path in datasets.items():
        args += ["--dataset", f"{name}={path}"]
    proc = subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    m = re.match(r"listening on (\S+)", line)
    if not m:
        raise RuntimeError(f"loader did not start: {line!r}")
    return proc, m.group(1)


def conveyor_run(addrs, dataset, stats_path, extra):
    """Streams with the release trainer-client; returns its --stats-json report."""
    cmd = [os.path.join(BIN, "trainer-client"), "stream", "--dataset", dataset, "--stats-json", stats_path, *extra]
    for a in addrs:
        cmd += ["--loader", a]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(stats_path) as f:
        return json.load(f)


def write_markdown(out, name, lines):
    """Writes OUT/NAME.md from `lines` and prints it."""
    text = "\n".join(lines)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def run_contender_process(args, result_path, loader_pid=None):
    """Runs a contender (`args`: its command line, which writes its JSON result to
    `result_path`) while sampling the peak RSS of its process tree and of the loader's; returns
    the result with `trainer_rss_mib` and `loader_rss_mib` added."""
    proc = subprocess.Popen([sys.executable, *args])
    trainer_peak = loader_peak = 0
    while proc.poll() is None:
        trainer_peak = max(trainer_peak, tree_rss_kib(proc.pid))
        if loader_pid:
            loader_peak = max(loader_peak, tree_rss_kib(loader_pid))
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"contender {args} failed")
    with open(result_path) as fh:
        result = json.load(fh)
    result["trainer_rss_mib"] = trainer_peak / 1024
    result["loader_rss_mib"] = loader_peak / 1024
    return result
