"""The serve loop of the benchmark peers (`SCRIPT --serve THREADS`, what `sar bench --torch
PYTHON` runs; trainers/sar-train/src/bench/peer.rs is the other end): prints one JSON line with
the torch version and threads, then reads step names from stdin, one per line. A step is built
on its first request by `build(name)`, which returns a callable running one step and returning
its seconds (after any warm-up it wants), or None for a name it does not know; each line is
answered with one JSON line holding that step's seconds, or an error. The line `rusage` is
answered with the process's CPU time so far (user and system seconds) and its peak resident set
(KiB), so that the benchmark can report the system-time share and memory beside its own.
"""
import json, resource, sys
import torch


def rusage():
    """This process's user and system seconds and peak RSS in KiB (Linux reports KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "max_rss_kib": r.ru_maxrss}


def serve(threads, build):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(json.dumps({"torch": torch.__version__, "threads": threads}), flush=True)
    steps = {}
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        if name == "rusage":
            print(json.dumps(rusage()), flush=True)
            continue
        if name not in steps:
            steps[name] = build(name)
        if steps[name] is None:
            print(json.dumps({"error": f"unknown step {name!r}"}), flush=True)
            continue
        print(json.dumps({"model": name, "seconds": steps[name]()}), flush=True)


def serving(argv, build):
    """Runs `serve` and returns True when argv asks for `--serve [THREADS]`."""
    if len(argv) > 1 and argv[1] == "--serve":
        serve(int(argv[2]) if len(argv) > 2 else 2, build)
        return True
    return False
