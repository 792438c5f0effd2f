#!/usr/bin/env python3
"""The real-client matrix: seven Redis clients run the same steps against
kiln (or any endpoint) and each step is reported ok or FAIL.

Clients: redis-cli, redis-py, ioredis 5 and 6, node-redis 5 and 6
(`npm install` here), redis-rs (`rs/`, built on first use).

    python3 bench/clients/matrix.py --port 6380         # an endpoint
    python3 bench/clients/matrix.py --cluster            # kiln in front of
        # a fresh 3 primary + 3 replica cluster, started here and stopped
    python3 bench/clients/matrix.py --standalone         # kiln in front of
        # a fresh redis-server

Steps (the same in every client): ping, set_get, incr,
mset_mget_across_slots, hash, list, expire_ttl, pipeline, transaction,
eval, scan, pubsub (PUBLISH counts the subscriber, the message arrives),
del, select_db (SELECT 1: refused in front of a cluster, as by Redis
Cluster; reported but not counted there). Exit 1 if a counted step failed.
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
NODE_LIBS = ["ioredis5", "ioredis6", "redis5", "redis6"]


def free_port(below=55535):
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        p = s.getsockname()[1]
        s.close()
        if p < below and p + 10000 < 65536:
            return p


def wait_port(port, timeout=20):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=20).stdout


def run_redis_py(port, prefix):
    import redis

    out = []
    c = redis.Redis(port=port, decode_responses=True, socket_timeout=5)
    T = lambda n: f"{prefix}:{{{n}}}"

    def step(name, f):
        try:
            f()
            out.append(f"{name} ok")
        except Exception as e:  # noqa: BLE001 - a step's failure, reported
            out.append(f"{name} FAIL {e}")

    def check(cond, why):
        if not cond:
            raise AssertionError(why)

    step("ping", lambda: check(c.ping() is True, "PING"))
    step("set_get", lambda: (c.set(T("a"), "v1"), check(c.get(T("a")) == "v1", "GET"))[1])
    step("incr", lambda: (c.delete(T("n")), check(c.incrby(T("n"), 5) == 5, "INCRBY"))[1])

    def mget():
        c.mset({T("x"): "1", T("y"): "2", T("z"): "3"})
        r = c.mget(T("x"), T("y"), T("z"), T("none"))
        check(r == ["1", "2", "3", None], f"MGET {r}")

    step("mset_mget_across_slots", mget)

    def hash_():
        c.delete(T("h"))
        c.hset(T("h"), mapping={"f1": "a", "f2": "b"})
        check(c.hmget(T("h"), "f1", "f2") == ["a", "b"], "HMGET")

    step("hash", hash_)

    def list_():
        c.delete(T("l"))
        c.rpush(T("l"), "a", "b", "c")
        check(c.lrange(T("l"), 0, -1) == ["a", "b", "c"], "LRANGE")

    step("list", list_)

    def ttl():
        c.set(T("e"), "v", ex=100)
        t = c.ttl(T("e"))
        check(90 < t <= 100, f"TTL {t}")

    step("expire_ttl", ttl)

    def pipe():
        c.delete(T("p"))
        p = c.pipeline(transaction=False)
        for _ in range(10):
            p.incr(T("p"))
        check(p.execute() == list(range(1, 11)), "pipeline")

    step("pipeline", pipe)

    def tx():
        k = f"{prefix}:{{tx}}"
        p = c.pipeline(transaction=True)
        p.set(k, "1").incr(k).get(k)
        r = p.execute()
        check(r[2] == "2", f"EXEC {r}")

    step("transaction", tx)

    def ev():
        c.set(T("s"), "sv")
        check(c.eval("return redis.call('GET', KEYS[1])", 1, T("s")) == "sv", "EVAL")

    step("eval", ev)

    def scan():
        seen = set(c.scan_iter(match=f"{prefix}:*", count=100))
        for k in [T("a"), T("x"), T("y"), T("z"), T("h")]:
            check(k in seen, f"SCAN missed {k}")

    step("scan", scan)

    def pubsub():
        ch = f"{prefix}:news"
        ps = c.pubsub()
        ps.subscribe(ch)
        m = ps.get_message(timeout=5)
        check(m and m["type"] == "subscribe", f"confirmation {m}")
        n = c.publish(ch, "hello")
        m = ps.get_message(timeout=5)
        ps.close()
        check(n == 1, f"PUBLISH counted {n}")
        check(m and m["data"] == "hello", f"message {m}")

    step("pubsub", pubsub)
    step("del", lambda: check(c.delete(T("a"), T("x"), T("y"), T("z"), T("nope")) == 4, "DEL"))

    def select():
        d = redis.Redis(port=port, db=1, socket_timeout=5)
        d.ping()
        d.close()

    step("select_db", select)
    c.close()
    return out


def run_cli(port, prefix):
    """redis-cli, one process per command, as a shell script would."""
    T = lambda n: f"{prefix}:{{{n}}}"
    out = []

    def step(name, checks):
        try:
            for args, want in checks:
                got = cli(port, *args).strip()
                if got != want:
                    raise AssertionError(f"{' '.join(args)}: {got!r}, want {want!r}")
            out.append(f"{name} ok")
        except Exception as e:  # noqa: BLE001
            out.append(f"{name} FAIL {e}")

    step("ping", [(["PING"], "PONG")])
    step("set_get", [(["SET", T("a"), "v1"], "OK"), (["GET", T("a")], "v1")])
    step("incr", [(["DEL", T("n")], cli(port, "EXISTS", T("n")).strip()), (["INCRBY", T("n"), "5"], "5")])
    step("mset_mget_across_slots", [(["MSET", T("x"), "1", T("y"), "2", T("z"), "3"], "OK"), (["MGET", T("x"), T("y"), T("z"), T("none")], "1\n2\n3")])
    step("hash", [(["DEL", T("h")], cli(port, "EXISTS", T("h")).strip()), (["HSET", T("h"), "f1", "a", "f2", "b"], "2"), (["HMGET", T("h"), "f1", "f2"], "a\nb")])
    step("list", [(["DEL", T("l")], cli(port, "EXISTS", T("l")).strip()), (["RPUSH", T("l"), "a", "b", "c"], "3"), (["LRANGE", T("l"), "0", "-1"], "a\nb\nc")])
    step("expire_ttl", [(["SET", T("e"), "v", "EX", "100"], "OK"), (["PERSIST", T("e")], "1")])
    pipe = "".join(f"INCR {T('p')}\n" for _ in range(10))
    try:
        cli(port, "DEL", T("p"))
        r = subprocess.run(["redis-cli", "-p", str(port)], input=pipe, capture_output=True, text=True, timeout=20).stdout.split()
        out.append("pipeline ok" if r == [str(i) for i in range(1, 11)] else f"pipeline FAIL {r}")
    except Exception as e:  # noqa: BLE001
        out.append(f"pipeline FAIL {e}")
    k = f"{prefix}:{{tx}}"
    try:
        r = subprocess.run(["redis-cli", "-p", str(port)], input=f"MULTI\nSET {k} 1\nINCR {k}\nGET {k}\nEXEC\n", capture_output=True, text=True, timeout=20).stdout
        out.append("transaction ok" if r.strip().endswith('"2"') or r.strip().split()[-1] == "2" else f"transaction FAIL {r!r}")
    except Exception as e:  # noqa: BLE001
        out.append(f"transaction FAIL {e}")
    step("eval", [(["SET", T("s"), "sv"], "OK"), (["EVAL", "return redis.call('GET', KEYS[1])", "1", T("s")], "sv")])
    try:
        keys = set(subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}:*"], capture_output=True, text=True, timeout=20).stdout.split())
        missed = [x for x in [T("a"), T("x"), T("y"), T("z"), T("h")] if x not in keys]
        out.append("scan ok" if not missed else f"scan FAIL missed {missed}")
    except Exception as e:  # noqa: BLE001
        out.append(f"scan FAIL {e}")
    ch = f"{prefix}:news"
    sub = subprocess.Popen(["redis-cli", "-p", str(port), "SUBSCRIBE", ch], stdout=subprocess.PIPE, text=True)
    try:
        sub.stdout.readline(), sub.stdout.readline(), sub.stdout.readline()
        n = cli(port, "PUBLISH", ch, "hello").strip()
        got = [sub.stdout.readline().strip() for _ in range(3)]
        out.append("pubsub ok" if n == "1" and got == ["message", ch, "hello"] else f"pubsub FAIL PUBLISH {n}, got {got}")
    finally:
        sub.kill()
    step("del", [(["DEL", T("a"), T("x"), T("y"), T("z"), T("nope")], "4")])
    step("select_db", [(["-n", "1", "PING"], "PONG")])
    return out


def run_node(lib, port, prefix):
    if not os.path.isdir(os.path.join(HERE, "node_modules", lib)):
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=HERE, check=True, capture_output=True)
    r = subprocess.run(["node", "matrix.js", lib, str(port), prefix], cwd=HERE, capture_output=True, text=True, timeout=180)
    return r.stdout.strip().splitlines() or [f"connect FAIL {r.stderr.strip()[-200:]}"]


def run_rs(port, prefix):
    rs = os.path.join(HERE, "rs")
    b = subprocess.run(["cargo", "build", "--release", "-q"], cwd=rs, capture_output=True, text=True)
    if b.returncode != 0:
        return [f"build FAIL {b.stderr[-300:]}"]
    r = subprocess.run([os.path.join(rs, "target", "release", "matrix-rs"), str(port), prefix], capture_output=True, text=True, timeout=180)
    return r.stdout.strip().splitlines() or [f"connect FAIL {r.stderr.strip()[-200:]}"]


def start_cluster(tmp):
    ports = [free_port() for _ in range(6)]
    procs = []
    for p in ports:
        d = os.path.join(tmp, str(p))
        os.makedirs(d)
        procs.append(subprocess.Popen(["redis-server", "--port", str(p), "--cluster-enabled", "yes", "--save", "", "--appendonly", "no", "--cluster-node-timeout", "2000"], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in ports:
        wait_port(p)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-replicas", "1", "--cluster-yes"], capture_output=True, timeout=60, check=True)
    end = time.time() + 30
    while time.time() < end:
        ok = all("cluster_state:ok" in cli(p, "CLUSTER", "INFO") for p in ports)
        synced = sum(cli(p, "INFO", "replication").count("state=online") for p in ports)
        if ok and synced == 3:
            break
        time.sleep(0.3)
    return procs, f'cluster = [{", ".join(repr(f"127.0.0.1:{p}") for p in ports[:3])}]'.replace("'", '"')


def start_kiln(tmp, upstream_line, binary=None):
    port = free_port()
    conf = os.path.join(tmp, "kiln.toml")
    with open(conf, "w") as f:
        f.write(f'[server]\nlisten = "127.0.0.1:{port}"\n[upstream]\n{upstream_line}\n[metrics]\nlisten = "127.0.0.1:0"\n[warmup]\non_start = false\nhotkeys = {{ enabled = false }}\n')
    binary = binary or os.path.join(ROOT, "target", "release", "kiln")
    if not os.path.exists(binary):
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True)
    log = open(os.path.join(tmp, "kiln.log"), "w")
    k = subprocess.Popen([binary, "--config", conf], stdout=log, stderr=log, env={**os.environ, "RUST_LOG": "warn"})
    wait_port(port)
    return k, port


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--port", type=int)
    g.add_argument("--cluster", action="store_true")
    g.add_argument("--standalone", action="store_true")
    ap.add_argument("--kiln", help="the kiln binary (default: target/release/kiln, built if missing)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kiln-matrix-")
    procs = []
    try:
        port = args.port
        if args.cluster:
            procs, up = start_cluster(tmp)
        elif args.standalone:
            rp = free_port()
            procs = [subprocess.Popen(["redis-server", "--port", str(rp), "--save", ""], stdout=subprocess.DEVNULL)]
            wait_port(rp)
            up = f'url = "redis://127.0.0.1:{rp}"'
        if not port:
            k, port = start_kiln(tmp, up, args.kiln)
            procs.append(k)
        runs = [("redis-cli", run_cli), ("redis-py", run_redis_py)]
        runs += [(lib, lambda p, x, lib=lib: run_node(lib, p, x)) for lib in NODE_LIBS]
        runs += [("redis-rs", run_rs)]
        failed = counted = 0
        for name, run in runs:
            lines = run(port, f"m-{name}")
            for line in lines:
                step = line.split(" ")[0]
                ok = line.split(" ")[1:2] == ["ok"]
                aside = step == "select_db" and args.cluster
                if not aside:
                    counted += 1
                    failed += not ok
                print(f"{name:10} {line}{'  (aside: cluster)' if aside else ''}")
        print(f"{counted - failed} of {counted} steps passed" + (" (select_db aside)" if args.cluster else ""))
        sys.exit(1 if failed else 0)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
