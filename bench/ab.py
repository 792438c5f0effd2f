#!/usr/bin/env python3
"""A/B of two kiln binaries in one run: kiln's CPU per request and rps.

    bench/ab.py BEFORE_BINARY AFTER_BINARY [ROUNDS]

Each binary runs two kilns (one worker, bench/compare.py's config) in front
of the same redis-server: one caching (L1 warmed before every hit run, since
the SET runs invalidate it) and one whose rule forwards the benchmark keys.
redis-benchmark -c 50 -d 100 -r 100000 runs issue 15's table (SET, forwarded
GET and L1-hit GET at -P 1 and -P 16) plus MGET of 10 and HGETALL of 10,000
hashes at -P 16 against each in turn, the order alternating per round. CPU
is utime + stime of the kiln process from /proc, before and after each run,
divided by the requests (also split user / system): a figure that is
kiln's own, where throughput on this shared 2-core machine moves by tens
of percent between runs. Then the RSS per idle client connection (1,000
opened). Prints medians as a markdown table.
"""
import os, statistics as S, subprocess, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C
if len(sys.argv) < 3:
    sys.exit(__doc__)
bins = {"base": sys.argv[1], "main": sys.argv[2]}
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
TMP = C.tempfile.mkdtemp(prefix="kiln-ab-")
tick = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / tick, int(f[12]) / tick


rport = C.free_port()
redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
                          "--maxclients", "20000"], stdout=subprocess.DEVNULL)
C.wait_port(rport, redis, "redis"); C.fill(rport); C.fill_hashes(rport)
procs = {}
for name, path in bins.items():
    for fwd in (False, True):
        port, metrics = C.free_port(), C.free_port()
        cfg = os.path.join(TMP, f"{name}{fwd}.toml")
        open(cfg, "w").write(C.kiln_config(port, rport, metrics, fwd))
        p = subprocess.Popen([path, "--config", cfg]); C.wait_port(port, p, name)
        procs[(name, fwd)] = (p, port)
# (name, redis-benchmark test, pipeline, requests, forwarding kiln)
workloads = [("set", "set", 1, 200_000, False), ("set", "set", 16, 1_000_000, False),
             ("get_forward", "get", 1, 200_000, True), ("get_forward", "get", 16, 1_000_000, True),
             ("get_hit", "get", 1, 200_000, False), ("get_hit", "get", 16, 1_000_000, False),
             ("mget10", "mget10", 16, 300_000, False), ("hgetall", "hgetall", 16, 500_000, False)]
res = {}
try:
    for rnd in range(rounds):
        for w, test, P, n, fwd in workloads:
            for name in (["base", "main"] if rnd % 2 == 0 else ["main", "base"]):
                p, port = procs[(name, fwd)]
                if w in ("get_hit", "mget10"):
                    C.call(port, "CACHE.CLEAR")
                    C.call(port, "CACHE.WARMUP", "SYNC", "MATCH", "key:*")
                if w == "hgetall":
                    C.warm_hashes(port)
                u0, s0 = cpu(p.pid)
                rps, p50, p99 = C.bench(port, test, P, n)
                u1, s1 = cpu(p.pid)
                us, uu, su = ((u1 - u0) + (s1 - s0)) / n * 1e6, (u1 - u0) / n * 1e6, (s1 - s0) / n * 1e6
                res.setdefault((w, P, name), []).append((rps, us, uu, su))
                print(f"round {rnd} {w} P{P} {name}: {rps:,.0f} rps, {us:.2f} us CPU/req "
                      f"({uu:.2f} user, {su:.2f} sys)", flush=True)
    idle = {name: C.idle_cost(procs[(name, False)][0].pid, procs[(name, False)][1]) for name in bins}
finally:
    for p, _ in procs.values():
        p.kill()
    redis.kill()
print("\n| workload | P | before rps | after rps | before CPU µs/req (user+sys) | after CPU µs/req (user+sys) | after/before |\n|---|---|---|---|---|---|---|")
for w, _, P, _, _ in workloads:
    b = res[(w, P, "base")]; m = res[(w, P, "main")]
    med = lambda xs, i: S.median(x[i] for x in xs)
    print(f"| {w} | {P} | {med(b, 0):,.0f} | {med(m, 0):,.0f} | {med(b, 1):.2f} ({med(b, 2):.2f}+{med(b, 3):.2f}) | "
          f"{med(m, 1):.2f} ({med(m, 2):.2f}+{med(m, 3):.2f}) | {med(m, 1) / med(b, 1):.2f} |")
print(f"| idle connection RSS KiB | | | | {idle['base']:.1f} | {idle['main']:.1f} | {idle['main'] / idle['base']:.2f} |")
