#!/usr/bin/env python3
"""kiln's user-space instructions per request, counted by callgrind: a
figure that does not move with the machine's load, for A/Bs of changes to
the request path (CPU time on this shared 2-core machine swings by 30%
between runs of the same binary).

    bench/instructions.py [--keep DIR] BINARY [BINARY ...]

Each binary runs two kilns (bench/compare.py's config, one worker) under
valgrind --tool=callgrind with instrumentation off, in front of one filled
redis-server: one caching (L1 warmed before its hit runs), one whose rule
forwards the benchmark keys. For each workload, instrumentation is turned
on (callgrind_control -i on) for one redis-benchmark run only, and the
instructions executed (Ir) are divided by its requests. Only kiln's own
instructions count: the kernel's work for its syscalls does not (see
compare.py --cpu for that). Prints a markdown table. With --keep, each
run's callgrind dump is copied to DIR as BINARY.WORKLOAD.P.out, for
callgrind_annotate.
"""
import glob, os, shutil, subprocess, sys, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C

# (name, redis-benchmark test, pipeline, requests, forwarding kiln)
WORKLOADS = [("set", "set", 1, 4000, False), ("set", "set", 16, 40000, False),
             ("get_forward", "get", 1, 4000, True), ("get_forward", "get", 16, 40000, True),
             ("get_hit", "get", 1, 4000, False), ("get_hit", "get", 16, 40000, False)]


def ctl(pid, *args):
    subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, check=True)


def counted(pid, out_prefix, run):
    """(instructions kiln executed during `run()`, the dump's path)."""
    ctl(pid, "-z")
    ctl(pid, "-i", "on")
    run()
    ctl(pid, "-i", "off")
    before = set(glob.glob(out_prefix + "*"))
    ctl(pid, "-d")
    new = sorted(set(glob.glob(out_prefix + "*")) - before, key=os.path.getmtime)
    with open(new[-1]) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1]), new[-1]
    raise RuntimeError("no totals in " + new[-1])


def main():
    args = sys.argv[1:]
    keep = None
    if args[:1] == ["--keep"]:
        keep, args = args[1], args[2:]
        os.makedirs(keep, exist_ok=True)
    if not args:
        sys.exit(__doc__)
    tmp = tempfile.mkdtemp(prefix="kiln-ir-")
    procs = []
    try:
        rport = C.free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL)
        procs.append(redis)
        C.wait_port(rport, redis, "redis-server")
        C.fill(rport)
        results = {}
        for b, path in enumerate(args):
            kilns = {}
            for fwd in (False, True):
                port, metrics = C.free_port(), C.free_port()
                cfg = os.path.join(tmp, f"{b}{fwd}.toml")
                with open(cfg, "w") as f:
                    f.write(C.kiln_config(port, rport, metrics, fwd))
                prefix = os.path.join(tmp, f"cg.{b}{fwd}.out")
                p = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                      f"--callgrind-out-file={prefix}", path, "--config", cfg],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                procs.append(p)
                C.wait_port(port, p, "kiln under callgrind")
                kilns[fwd] = (p.pid, port, prefix)
            for name, test, P, n, fwd in WORKLOADS:
                pid, port, prefix = kilns[fwd]
                if name == "get_hit":
                    C.call(port, "CACHE.CLEAR")
                    C.call(port, "CACHE.WARMUP", "SYNC", "MATCH", "key:*", timeout=600)
                ir, dump = counted(pid, prefix, lambda: C.bench(port, test, P, n))
                if keep:
                    shutil.copy(dump, os.path.join(keep, f"{os.path.basename(path)}.{name}.{P}.out"))
                results[(name, P, b)] = ir / n
                print(f"{os.path.basename(path)} {name} P{P}: {ir / n:,.0f} instructions/req", flush=True)
            for pid, _, _ in kilns.values():
                os.kill(pid, 9)
        head = " | ".join(os.path.basename(p) for p in args)
        many = len(args) > 1
        print(f"\n| work | P | {head} |" + (" last/first |" if many else ""))
        print("|---|---|" + "---|" * len(args) + ("---|" if many else ""))
        for name, _, P, _, _ in WORKLOADS:
            v = [results[(name, P, b)] for b in range(len(args))]
            print(f"| {name} | {P} | " + " | ".join(f"{x:,.0f}" for x in v) + " |"
                  + (f" {v[-1] / v[0]:.3f} |" if many else ""))
    finally:
        C.stop_all(procs, tmp)


if __name__ == "__main__":
    main()
