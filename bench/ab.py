#!/usr/bin/env python3
"""A/B of two kiln binaries in one run: kiln's CPU per request and rps.

    bench/ab.py BEFORE_BINARY AFTER_BINARY [ROUNDS]

Both kilns (one worker, L1 warmed, bench/compare.py's config) sit in front of
the same redis-server; redis-benchmark -c 50 -d 100 -r 100000 runs MGET of
10 and GET at -P 16, SET at -P 16, GET at -P 1 and HGETALL of 10,000
hashes at -P 16 (every hash read once first) against each in turn, the
order alternating per round. CPU is utime + stime of the kiln process from
/proc, before and after each run, divided by the requests: a figure that is
kiln's own, where throughput on this shared 2-core machine moves by tens of
percent between runs. Prints medians as a markdown table.
"""
import os, socket, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C
if len(sys.argv) < 3:
    sys.exit(__doc__)
bins = {"base": sys.argv[1], "main": sys.argv[2]}
TMP = C.tempfile.mkdtemp(prefix="kiln-ab-")
tick = os.sysconf("SC_CLK_TCK")
def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
rport = C.free_port()
redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
C.wait_port(rport, redis, "redis"); C.fill(rport); C.fill_hashes(rport)
procs = {}
for name, path in bins.items():
    port, metrics = C.free_port(), C.free_port()
    cfg = os.path.join(TMP, f"{name}.toml")
    open(cfg, "w").write(C.kiln_config(port, rport, metrics, False))
    p = subprocess.Popen([path, "--config", cfg]); C.wait_port(port, p, name)
    C.call(port, "CACHE.WARMUP", "SYNC", "MATCH", "key:*")
    procs[name] = (p, port)
workloads = [("mget10", 16, 300_000), ("get", 16, 1_000_000), ("set", 16, 1_000_000), ("get", 1, 200_000),
             ("hgetall", 16, 500_000)]
res = {}
try:
    for rnd in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
        for w, P, n in workloads:
            for name in (["base", "main"] if rnd % 2 == 0 else ["main", "base"]):
                p, port = procs[name]
                if w == "hgetall":
                    C.warm_hashes(port)
                c0 = cpu(p.pid)
                rps, p50, p99 = C.bench(port, w, P, n)
                us = (cpu(p.pid) - c0) / n * 1e6
                res.setdefault((w, P, name), []).append((rps, us))
                print(f"round {rnd} {w} P{P} {name}: {rps:,.0f} rps, {us:.2f} us CPU/req", flush=True)
finally:
    for p, _ in procs.values(): p.kill()
    redis.kill()
import statistics as S
print("\n| workload | P | before rps | after rps | before CPU µs/req | after CPU µs/req |\n|---|---|---|---|---|---|")
for w, P, n in workloads:
    b = res[(w, P, "base")]; m = res[(w, P, "main")]
    print(f"| {w} | {P} | {S.median(x[0] for x in b):,.0f} | {S.median(x[0] for x in m):,.0f} | {S.median(x[1] for x in b):.2f} | {S.median(x[1] for x in m):.2f} |")
