#!/usr/bin/env python3
"""A load with no locality: what caching costs when it does not pay.

    bench/admission.py [--rounds 3] [--requests 2000000] [--bin target/release/kiln]

GET of random keys over 2,000,000 names of which 1,000,000 exist (100-byte
values), redis-benchmark -c 50 -P 16 -r 2000000, through three kilns (one
worker each, bench/compare.py's config otherwise), each in front of a Redis
of its own so that upstream's tracking table is each kiln's alone:

  no cache     cache.enabled = false: a plain forwarder
  always       cache.max_memory = 16MiB, cache.admission = "always": every
               miss filled (kiln before admission)
  doorkeeper   cache.max_memory = 16MiB, cache.admission = "doorkeeper"
               (the default): once L1 is full, a miss is filled only if its
               key missed lately

Per round and kiln: CPU per GET (utime + stime of the kiln process from
/proc over the run's requests, split user / system), the run's hit rate,
fills and rejected fills, and at the end of the round L1's entries against
upstream's tracking_total_keys. The processes live across rounds, so round
N starts where round N-1 left L1 and the tracking table. Prints medians and
the ratio of each caching kiln's CPU to the plain forwarder's, and writes
bench/results/admission.md.
"""
import argparse, json, os, statistics as S, subprocess, sys, urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C

NAMES, EXIST = 2_000_000, 1_000_000
tick = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) / tick, int(f[12]) / tick


def stats(metrics):
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics/json", timeout=30) as r:
        return json.load(r)


def tracked(rport):
    info = C.call(rport, "INFO", "stats").decode()
    return int(next(l.split(":")[1] for l in info.splitlines() if l.startswith("tracking_total_keys:")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=2_000_000)
    ap.add_argument("--bin", default=os.path.join(C.ROOT, "target/release/kiln"))
    args = ap.parse_args()
    tmp = C.tempfile.mkdtemp(prefix="kiln-admission-")
    variants = {"no cache": 'enabled = false', "always": 'max_memory = "16MiB"\nadmission = "always"',
                "doorkeeper": 'max_memory = "16MiB"\nadmission = "doorkeeper"'}
    procs, kilns = [], {}
    try:
        for name, cache in variants.items():
            rport = C.free_port()
            redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
                                      "--maxclients", "20000"], stdout=subprocess.DEVNULL)
            procs.append(redis)
            C.wait_port(rport, redis, "redis-server")
            C.fill(rport, EXIST)
            port, metrics = C.free_port(), C.free_port()
            cfg = C.kiln_config(port, rport, metrics, False).replace('max_memory = "512MiB"', cache)
            path = os.path.join(tmp, f"{name.replace(' ', '_')}.toml")
            open(path, "w").write(cfg)
            p = subprocess.Popen([args.bin, "--config", path])
            procs.append(p)
            C.wait_port(port, p, name)
            kilns[name] = (p.pid, port, metrics, rport)
        res = {}
        for rnd in range(args.rounds):
            order = list(kilns)
            order = order[rnd % 3:] + order[:rnd % 3]
            for name in order:
                pid, port, metrics, rport = kilns[name]
                s0, (u0, y0) = stats(metrics), cpu(pid)
                cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(args.requests), "-d", "100",
                       "-r", str(NAMES), "-P", "16", "-q", "-t", "get"]
                subprocess.run(cmd, capture_output=True, check=True)
                (u1, y1), s1 = cpu(pid), stats(metrics)
                n = args.requests
                d = lambda k: s1[k] - s0[k]
                gets = d("hits") + d("misses")
                row = dict(cpu=((u1 - u0) + (y1 - y0)) / n * 1e6, user=(u1 - u0) / n * 1e6, sys=(y1 - y0) / n * 1e6,
                           hit=d("hits") / gets if gets else 0.0, fills=d("fills"),
                           rejected=d("fills_rejected") if "fills_rejected" in s1 else 0,
                           entries=s1["l1_entries"], tracked=tracked(rport))
                res.setdefault(name, []).append(row)
                print(f"round {rnd + 1} {name:11} {row['cpu']:.2f} us/GET ({row['user']:.2f} user + "
                      f"{row['sys']:.2f} sys)  hit {row['hit']:.1%}  fills {row['fills']}  rejected "
                      f"{row['rejected']}  L1 {row['entries']}  tracked {row['tracked']}", flush=True)
    finally:
        for p in procs:
            p.kill()
    med = lambda name, k: S.median(r[k] for r in res[name])
    base = med("no cache", "cpu")
    lines = ["| kiln | CPU us/GET (user + sys) | / no cache | hit rate | fills per round | rejected per round "
             "| L1 entries, last round | upstream tracking_total_keys, last round | tracked / L1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in variants:
        last = res[name][-1]
        ratio = f"{last['tracked'] / last['entries']:.2f}" if last["entries"] else "-"
        lines.append(f"| {name} | {med(name, 'cpu'):.2f} ({med(name, 'user'):.2f} + {med(name, 'sys'):.2f}) | "
                     f"{med(name, 'cpu') / base:.2f} | {med(name, 'hit'):.1%} | {med(name, 'fills'):.0f} | "
                     f"{med(name, 'rejected'):.0f} | {last['entries']} | {last['tracked']} | {ratio} |")
    table = "\n".join(lines)
    print("\n" + table)
    text = (f"# A load with no locality: GET over {NAMES:,} names ({EXIST:,} exist), -P 16\n\n"
            f"redis-benchmark -c 50 -P 16 -d 100 -r {NAMES} -n {args.requests} -t get; kiln threads = 1, "
            f"L1 16MiB; medians of {args.rounds} rounds (the processes live across rounds). CPU is the kiln "
            f"process's utime + stime (/proc) over the run's requests. {C.stamp()}.\n\n"
            f"Reproduce: `python3 bench/admission.py --rounds {args.rounds}`.\n\n{table}\n")
    C.write_result("admission.md", text)


if __name__ == "__main__":
    main()
