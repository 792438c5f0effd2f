#!/usr/bin/env python3
"""kiln against Redis direct and twemproxy, measured in the same run.

    bench/compare.py [--rounds 3] [--quick]
    bench/compare.py --cluster [--rounds 3] [--quick]
    bench/compare.py --cpu [--rounds 3] [--quick]

Builds kiln in release mode; starts on loopback a redis-server, twemproxy
(nutcracker) in front of it, kiln in front of it (L1 warmed), and a second
kiln whose rule turns caching off for the benchmark keys (pure forwarding);
fills 100,000 keys of 100 bytes; then runs redis-benchmark against the
targets in turn (the order rotates each round): GET (L1 hits for kiln), GET
through the forwarding kiln, SET, MGET of 10 keys and HGETALL of 10,000
hashes (L1 hits for kiln); -c 50 -d 100 -r 100000,
at -P 1 and -P 16. kiln runs one worker thread (`server.threads = 1`,
or KILN_THREADS=n), as Redis serves from one: on 2 cores redis-benchmark
takes the other, and a second worker only competes with it. Reports medians over the rounds as a markdown table with
the ratios kiln/Redis and kiln/twemproxy, writes it to
bench/results/compare.md and draws bench/results/compare.svg.

With --cluster: a Redis Cluster of 3 primaries and 3 replicas on loopback
(redis-server --cluster-enabled yes, redis-cli --cluster create), kiln in
front of it (upstream.cluster; L1 warmed through a SCAN of every primary)
and a forwarding kiln, against redis-benchmark --cluster talking to the
cluster directly (twemproxy has no cluster mode). GET hits, forwarded GET
and SET at -P 1 and -P 16; then the invalidation lag per primary: a key
read through kiln, written on its primary directly, and read through kiln
until the new value shows (p50/p99 of 300 per primary). Written to
bench/results/cluster.md.

With --cpu: CPU per request, the figure that is each server's own on a
shared machine. For SET, GET forwarded (a kiln whose rule turns caching
off) and GET L1 hits at -P 1 and -P 16, the serving process's user +
system CPU (/proc/PID/stat) around each redis-benchmark run, divided by
the requests, with the part spent in the kernel; with perf available, its syscalls and context switches per
request from a second, quarter-length run under perf stat -e
raw_syscalls:sys_enter,context-switches -p PID (the tracepoint costs the
traced process CPU, so CPU comes from the run without it).
kiln, twemproxy and Redis direct, medians of the rounds. Then the RSS an
idle client connection costs each (1,000 connections opened, VmRSS before
and after). Written to bench/results/cpu.md.
"""

import argparse
import csv
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = 100_000
# Hashes h:000000000000 ... of five 20-byte fields, for HGETALL.
HASHES = 10_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what):
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"{what} did not start")


def resp(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


def call(port, *args, timeout=120):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(resp(*args))
        data = b""
        while not data.endswith(b"\r\n") or data.count(b"\r\n") < 1:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
            if data[:1] in b"+-:" and data.endswith(b"\r\n"):
                break
            if data[:1] in b"*%$" and len(data) > 4 and time.sleep(0.05) is None:
                s.settimeout(0.3)
                try:
                    while True:
                        more = s.recv(1 << 16)
                        if not more:
                            break
                        data += more
                except socket.timeout:
                    pass
                break
        return data


def fill(port, keys=KEYS):
    """key:000000000000 ... as redis-benchmark's -r `keys` names them, 100-byte
    values; MSETs of 1,000 sent 100 at a time."""
    value = b"x" * 100
    with socket.create_connection(("127.0.0.1", port)) as s:
        for start in range(0, keys, 100_000):
            batch = []
            for b in range(start, min(start + 100_000, keys), 1000):
                args = [b"MSET"]
                for i in range(b, min(b + 1000, keys)):
                    args += [b"key:%012d" % i, value]
                batch.append(resp(*args))
            s.sendall(b"".join(batch))
            got = b""
            while got.count(b"+OK\r\n") < len(batch):
                got += s.recv(1 << 16)


def fill_hashes(port):
    with socket.create_connection(("127.0.0.1", port)) as s:
        batch = b""
        for i in range(HASHES):
            args = [b"HSET", b"h:%012d" % i]
            for f in range(1, 6):
                args += [b"f%d" % f, b"%020d" % (i * 10 + f)]
            batch += resp(*args)
        s.sendall(batch)
        got = b""
        while got.count(b"\r\n") < HASHES:
            got += s.recv(1 << 16)


def warm_hashes(port):
    """Reads every hash once through kiln, so HGETALL runs are L1 hits."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"".join(resp("HGETALL", b"h:%012d" % i) for i in range(HASHES)))
        got = b""
        while got.count(b"*10\r\n") < HASHES:
            got += s.recv(1 << 16)


def bench(port, test, pipeline, n):
    keys = HASHES if test == "hgetall" else KEYS
    cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(n), "-d", "100",
           "-r", str(keys), "-P", str(pipeline), "--csv"]
    if test == "mget10":
        cmd += ["MGET"] + ["key:__rand_int__"] * 10
    elif test == "hgetall":
        cmd += ["HGETALL", "h:__rand_int__"]
    else:
        cmd += ["-t", test]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = list(csv.DictReader(io.StringIO(out)))[-1]
    return float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"])


def kiln_config(port, upstream, metrics, forward_only):
    rule = '[[cache.rules]]\nmatch = "key:*"\ncache = false\n' if forward_only else ""
    return f"""[server]
listen = "127.0.0.1:{port}"
threads = {os.environ.get("KILN_THREADS", 1)}
[upstream]
url = "redis://127.0.0.1:{upstream}"
[cache]
max_memory = "512MiB"
{rule}[warmup]
on_start = false
max_keys = 200000
rate_limit = 0
lock = {{ scope = "instance" }}
hotkeys = {{ enabled = false }}
[admin]
rate_limits = {{ "CACHE.WARMUP" = "1000/s", "CACHE.CLEAR" = "1000/s" }}
[metrics]
listen = "127.0.0.1:{metrics}"
[log]
level = "warn"
"""


def svg(rows, path):
    """Grouped bars: kiln/Redis and kiln/twemproxy per workload."""
    w, h, left, top, bottom = 860, 360, 60, 30, 90
    top_ratio = max(2.0, max(max(r["vs_redis"], r["vs_twem"]) for r in rows) * 1.1)
    group = (w - left - 20) / len(rows)
    bar = group / 3
    y = lambda v: top + (h - top - bottom) * (1 - v / top_ratio)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
             f'<text x="{left}" y="18" font-size="14">kiln throughput ratio (median of rounds): blue = kiln/Redis, orange = kiln/twemproxy</text>']
    for tick in [0.5 * i for i in range(int(top_ratio / 0.5) + 1)]:
        parts.append(f'<line x1="{left}" x2="{w-20}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" stroke="{"#333" if tick == 1 else "#ddd"}"/>')
        parts.append(f'<text x="{left-8}" y="{y(tick)+4:.1f}" text-anchor="end">{tick:.1f}x</text>')
    for i, r in enumerate(rows):
        x0 = left + i * group + bar / 2
        for j, (key, color) in enumerate([("vs_redis", "#4472c4"), ("vs_twem", "#ed7d31")]):
            v = r[key]
            parts.append(f'<rect x="{x0 + j*bar:.1f}" y="{y(v):.1f}" width="{bar*0.9:.1f}" height="{y(0)-y(v):.1f}" fill="{color}"/>')
            parts.append(f'<text x="{x0 + j*bar + bar*0.45:.1f}" y="{y(v)-3:.1f}" text-anchor="middle">{v:.2f}</text>')
        parts.append(f'<text x="{x0 + bar:.1f}" y="{h-bottom+16}" text-anchor="middle">{r["name"]}</text>')
        parts.append(f'<text x="{x0 + bar:.1f}" y="{h-bottom+30}" text-anchor="middle">P{r["pipeline"]}</text>')
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts) + "\n")


def start_servers(tmp, procs, redis_args=(), hashes=False):
    """redis-server (filled), twemproxy in front of it, and two kilns (one
    caching, one whose rule forwards the benchmark keys); every process
    goes in `procs`. Returns (redis port, redis pid), (twemproxy port,
    twemproxy pid) and {name: (port, pid)} of the kilns."""
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
                              *redis_args], stdout=subprocess.DEVNULL)
    procs.append(redis)
    wait_port(rport, redis, "redis-server")
    fill(rport)
    if hashes:
        fill_hashes(rport)
    tport, tstats = free_port(), free_port()
    conf = os.path.join(tmp, "nutcracker.yml")
    with open(conf, "w") as f:
        f.write(f"kiln_bench:\n  listen: 127.0.0.1:{tport}\n  redis: true\n  hash: fnv1a_64\n"
                f"  distribution: ketama\n  auto_eject_hosts: false\n  servers:\n   - 127.0.0.1:{rport}:1\n")
    twem = subprocess.Popen(["nutcracker", "-c", conf, "-s", str(tstats)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    procs.append(twem)
    wait_port(tport, twem, "nutcracker")
    kilns = {}
    for name, forward_only in [("kiln", False), ("kiln_fwd", True)]:
        port, metrics = free_port(), free_port()
        path = os.path.join(tmp, f"{name}.toml")
        with open(path, "w") as f:
            f.write(kiln_config(port, rport, metrics, forward_only))
        p = subprocess.Popen([os.path.join(ROOT, "target/release/kiln"), "--config", path])
        procs.append(p)
        wait_port(port, p, name)
        kilns[name] = (port, p.pid)
    return (rport, redis.pid), (tport, twem.pid), kilns


def cpu_split(pid):
    """(user, system) CPU of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_run(pid, port, test, pipeline, n):
    """(us of CPU, syscalls, context switches, us of it in the kernel) per
    request of one run."""
    keys = KEYS
    cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(n), "-d", "100",
           "-r", str(keys), "-P", str(pipeline), "-q", "-t", test]
    # CPU from a run with nothing attached: perf's syscall tracepoint
    # costs the traced process CPU of its own.
    before = cpu_split(pid)
    subprocess.run(cmd, capture_output=True, check=True)
    after = cpu_split(pid)
    used = sum(after) - sum(before)
    kernel = after[1] - before[1]
    perf = shutil.which("perf")
    sys_n = cs_n = None
    m = max(n // 4, 1000)
    if perf:
        counted = cmd[:]
        counted[counted.index("-n") + 1] = str(m)
        out = subprocess.run([perf, "stat", "-x", ",", "-e", "raw_syscalls:sys_enter,context-switches",
                              "-p", str(pid), "--"] + counted, capture_output=True, text=True)
        counts = {}
        for line in out.stderr.splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[0].strip().isdigit():
                counts[parts[2]] = int(parts[0])
        sys_n, cs_n = counts.get("raw_syscalls:sys_enter"), counts.get("context-switches")
    per = lambda v: None if v is None else v / m
    return used * 1e6 / n, per(sys_n), per(cs_n), kernel * 1e6 / n


def idle_cost(pid, port, conns=1000):
    """KiB of RSS per idle client connection (each sent one PING first)."""
    before = rss_kib(pid)
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        socks.append(s)
    for s in socks:
        s.recv(16)
    time.sleep(0.5)
    after = rss_kib(pid)
    for s in socks:
        s.close()
    return (after - before) / conns


def cpu_main(args):
    tmp = tempfile.mkdtemp(prefix="kiln-bench-cpu-")
    procs = []
    try:
        redis, twem, kilns = start_servers(tmp, procs, redis_args=("--maxclients", "20000"))
        servers = {"redis": redis, "twemproxy": twem}
        workloads = [("set", "set", "kiln"), ("get_forward", "get", "kiln_fwd"), ("get_hit", "get", "kiln")]
        results = {}
        for rnd, pipeline, n, (wname, test, kname) in runs(args, workloads):
            targets = [("redis", *servers["redis"]), ("twemproxy", *servers["twemproxy"]),
                       ("kiln", *kilns[kname])]
            shift = rnd % 3
            for tname, port, pid in targets[shift:] + targets[:shift]:
                if tname == "kiln" and wname == "get_hit":
                    # The SET runs invalidated what was warmed.
                    warm(port)
                r = cpu_run(pid, port, test, pipeline, n)
                results.setdefault((wname, pipeline, tname), []).append(r)
                print(f"round {rnd+1} {wname:12} P{pipeline:<2} {tname:10} {r[0]:8.2f} us CPU/req "
                      f"({r[3]:.2f} in the kernel)  "
                      f"syscalls/req {r[1] if r[1] is None else round(r[1], 2)}  "
                      f"ctx/req {r[2] if r[2] is None else round(r[2], 3)}", flush=True)
        med = lambda k, i: (statistics.median(x[i] for x in results[k])
                            if all(x[i] is not None for x in results[k]) else float("nan"))
        trio = lambda g, i, fmt: " / ".join(format(g(t, i), fmt) for t in TRIO)
        lines = md_table(
            ["work", "P", "Redis us/req", "twemproxy us/req", "kiln us/req", "kiln/twemproxy", "kiln/Redis",
             "of which kernel us/req R / T / K", "syscalls/req R / T / K", "ctx switches/req R / T / K"],
            workload_rows(workloads, results, lambda wname, pipeline, g: [
                wname, pipeline, f"{g('redis', 0):.2f}", f"{g('twemproxy', 0):.2f}", f"{g('kiln', 0):.2f}",
                f"{g('kiln', 0) / g('twemproxy', 0):.2f}", f"{g('kiln', 0) / g('redis', 0):.2f}",
                trio(g, 3, ".2f"), trio(g, 1, ".2f"), trio(g, 2, ".3f")], med))
        idle = [("redis", servers["redis"]), ("twemproxy", servers["twemproxy"]), ("kiln", kilns["kiln"])]
        lines += [""] + md_table(["idle client connection", "RSS KiB per connection"],
                                 [[name, f"{idle_cost(pid, port):.1f}"] for name, (port, pid) in idle])
        table = show_table(lines)
        header = (f"# CPU per request: kiln vs twemproxy vs Redis direct\n\nredis-benchmark -c 50 -d 100 -r {KEYS}; "
                  f"{rounds_note(args)}; the serving process's user + system "
                  f"CPU (/proc/PID/stat) around each run over its requests, and the system (kernel) part of it; syscalls and context switches from a second, "
                  f"quarter-length run under perf stat -p (its tracepoint costs the traced process CPU, so CPU is taken "
                  f"without it; NaN without perf). kiln threads = {os.environ.get('KILN_THREADS', 1)}; get_hit from a warmed L1; "
                  f"get_forward through a kiln whose rule turns caching off. "
                  f"{stamp()}.\n\n"
                  "Reproduce: `python3 bench/compare.py --cpu --rounds 3`.\n\n")
        write_result("cpu.md", header + table + "\n")
    finally:
        stop_all(procs, tmp)


TRIO = ("redis", "twemproxy", "kiln")


def warm(port):
    """Clears kiln's L1 and warms every key:* into it."""
    call(port, "CACHE.CLEAR")
    reply = call(port, "CACHE.WARMUP", "SYNC", "MATCH", "key:*")
    if b"completed" not in reply:
        sys.exit(f"warmup failed: {reply[:200]!r}")


def runs(args, workloads):
    """Every run of every round, in order: (round, pipeline depth, requests,
    workload); fewer requests when quick, more when pipelined."""
    for rnd in range(args.rounds):
        for pipeline in [1, 16]:
            n = (20_000 if args.quick else 200_000) if pipeline == 1 else (100_000 if args.quick else 1_000_000)
            for workload in workloads:
                yield rnd, pipeline, n, workload


def md_table(columns, rows):
    """The lines of a Markdown table: `columns` (its header cells) over
    `rows` (each a list of cells)."""
    return (["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def workload_rows(workloads, results, row, med=None):
    """One table row per workload and pipeline depth (1, 16): `row(wname,
    pipeline, g)`, g(target, i) being the median over the rounds of field
    i of `target`'s results (or what `med(key, i)` says)."""
    med = med or (lambda k, i: statistics.median(x[i] for x in results[k]))
    return [row(wname, pipeline, lambda t, i, w=wname, p=pipeline: med((w, p, t), i))
            for wname, _, _ in workloads for pipeline in [1, 16]]


def show_table(lines):
    """`lines` joined into one text, printed."""
    table = "\n".join(lines)
    print(table)
    return table


def stamp():
    """Now, as the result files date their runs."""
    return time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())


def rounds_note(args):
    """'medians of N rounds', marked when quick."""
    return f"medians of {args.rounds} rounds{' (quick)' if args.quick else ''}"


def write_result(name, text):
    """Writes `text` to bench/results/`name`."""
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench/results", name), "w") as f:
        f.write(text)
    print(f"written to bench/results/{name}")


def stop_all(procs, tmp):
    """Stops the servers a run started and removes its directory."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def cluster_port():
    """A port below 55535 whose bus port (+10000) is free too."""
    while True:
        p = free_port()
        if p < 55535:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + 10000))
                return p
            except OSError:
                pass


def bench_cluster(port, test, pipeline, n, cluster):
    cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(n), "-d", "100",
           "-r", str(KEYS), "-P", str(pipeline), "--csv", "-t", test]
    if cluster:
        cmd.insert(1, "--cluster")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    # --cluster prints the nodes it found before the CSV.
    out = out[out.index('"test"'):]
    row = list(csv.DictReader(io.StringIO(out)))[-1]
    return float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"])


def key_slot(key):
    """CRC16/XMODEM of the key (or its hash tag) mod 16384."""
    s = key.find(b"{")
    if s >= 0:
        e = key.find(b"}", s + 1)
        if e > s + 1:
            key = key[s + 1:e]
    crc = 0
    for b in key:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc % 16384


def lag_per_node(kport, primaries, trials):
    """p50/p99 ms from a direct SET on a primary to kiln serving it."""
    out = {}
    for port, (lo, hi) in primaries.items():
        keys = [k for k in (b"lag:%d" % i for i in range(20000)) if lo <= key_slot(k) <= hi][:trials]
        k = socket.create_connection(("127.0.0.1", kport))
        d = socket.create_connection(("127.0.0.1", port))
        kf, df = k.makefile("rb"), d.makefile("rb")
        lags = []
        for i, key in enumerate(keys):
            d.sendall(resp("SET", key, b"old")); df.readline()
            for _ in range(2):  # a miss, then a hit from L1
                k.sendall(resp("GET", key)); kf.readline(); kf.readline()
            t0 = time.perf_counter()
            d.sendall(resp("SET", key, b"new%d" % i)); df.readline()
            while True:
                k.sendall(resp("GET", key)); kf.readline(); v = kf.readline()
                if v.startswith(b"new"):
                    break
            lags.append((time.perf_counter() - t0) * 1000)
        lags.sort()
        out[port] = (lags[len(lags) // 2], lags[int(len(lags) * 0.99) - 1], len(lags))
        k.close(); d.close()
    return out


def cluster_main(args):
    tmp = tempfile.mkdtemp(prefix="kiln-bench-cluster-")
    procs = []
    try:
        ports = []
        while len(ports) < 6:
            p = cluster_port()
            if p in ports:
                continue
            r = subprocess.Popen(["redis-server", "--port", str(p), "--save", "", "--appendonly", "no",
                                  "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                                  "--cluster-config-file", os.path.join(tmp, f"nodes-{p}.conf"), "--dir", tmp],
                                 stdout=subprocess.DEVNULL)
            procs.append(r)
            wait_port(p, r, "redis-server")
            ports.append(p)
        subprocess.run(["redis-cli", "--cluster", "create"] + [f"127.0.0.1:{p}" for p in ports] +
                       ["--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
        deadline = time.time() + 30
        while time.time() < deadline:
            infos = [call(p, "CLUSTER", "INFO") for p in ports]
            nodes = call(ports[0], "CLUSTER", "NODES")
            if all(b"cluster_state:ok" in i for i in infos) and nodes.count(b"slave") == 3:
                break
            time.sleep(0.1)
        else:
            sys.exit("cluster never became ok")
        primaries = {}
        for line in call(ports[0], "CLUSTER", "NODES").decode().splitlines():
            f = line.split()
            if len(f) > 8 and "master" in f[2]:
                lo, _, hi = f[8].partition("-")
                primaries[int(f[1].split("@")[0].rsplit(":", 1)[1])] = (int(lo), int(hi or lo))
        kilns = {}
        for name, forward_only in [("kiln", False), ("kiln_fwd", True)]:
            port, metrics = free_port(), free_port()
            conf = kiln_config(port, ports[0], metrics, forward_only).replace(
                f'url = "redis://127.0.0.1:{ports[0]}"',
                "cluster = [" + ", ".join(f'"127.0.0.1:{p}"' for p in ports) + "]")
            path = os.path.join(tmp, f"{name}.toml")
            with open(path, "w") as f:
                f.write(conf)
            p = subprocess.Popen([os.path.join(ROOT, "target/release/kiln"), "--config", path])
            procs.append(p)
            wait_port(port, p, name)
            kilns[name] = port
        fill(kilns["kiln"])  # MSET through kiln: split per slot

        workloads = [("get_hit", "get", "kiln"), ("get_forward", "get", "kiln_fwd"), ("set", "set", "kiln")]
        results = {}
        for rnd, pipeline, n, (wname, test, kname) in runs(args, workloads):
            targets = [("cluster", ports[0]), ("kiln", kilns[kname])]
            for tname, port in (targets if rnd % 2 == 0 else targets[::-1]):
                if tname == "kiln" and wname == "get_hit":
                    warm(kilns["kiln"])
                r = bench_cluster(port, test, pipeline, n, tname == "cluster")
                results.setdefault((wname, pipeline, tname), []).append(r)
                print(f"round {rnd+1} {wname:12} P{pipeline:<2} {tname:8} {r[0]:>12.0f} rps  p50 {r[1]:.3f} ms  p99 {r[2]:.3f} ms",
                      flush=True)
        lines = md_table(
            ["workload", "P", "cluster direct rps (redis-benchmark --cluster)", "kiln rps", "kiln/direct",
             "p50 ms direct / kiln", "p99 ms direct / kiln"],
            workload_rows(workloads, results, lambda wname, pipeline, g: [
                wname, pipeline, f"{g('cluster', 0):,.0f}", f"{g('kiln', 0):,.0f}",
                f"{g('kiln', 0) / g('cluster', 0):.2f}", f"{g('cluster', 1):.3f} / {g('kiln', 1):.3f}",
                f"{g('cluster', 2):.3f} / {g('kiln', 2):.3f}"]))
        lag = lag_per_node(kilns["kiln"], primaries, 60 if args.quick else 300)
        lines += [""] + md_table(
            ["primary (slots)", "invalidation lag p50 ms", "p99 ms", "samples"],
            [[f"127.0.0.1:{port} ({primaries[port][0]}-{primaries[port][1]})", f"{p50:.3f}", f"{p99:.3f}", n]
             for port, (p50, p99, n) in lag.items()])
        table = show_table(lines)
        header = (f"# kiln in front of a Redis Cluster vs the cluster direct\n\n3 primaries + 3 replicas on loopback; "
                  f"redis-benchmark -c 50 -d 100 -r {KEYS} (--cluster for the direct runs); {rounds_note(args)}"
                  f"; 2 cores shared by the client, kiln and six redis-servers; "
                  f"{stamp()}. get_hit: kiln answers from a warmed L1 "
                  "(warmup SCANs every primary). get_forward: a kiln whose rule turns caching off. "
                  f"kiln threads = {os.environ.get('KILN_THREADS', 1)}. Invalidation lag: a direct SET on the key's "
                  "primary until kiln serves the new value (includes the polling client's own round trips).\n\n")
        write_result("cluster.md", header + table + "\n")
    finally:
        stop_all(procs, tmp)


def prepare(tools, packages):
    """Exits unless every one of `tools` is installed (from `packages`);
    builds kiln's release binary."""
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"{tool} is missing: apt-get install {packages}")
    subprocess.run(["cargo", "build", "--release", "--bin", "kiln"], cwd=ROOT, check=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    ap.add_argument("--cluster", action="store_true", help="kiln in front of a Redis Cluster vs the cluster direct")
    ap.add_argument("--cpu", action="store_true", help="CPU (and syscalls) per request, and RSS per idle connection")
    args = ap.parse_args()
    if args.cluster and not args.cpu:
        prepare(["redis-server", "redis-benchmark", "redis-cli"], "redis-server redis-tools")
        return cluster_main(args)
    prepare(["redis-server", "redis-benchmark", "nutcracker"], "redis-server redis-tools nutcracker")
    if args.cpu:
        return cpu_main(args)
    tmp = tempfile.mkdtemp(prefix="kiln-bench-")
    procs = []
    try:
        (rport, _), (tport, _), started = start_servers(tmp, procs, hashes=True)
        kilns = {name: port for name, (port, _) in started.items()}

        workloads = [("get_hit", "get", "kiln"), ("get_forward", "get", "kiln_fwd"),
                     ("set", "set", "kiln"), ("mget10", "mget10", "kiln"),
                     ("hgetall_hit", "hgetall", "kiln")]
        results = {}
        for rnd, pipeline, n, (wname, test, kname) in runs(args, workloads):
            targets = [("redis", rport), ("twemproxy", tport), ("kiln", kilns[kname])]
            shift = rnd % 3
            for tname, port in targets[shift:] + targets[:shift]:
                if tname == "kiln" and wname in ("get_hit", "mget10"):
                    warm(kilns["kiln"])
                if tname == "kiln" and wname == "hgetall_hit":
                    warm_hashes(port)
                r = bench(port, test, pipeline, n)
                results.setdefault((wname, pipeline, tname), []).append(r)
                print(f"round {rnd+1} {wname:12} P{pipeline:<2} {tname:10} {r[0]:>12.0f} rps  p50 {r[1]:.3f} ms  p99 {r[2]:.3f} ms",
                      flush=True)
        rows = workload_rows(workloads, results, lambda wname, pipeline, get: {
            "name": wname, "pipeline": pipeline,
            "redis": get("redis", 0), "twem": get("twemproxy", 0), "kiln": get("kiln", 0),
            "p50": [get(t, 1) for t in TRIO], "p99": [get(t, 2) for t in TRIO]})
        for r in rows:
            r["vs_redis"], r["vs_twem"] = r["kiln"] / r["redis"], r["kiln"] / r["twem"]
        slash = lambda vs: " / ".join(f"{v:.3f}" for v in vs)
        table = show_table(md_table(
            ["workload", "P", "Redis rps", "twemproxy rps", "kiln rps", "kiln/Redis", "kiln/twemproxy",
             "p50 ms R / T / K", "p99 ms R / T / K"],
            [[r["name"], r["pipeline"], f"{r['redis']:,.0f}", f"{r['twem']:,.0f}", f"{r['kiln']:,.0f}",
              f"{r['vs_redis']:.2f}", f"{r['vs_twem']:.2f}", slash(r["p50"]), slash(r["p99"])] for r in rows]))
        header = (f"# kiln vs Redis direct vs twemproxy\n\nredis-benchmark -c 50 -d 100 -r {KEYS}; "
                  f"{rounds_note(args)}; loopback, 2 cores shared by the client, "
                  f"kiln and Redis; {stamp()}.\n"
                  "get_hit: kiln answers from a warmed L1. get_forward: a kiln whose rule turns caching off. "
                  f"hgetall_hit: HGETALL of {HASHES:,} hashes of five 20-byte fields, every one read once through kiln first. "
                  f"kiln threads = {os.environ.get('KILN_THREADS', 1)}, like Redis's one.\n\n")
        write_result("compare.md", header + table + "\n\n![ratios](compare.svg)\n")
        svg(rows, os.path.join(ROOT, "bench/results/compare.svg"))
        print("written to bench/results/compare.svg")
    finally:
        stop_all(procs, tmp)


if __name__ == "__main__":
    main()
