#!/usr/bin/env python3
"""L1 compression: bytes stored and hit throughput for 4 KiB JSON values.

    bench/compression.py [ROUNDS]

One redis-server holds 20,000 keys of about 4 KiB of JSON each (user
records with nested orders: compressible as real documents are, not a
repeated byte). Three kilns sit in front of it (bench/compare.py's config,
one worker): cache.compression none, lz4 and zstd (min_size 1KiB). Each is
warmed (CACHE.WARMUP SYNC), its l1_bytes read from CACHE.STATUS JSON, then
redis-benchmark -c 50 -P 16 GET key:__rand_int__ -r 20000 runs against
each in turn (order alternating per round), with kiln's CPU per request
from /proc. Writes bench/results/compression.md.
"""
import json, os, random, socket, statistics, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as C

KEYS = 20_000
ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
tick = os.sysconf("SC_CLK_TCK")


def cpu(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick


def document(i, rng):
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    doc = {"id": i, "name": f"user-{i}", "email": f"user{i}@example.com",
           "created": f"2026-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:00:00Z",
           "tags": rng.sample(words, 4), "orders": []}
    while len(json.dumps(doc)) < 4000:
        doc["orders"].append({"sku": f"SKU-{rng.randrange(100000):05d}", "qty": rng.randrange(1, 9),
                              "price": round(rng.uniform(1, 500), 2), "status": rng.choice(["paid", "shipped", "open"]),
                              "note": " ".join(rng.sample(words, 3))})
    return json.dumps(doc).encode()[:4096]


def bulk_text(reply):
    """The payload of a `$n` bulk reply."""
    return reply.split(b"\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


def fill(port):
    rng = random.Random(7)
    with socket.create_connection(("127.0.0.1", port)) as s:
        for start in range(0, KEYS, 500):
            args = [b"MSET"]
            for i in range(start, start + 500):
                args += [b"key:%012d" % i, document(i, rng)]
            s.sendall(C.resp(*args))
            got = b""
            while not got.endswith(b"+OK\r\n"):
                got += s.recv(1 << 16)


def main():
    subprocess.run(["cargo", "build", "--release", "--bin", "kiln"], cwd=C.ROOT, check=True)
    tmp = C.tempfile.mkdtemp(prefix="kiln-compress-")
    rport = C.free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL)
    procs = [redis]
    try:
        C.wait_port(rport, redis, "redis")
        fill(rport)
        kilns = {}
        for algo in ["none", "lz4", "zstd"]:
            port, metrics = C.free_port(), C.free_port()
            cfg = C.kiln_config(port, rport, metrics, False).replace(
                '[cache]\n', f'[cache]\ncompression = {{ algorithm = "{algo}", min_size = "1KiB" }}\n')
            path = os.path.join(tmp, f"{algo}.toml")
            open(path, "w").write(cfg)
            p = subprocess.Popen([os.path.join(C.ROOT, "target/release/kiln"), "--config", path])
            procs.append(p)
            C.wait_port(port, p, algo)
            reply = C.call(port, "CACHE.WARMUP", "SYNC", "MATCH", "key:*")
            if b"completed" not in reply:
                sys.exit(f"warmup failed: {reply[:200]!r}")
            status = json.loads(bulk_text(C.call(port, "CACHE.STATUS", "JSON")))
            kilns[algo] = (p, port, status["l1_bytes"], status["l1_entries"])
        res = {}
        for rnd in range(ROUNDS):
            order = list(kilns) if rnd % 2 == 0 else list(reversed(kilns))
            for algo in order:
                p, port, _, _ = kilns[algo]
                n = 300_000
                c0 = cpu(p.pid)
                cmd = ["redis-benchmark", "-p", str(port), "-c", "50", "-n", str(n), "-r", str(KEYS),
                       "-P", "16", "--csv", "GET", "key:__rand_int__"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = list(C.csv.DictReader(C.io.StringIO(out)))[-1]
                us = (cpu(p.pid) - c0) / n * 1e6
                res.setdefault(algo, []).append((float(row["rps"]), us, float(row["p99_latency_ms"])))
                print(f"round {rnd + 1} {algo:5} {float(row['rps']):>10,.0f} rps  {us:.2f} us CPU/req", flush=True)
        base = kilns["none"][2]
        med = lambda algo, i: statistics.median(x[i] for x in res[algo])
        table = C.show_table(C.md_table(
            ["cache.compression", "L1 entries", "l1_bytes", "vs none", "GET hit rps (P16)", "kiln CPU µs/req",
             "p99 ms"],
            [[algo, f"{entries:,}", f"{stored:,}", f"{stored / base:.2f}", f"{med(algo, 0):,.0f}",
              f"{med(algo, 1):.2f}", f"{med(algo, 2):.3f}"]
             for algo, (_, _, stored, entries) in kilns.items()]))
        text = (f"# L1 compression, 4 KiB JSON values\n\n{KEYS:,} keys of 4,096 bytes of JSON (user records with "
                f"orders), all in L1 (CACHE.WARMUP SYNC); redis-benchmark -c 50 -P 16 -n 300000 GET over them; "
                f"medians of {ROUNDS} rounds, order alternating; one kiln worker each; loopback, 2 cores shared; "
                f"{C.stamp()}. l1_bytes counts what is stored "
                f"(compressed values plus 112 bytes per entry).\n\n{table}\n")
        C.write_result("compression.md", text)
    finally:
        for p in procs:
            p.kill()


if __name__ == "__main__":
    main()
