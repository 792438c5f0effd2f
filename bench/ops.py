#!/usr/bin/env python3
"""Operations trial: what happens to kiln's clients when production happens
to kiln, beside the same load sent to Redis directly.

    bench/ops.py --kiln PATH [--label NAME] [--minutes N] [--only S,...] [--quick]
    bench/ops.py --before PATH --after PATH [--minutes N] [--only S,...] [--quick]

With --kiln, runs the scenarios below for one binary and prints a markdown
table. With --before and --after, runs each scenario for both binaries in
turn (before, then after, scenario by scenario, so both see the same state
of a shared machine) and writes bench/results/ops.md: a headline table, the
full table of each binary and the error kinds seen.

Every scenario starts its own redis-server(s) (a Redis Cluster, Sentinel)
and its own kiln on free loopback ports, and stops them by PID at its end,
also when it fails; a scenario that cannot be set up is reported as such
and the run goes on. Clients are Python threads speaking RESP over
sockets, every wait bounded (2 s per reply unless said). A client's step
is one command or a few (SET then GET); an error is a step that got an
error reply, a wrong value, a timeout or a lost connection. The direct
clients check a pooled connection before reusing it (a closed one is
reopened silently, as redis-py's pool does), and the cluster-aware one
follows MOVED and ASK itself.

Scenarios (about 30 s each, mixed-traffic --minutes):

  idle-reaping       Redis `timeout 2`; 3 clients each way send bursts of
                     GET/SET, MULTI/EXEC and SELECT 1 in step, separated by
                     lulls of 2.5-3 s, for 20 s
  restart-0.3s       SET/GET every 1 ms; Redis SHUTDOWN NOSAVE and started
                     again on its port 0.3 s later; time from Redis
                     answering again to the first good read
  value-100MB        SET, GET (byte-equal?) and DEL of a 100 MB value; kiln
                     RSS after each, 20 s later (the sidecar not polled
                     meanwhile) and after one /metrics/alerts request
  fd-exhaustion      kiln under prlimit --nofile=256:256 with max_clients
                     10000; 400 clients send PING: replied / refused / hung;
                     /health answered within 2 s? (direct: Redis under the
                     same limit with maxclients 10000)
  connection-burst   20,000 connections opened, PINGed and closed by 4
                     workers; time, errors, kiln RSS and log lines
  cross-protocol     upstream.connections = 1; two bystanders loop GET of
                     an uncached key while another client sends an HTTP
                     POST three times; Redis's log and its connection count
  cluster-failover   3+3 cluster; CLUSTER FAILOVER on a replica under load;
                     a direct write then reads through kiln until it shows:
                     the longest such window after the failover
  cluster-reshard    redis-cli --cluster reshard of 100 slots holding the
                     keys under load, the same stale-window check
  sentinel-failover  primary, replica, 3 sentinels; SENTINEL FAILOVER under
                     INCR load; the direct client asks Sentinel again after
                     an error; acknowledged INCRs lost
  bad-reload         an invalid value in the config file, SIGHUP: kiln must
                     keep serving the old config; then a good reload
  mixed-traffic      GET/SET/MGET/HGETALL/DEL, a 1 MB value every 500 steps,
                     N minutes; RSS each minute

Per scenario: client errors through kiln / direct, kiln RSS (peak from
VmHWM, end), alerts seen firing (from /metrics/alerts polled every 0.5 s
and kiln's 'alert firing' lines) and how many ended, kiln's log lines
(JSON lines: warnings, errors), and the scenario's own figures. kiln runs
one worker thread (compare.kiln_config; KILN_THREADS=n changes it) with
alerts.window = 10s, so alerts can end within a scenario.

--quick shortens everything (mixed traffic 1 minute) for a try-out.
Python 3 stdlib only; needs redis-server, redis-cli and prlimit.
"""

import argparse
import collections
import json
import os
import random
import re
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402
from compare import ROOT, free_port, key_slot, md_table, resp, stamp, write_result  # noqa: E402

MIB = 1 << 20
PING = b"*1\r\n$4\r\nPING\r\n"


class SetupError(Exception):
    """The scenario's servers could not be brought up."""


class ReplyError(Exception):
    """An error reply (`-ERR ...`)."""


class WrongValue(Exception):
    """A reply that is not what the client wrote."""


def check(reply):
    """`reply`, raising it if it is an error reply."""
    if isinstance(reply, ReplyError):
        raise reply
    return reply


def one(port, *args, timeout=2.0):
    """One command on a connection of its own."""
    c = Conn(port, timeout)
    try:
        return c.call(*args)
    finally:
        c.close()


def as_bytes(v):
    return v if isinstance(v, bytes) else str(v).encode()


class Conn:
    """One RESP connection; every wait bounded by `timeout` (OSError on a
    timeout, reset or close), error replies raised as ReplyError by call()
    and returned as values inside pipelines and arrays."""

    def __init__(self, port, timeout=2.0):
        self.port = port
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.pos = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def alive(self):
        """False once the server has closed the connection (or sent what was
        not asked for): what a pooling client checks before reusing it."""
        try:
            poll = select.poll()
            poll.register(self.sock, select.POLLIN)
            ready = poll.poll(0)
        except (OSError, ValueError):
            return False
        return not ready and self.pos == len(self.buf)

    def call(self, *args):
        self.sock.sendall(resp(*args))
        return check(self.read())

    def pipeline(self, *cmds):
        self.sock.sendall(b"".join(resp(*c) for c in cmds))
        return [self.read() for _ in cmds]

    def _more(self):
        if self.pos and self.pos == len(self.buf):
            self.buf, self.pos = bytearray(), 0
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("connection closed by the server")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._more()

    def _bulk(self, n):
        while len(self.buf) - self.pos < n + 2:
            self._more()
        v = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n + 2
        if self.pos == len(self.buf):
            self.buf, self.pos = bytearray(), 0
        return v

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode(errors="replace")
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind in (b"$", b"=", b"!"):
            n = int(rest)
            return None if n < 0 else self._bulk(n)
        if kind in (b"*", b"~", b">"):
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        if kind == b"%":
            return [self.read() for _ in range(2 * int(rest))]
        if kind == b"_":
            return None
        if kind in (b",", b"(", b"#"):
            return rest.decode()
        raise ConnectionError(f"unexpected reply {line[:40]!r}")


class ClusterClient:
    """A cluster-aware client: routes by slot from CLUSTER SLOTS, follows
    MOVED (updating its map) and ASK itself; a lost connection re-reads the
    map and is the caller's error (the command may have run)."""

    def __init__(self, seeds, timeout=2.0):
        self.seeds, self.timeout = list(seeds), timeout
        self.conns = {}
        self.slots = None
        self.refresh()

    def refresh(self):
        for port in dict.fromkeys(list(self.conns) + self.seeds):
            try:
                c = Conn(port, 0.5)
                try:
                    ranges = c.call("CLUSTER", "SLOTS")
                finally:
                    c.close()
            except (OSError, ReplyError):
                continue
            slots = [None] * 16384
            for r in ranges:
                slots[r[0]:r[1] + 1] = [r[2][1]] * (r[1] - r[0] + 1)
            self.slots = slots
            return
        raise ConnectionError("no cluster node answers CLUSTER SLOTS")

    def alive(self):
        for port, c in list(self.conns.items()):
            if not c.alive():
                c.close()
                del self.conns[port]
        return True

    def close(self):
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def call(self, *args):
        slot = key_slot(as_bytes(args[1]))
        port, asking = self.slots[slot], False
        for _ in range(10):
            if port is None:
                raise ReplyError(f"CLUSTERDOWN slot {slot} not served (client's map)")
            c = self.conns.get(port)
            try:
                if c is None:
                    c = self.conns[port] = Conn(port, self.timeout)
                reply = c.pipeline(("ASKING",), args)[1] if asking else c.pipeline(args)[0]
            except OSError:
                if c is not None:
                    c.close()
                self.conns.pop(port, None)
                try:
                    self.refresh()
                except OSError:
                    pass
                raise
            if isinstance(reply, ReplyError):
                msg = str(reply)
                if msg.startswith(("MOVED ", "ASK ")):
                    word, s, addr = msg.split()[:3]
                    port, asking = int(addr.rsplit(":", 1)[1]), word == "ASK"
                    if not asking:
                        self.slots[int(s)] = port
                    continue
                raise reply
            return reply
        raise ReplyError("too many redirections")


class SentinelClient:
    """A client that asks Sentinel for the primary, and asks again after a
    lost connection or a READONLY reply (both still the caller's error)."""

    def __init__(self, sentinels, master="mymaster", timeout=2.0):
        self.sentinels, self.master = sentinels, master
        self.broken = False
        self.conn = Conn(self.resolve(), timeout)

    def resolve(self):
        for port in self.sentinels:
            try:
                c = Conn(port, 0.5)
                try:
                    addr = c.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
                finally:
                    c.close()
                if addr:
                    return int(addr[1])
            except (OSError, ReplyError):
                continue
        raise ConnectionError("no sentinel names the primary")

    def alive(self):
        return not self.broken and self.conn.alive()

    def close(self):
        self.conn.close()

    def call(self, *args):
        try:
            return self.conn.call(*args)
        except ReplyError as e:
            if str(e).startswith("READONLY"):
                self.broken = True
            raise


def err_kind(e):
    """An error as a short kind, digits folded, for counting."""
    s = str(e) if isinstance(e, (ReplyError, WrongValue)) else f"{type(e).__name__}: {e}"
    if isinstance(e, WrongValue):
        s = "wrong value: " + s
    return re.sub(r"\d+", "N", s)[:100]


class Tally:
    """Steps and failed steps of one side (kiln or direct), the kinds of
    error, and (when `record`) when each step ended and whether it was ok."""

    def __init__(self, record=False):
        self.lock = threading.Lock()
        self.steps = self.errors = self.reconnects = 0
        self.kinds = collections.Counter()
        self.record = record
        self.events = []
        self.extra = collections.Counter()

    def ok(self):
        with self.lock:
            self.steps += 1
            if self.record:
                self.events.append((time.time(), True))

    def fail(self, e):
        with self.lock:
            self.steps += 1
            self.errors += 1
            self.kinds[err_kind(e)] += 1
            if self.record:
                self.events.append((time.time(), False))

    def merge(self, other):
        with self.lock:
            self.steps += other.steps
            self.errors += other.errors
            self.reconnects += other.reconnects
            self.kinds.update(other.kinds)
            self.events += other.events
            self.extra.update(other.extra)

    def cell(self):
        return f"{self.errors:,} of {self.steps:,}"


class Loader(threading.Thread):
    """Runs `step(client, i, loader)` until `stop`, `interval` s apart (or
    `pause(i, loader)` s, whether the step failed or not), counting into
    `tally`. A lost connection is dropped and made again (by `connect`)
    for the next step."""

    def __init__(self, name, tally, connect, step, stop, interval=0.001, pause=None):
        super().__init__(daemon=True, name=name)
        self.tally, self.connect, self.step, self.stop = tally, connect, step, stop
        self.interval, self.pause = interval, pause
        self.rng = random.Random(name)
        self.state = {}

    def run(self):
        client, i = None, 0
        while not self.stop.is_set():
            if client is not None and not client.alive():
                client.close()
                client = None
                with self.tally.lock:
                    self.tally.reconnects += 1
            try:
                if client is None:
                    client = self.connect()
                self.step(client, i, self)
                self.tally.ok()
            except (ReplyError, WrongValue) as e:
                self.tally.fail(e)
            except Exception as e:  # OSError, ConnectionError, a bad reply
                self.tally.fail(e)
                if client is not None:
                    client.close()
                client = None
            pause = self.pause(i, self) if self.pause else self.interval
            i += 1
            if pause:
                self.stop.wait(pause)
        if client is not None:
            client.close()


def set_get(c, i, ld):
    """SET the loader's key to i, GET it back: the same value or WrongValue."""
    key = f"k:{ld.name}"
    c.call("SET", key, i)
    got = c.call("GET", key)
    if got != str(i).encode():
        raise WrongValue(f"GET {key} gave {got!r:.40}, wrote {i}")


def start_loaders(env, tally, connect, step, n, prefix, interval=0.001, pause=None):
    """`n` loaders sharing `tally`, stopped by the scenario's end."""
    out = []
    for j in range(n):
        ld = Loader(f"{prefix}{j}", tally, connect, step, env.stop_load, interval, pause)
        ld.start()
        env.threads.append(ld)
        out.append(ld)
    return out


def stop_loaders(env, loaders):
    env.stop_load.set()
    for ld in loaders:
        ld.join(timeout=10)


class StaleChecker(threading.Thread):
    """Writes a counter on `key` through `writer` (direct), then reads it
    through `reader` (kiln) every 1 ms until it shows that value or a newer
    one (at most `cap` s): one window per write, from the write's
    acknowledgement to kiln first showing it."""

    def __init__(self, env, writer, reader, key, cap=8.0):
        super().__init__(daemon=True, name="stale")
        self.env, self.writer, self.reader, self.key, self.cap = env, writer, reader, key, cap
        self.windows = []  # (t_ack, seconds until kiln showed it, reads that were stale)
        self.errors = collections.Counter()
        self.stale_reads = 0
        self.capped = 0

    def run(self):
        w = r = None
        n = 0
        while not self.env.stop_load.is_set():
            try:
                if w is None:
                    w = self.writer()
                if r is None:
                    r = self.reader()
                n += 1
                w.call("SET", self.key, n)
                t_ack = time.time()
                stale = 0
                while True:
                    v = r.call("GET", self.key)
                    if v is not None and int(v) >= n:
                        break
                    stale += 1
                    if time.time() - t_ack > self.cap:
                        self.capped += 1
                        break
                    time.sleep(0.001)
                self.stale_reads += stale
                self.windows.append((t_ack, time.time() - t_ack, stale))
                self.env.stop_load.wait(0.005)
            except (ReplyError, OSError, ValueError) as e:
                self.errors[err_kind(e)] += 1
                for c in (w, r):
                    if c is not None:
                        c.close()
                w = r = None
                self.env.stop_load.wait(0.02)

    def summary(self, since):
        """Figures for windows whose write was acknowledged after `since`
        (the failover or reshard), and before it as the baseline."""
        before = [d for t, d, _ in self.windows if t < since]
        after = [d for t, d, _ in self.windows if t >= since]
        stale_after = sum(s for t, _, s in self.windows if t >= since)
        ms = lambda xs: f"{max(xs) * 1000:.1f} ms" if xs else "n/a"
        return {
            "writes checked before / after": f"{len(before)} / {len(after)}",
            "longest write-to-kiln window before": ms(before),
            "longest write-to-kiln window after": ms(after) + (f" ({self.capped} capped at {self.cap:.0f} s)"
                                                            if self.capped else ""),
            "stale reads after": stale_after,
            "checker errors": sum(self.errors.values()),
        }


def rss_mib(pid):
    try:
        return compare.rss_kib(pid) / 1024
    except OSError:
        return None


def hwm_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def http_get(port, path, timeout=2.0):
    """(status, body, seconds) of GET http://127.0.0.1:port/path; status
    None when it did not answer in `timeout`."""
    t0 = time.time()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read(), time.time() - t0
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.time() - t0
    except (OSError, ValueError) as e:
        return None, str(e).encode(), time.time() - t0


class Watch(threading.Thread):
    """Samples a kiln's RSS and /metrics/alerts every 0.5 s: peak RSS,
    alerts seen firing and the times one ended."""

    def __init__(self, kiln):
        super().__init__(daemon=True, name="watch")
        self.kiln = kiln
        self.stop = threading.Event()
        self.quiet = threading.Event()  # set: no HTTP requests to the sidecar
        self.peak = 0.0
        self.fired = collections.Counter()
        self.ended = collections.Counter()
        self.active = set()

    def run(self):
        while not self.stop.is_set():
            rss = rss_mib(self.kiln.proc.pid)
            if rss:
                self.peak = max(self.peak, rss)
            if self.quiet.is_set():
                self.stop.wait(0.5)
                continue
            status, body, _ = http_get(self.kiln.metrics, "/metrics/alerts", timeout=1.0)
            if status == 200:
                try:
                    now = {a["name"] for a in json.loads(body)}
                except (ValueError, KeyError, TypeError):
                    now = self.active
                for name in now - self.active:
                    self.fired[name] += 1
                for name in self.active - now:
                    self.ended[name] += 1
                self.active = now
            self.stop.wait(0.5)


def log_stats(path, since=0):
    """kiln's log from line `since`: lines, warnings, errors, alert firing
    and resolved lines (name -> count), and the lines themselves."""
    out = {"lines": 0, "warn": 0, "error": 0, "firing": collections.Counter(),
           "resolved": collections.Counter(), "text": []}
    try:
        with open(path, errors="replace") as f:
            lines = f.readlines()[since:]
    except OSError:
        return out
    for line in lines:
        out["lines"] += 1
        out["text"].append(line.rstrip("\n"))
        try:
            j = json.loads(line)
            level, fields = j.get("level", ""), j.get("fields", {})
        except ValueError:
            level = next((lv for lv in ("ERROR", "WARN") if f" {lv} " in line), "")
            fields = {}
        if level == "WARN":
            out["warn"] += 1
        elif level == "ERROR":
            out["error"] += 1
        if fields.get("message") == "alert firing":
            out["firing"][fields.get("alert", "?")] += 1
        elif fields.get("message") == "alert resolved":
            out["resolved"][fields.get("alert", "?")] += 1
    return out


def log_line_count(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def short_line(line, n=220):
    """A JSON log line as `LEVEL message key=value ...`, cut at `n`."""
    try:
        j = json.loads(line)
        fields = dict(j.get("fields", {}))
        msg = fields.pop("message", "")
        line = f"{j.get('level', '')} {msg} " + " ".join(f"{k}={v}" for k, v in fields.items())
    except ValueError:
        pass
    line = re.sub(r"\s+", " ", line.replace("|", "/"))
    return line if len(line) <= n else line[:n] + "..."


class Redis:
    def __init__(self, port, proc, logfile, cmd):
        self.port, self.proc, self.logfile, self.cmd = port, proc, logfile, cmd


class Kiln:
    def __init__(self, port, metrics, proc, conf, conf_text, logfile):
        self.port, self.metrics, self.proc = port, metrics, proc
        self.conf, self.conf_text, self.logfile = conf, conf_text, logfile
        self.watch = None

    def rss(self):
        return rss_mib(self.proc.pid)


def kiln_conf(port, metrics, upstream_port=None, cluster=None, sentinel=None, server="", upstream="", extra=""):
    """compare.kiln_config (one thread, no start-up warmup, no hot keys,
    instance lock) with info-level JSON logs, alerts.window 10s and the
    rate alerts (hit, miss, penetration: the synthetic loads here read
    what they just wrote, all misses) kept quiet by alerts.min_requests, and the
    upstream asked for: a standalone port, `cluster` seed ports or
    `sentinel` ports (master 'mymaster'). `server`/`upstream` are extra
    lines for those tables, `extra` whole tables appended."""
    text = compare.kiln_config(port, upstream_port or 0, metrics, False)
    text = text.replace('level = "warn"', 'level = "info"\nformat = "json"')
    url_line = f'url = "redis://127.0.0.1:{upstream_port or 0}"'
    if cluster:
        target = "cluster = [" + ", ".join(f'"127.0.0.1:{p}"' for p in cluster) + "]"
    elif sentinel:
        target = ('[upstream.sentinel]\nmaster = "mymaster"\nnodes = ['
                  + ", ".join(f'"127.0.0.1:{p}"' for p in sentinel) + "]")
    else:
        target = url_line
    text = text.replace(url_line, (upstream.strip() + "\n" if upstream else "") + target)
    if server:
        text = text.replace("[upstream]\n", server.strip() + "\n[upstream]\n", 1)
    return text + '[alerts]\nwindow = "10s"\nmin_requests = 1000000000\n' + extra


class Env:
    """One scenario's processes, threads and files: everything started
    through it is stopped by PID in close(), whatever happened."""

    def __init__(self, binary, name, keep=False):
        self.binary, self.name, self.keep = binary, name, keep
        self.tmp = tempfile.mkdtemp(prefix=f"kiln-ops-{name}-")
        self.procs, self.kilns, self.threads = [], [], []
        self.stop_load = threading.Event()
        self.phase = "setup"

    def running(self):
        self.phase = "run"

    def spawn(self, cmd, log):
        f = open(log, "ab")
        try:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True, cwd=self.tmp)
        finally:
            f.close()
        self.procs.append(p)
        return p

    def wait_up(self, port, proc, what):
        try:
            compare.wait_port(port, proc, what)
        except SystemExit as e:
            raise SetupError(str(e)) from None

    def redis(self, name="redis", port=None, args=(), prefix=()):
        port = port or free_port()
        logfile = os.path.join(self.tmp, f"{name}-{port}.log")
        cmd = [*prefix, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.tmp, "--logfile", logfile, *args]
        p = self.spawn(cmd, os.path.join(self.tmp, f"{name}-{port}.out"))
        self.wait_up(port, p, name)
        return Redis(port, p, logfile, cmd)

    def restart(self, r):
        """Starts `r`'s command again (same port); returns when it answers
        PING, with the time it first did."""
        r.proc = self.spawn(r.cmd, os.path.join(self.tmp, f"restart-{r.port}.out"))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                c = Conn(r.port, 0.2)
                try:
                    if c.call("PING") == "PONG":
                        return time.time()
                finally:
                    c.close()
            except (OSError, ReplyError):
                time.sleep(0.002)
        raise RuntimeError("redis did not come back within 20 s")

    def cluster(self):
        """3 primaries + 3 replicas on ports from compare.cluster_port
        (cluster-node-timeout 2000 ms, as compare.py --cluster starts
        them), made one with redis-cli --cluster create; their ports once
        every node says cluster_state:ok and the replicas are attached."""
        ports = []
        while len(ports) < 6:
            p = compare.cluster_port()
            if p in ports:
                continue
            self.redis(name="node", port=p, args=(
                "--cluster-enabled", "yes", "--cluster-node-timeout", "2000",
                "--cluster-config-file", os.path.join(self.tmp, f"nodes-{p}.conf")))
            ports.append(p)
        try:
            subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                            "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        except subprocess.SubprocessError as e:
            raise SetupError(f"redis-cli --cluster create: {e}") from None
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if (all(b"cluster_state:ok" in one(p, "CLUSTER", "INFO") for p in ports)
                        and one(ports[0], "CLUSTER", "NODES").count(b"slave") == 3):
                    return ports
            except (OSError, ReplyError):
                pass
            time.sleep(0.1)
        raise SetupError("cluster never became ok")

    def sentinel(self, primary):
        port = free_port()
        conf = os.path.join(self.tmp, f"sentinel-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {self.tmp}\n"
                    f"logfile {os.path.join(self.tmp, f'sentinel-{port}.log')}\n"
                    f"sentinel monitor mymaster 127.0.0.1 {primary} 2\n"
                    "sentinel down-after-milliseconds mymaster 1000\n"
                    "sentinel failover-timeout mymaster 5000\n"
                    "sentinel parallel-syncs mymaster 1\n")
        p = self.spawn(["redis-server", conf, "--sentinel"], os.path.join(self.tmp, f"sentinel-{port}.out"))
        self.wait_up(port, p, "sentinel")
        return port

    def kiln(self, prlimit=None, **conf):
        port, metrics = free_port(), free_port()
        text = kiln_conf(port, metrics, **conf)
        path = os.path.join(self.tmp, f"kiln-{port}.toml")
        with open(path, "w") as f:
            f.write(text)
        logfile = os.path.join(self.tmp, f"kiln-{port}.log")
        prefix = ["prlimit", f"--nofile={prlimit}:{prlimit}"] if prlimit else []
        p = self.spawn([*prefix, self.binary, "--config", path], logfile)
        self.wait_up(port, p, "kiln")
        k = Kiln(port, metrics, p, path, text, logfile)
        deadline = time.time() + 10
        while True:
            try:
                c = Conn(port, 1)
                try:
                    if c.call("PING") == "PONG":
                        break
                finally:
                    c.close()
            except (OSError, ReplyError) as e:
                if time.time() > deadline:
                    raise SetupError(f"kiln does not answer PING: {e}") from None
                time.sleep(0.1)
        k.watch = Watch(k)
        k.watch.start()
        self.kilns.append(k)
        return k

    def collect(self, res):
        """The first kiln's RSS, alerts and log into `res`."""
        if not self.kilns:
            return
        k = self.kilns[0]
        k.watch.stop.set()
        k.watch.join(timeout=5)
        code = k.proc.poll()
        hwm = hwm_mib(k.proc.pid) if code is None else None
        res.rss_peak = max(x for x in (hwm, k.watch.peak, 0) if x is not None)
        res.rss_end = k.rss() if code is None else None
        if code is not None:
            res.notes.append(f"kiln exited with code {code} during the scenario")
            res.figures["kiln exited"] = f"code {code}"
        log = log_stats(k.logfile)
        res.log = log
        fired = collections.Counter(k.watch.fired)
        for name, n in log["firing"].items():
            fired[name] = max(fired[name], n)
        ended = collections.Counter(k.watch.ended)
        for name, n in log["resolved"].items():
            ended[name] = max(ended[name], n)
        res.alerts_fired, res.alerts_ended = fired, ended

    def close(self):
        self.stop_load.set()
        for t in self.threads:
            t.join(timeout=5)
        for k in self.kilns:
            if k.watch:
                k.watch.stop.set()
        # Newest first: kilns go before the servers they front.
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                try:
                    p.kill()
                    p.wait(timeout=5)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        if not self.keep:
            subprocess.run(["rm", "-rf", self.tmp], timeout=30)


class Result:
    def __init__(self, name):
        self.name = name
        self.status = "ok"
        self.kiln = self.direct = None
        self.rss_peak = self.rss_end = None
        self.alerts_fired, self.alerts_ended = collections.Counter(), collections.Counter()
        self.log = None
        self.figures = {}
        self.headline = ""
        self.notes = []
        self.seconds = 0.0


# Scenarios: each takes (env, res, opts), sets up under env.phase
# "setup", calls env.running(), and fills res.


def s_idle_reaping(env, res, opts):
    r = env.redis()
    one(r.port, "CONFIG", "SET", "timeout", "2")
    k = env.kiln(upstream_port=r.port)
    env.running()

    def step(c, i, ld):
        n = i % 8
        key = f"idle:{ld.name}"
        if n < 6:
            if n % 2 == 0:
                c.call("SET", key, i)
                ld.state["v"] = str(i).encode()
            elif c.call("GET", key) != ld.state.get("v"):
                raise WrongValue(f"GET {key}")
        elif n == 6:
            replies = c.pipeline(("MULTI",), ("SET", key + ":tx", i), ("EXEC",))
            bad = [x for x in replies if isinstance(x, ReplyError)]
            if bad or replies[2] is None:
                try:
                    c.pipeline(("DISCARD",))
                except OSError:
                    pass
                raise bad[0] if bad else ReplyError("EXEC aborted")
        else:
            replies = c.pipeline(("SELECT", 1), ("SET", key, i), ("GET", key), ("SELECT", 0))
            for x in replies:
                check(x)
            if replies[2] != str(i).encode():
                raise WrongValue(f"GET {key} in db 1")

    # Bursts of 8 commands 2 ms apart, then silence until the next burst
    # 2.5-3 s later. The lulls are the same for every client (traffic
    # has quiet moments, not one quiet client), so kiln's upstream
    # connections all go idle, and are reaped, together.
    rng, t, starts = random.Random(7), time.time() + 0.5, []
    while len(starts) < 100:
        starts.append(t)
        t += rng.uniform(2.5, 3.0)

    def pause(i, ld):
        if i % 8 != 7:
            return 0.002
        now = time.time()
        return next((b for b in starts if b > now + 0.1), now + 2.75) - now

    conns0 = one(r.port, "INFO", "stats")
    res.kiln, res.direct = Tally(), Tally()
    loaders = (start_loaders(env, res.kiln, lambda: Conn(k.port), step, 3, "kiln", pause=pause)
               + start_loaders(env, res.direct, lambda: Conn(r.port), step, 3, "direct", pause=pause))
    env.stop_load.wait(opts.scale(20, 8))
    stop_loaders(env, loaders)
    conns1 = one(r.port, "INFO", "stats")
    got = lambda info: int(re.search(rb"total_connections_received:(\d+)", info).group(1))
    # Less the direct clients' (3 at start, 1 per reopening) and the INFO's own.
    res.figures["kiln's upstream connections opened during the run"] = (
        got(conns1) - got(conns0) - 1 - 3 - res.direct.reconnects - res.direct.errors)
    res.figures["direct clients' reaped connections reopened"] = res.direct.reconnects
    res.headline = f"{res.kiln.errors} errors via kiln, {res.direct.errors} direct"


def s_restart(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port)
    env.running()
    res.kiln, res.direct = Tally(record=True), Tally(record=True)
    loaders = (start_loaders(env, res.kiln, lambda: Conn(k.port), set_get, 2, "kiln")
               + start_loaders(env, res.direct, lambda: Conn(r.port), set_get, 2, "direct"))
    time.sleep(opts.scale(3, 2))
    try:
        c = Conn(r.port)
        c.sock.sendall(resp("SHUTDOWN", "NOSAVE"))
        try:
            c.read()
        except OSError:
            pass
        c.close()
    except OSError:
        pass
    try:
        r.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        r.proc.kill()
        r.proc.wait(timeout=5)
    t_down = time.time()
    time.sleep(0.3)
    t_up = env.restart(r)
    time.sleep(opts.scale(8, 5))
    stop_loaders(env, loaders)

    def after(tally):
        first_ok = next((t for t, ok in sorted(tally.events) if ok and t >= t_up), None)
        last_err = max((t for t, ok in tally.events if not ok), default=None)
        return first_ok, last_err

    (kf, kl), (df, dl) = after(res.kiln), after(res.direct)
    ms = lambda t: "never" if t is None else f"{(t - t_up) * 1000:.0f} ms"
    res.figures["Redis down (exit to answering PING)"] = f"{(t_up - t_down) * 1000:.0f} ms"
    res.figures["first good SET+GET after Redis answered: kiln / direct"] = f"{ms(kf)} / {ms(df)}"
    res.figures["last error after Redis answered: kiln / direct"] = (
        f"{ms(kl) if kl and kl > t_up else 'before it'} / {ms(dl) if dl and dl > t_up else 'before it'}")
    res.headline = f"first good read {ms(kf)} after Redis answered (direct {ms(df)})"


def s_value_100mb(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port)
    env.running()
    value = os.urandom(MIB) * 100
    res.kiln, res.direct = Tally(), Tally()
    rss, figs = {}, res.figures

    def trial(port, tally, key, measure):
        """SET, GET (byte-equal?), DEL of `value` at `key`, each on a
        connection still open or a new one: what each gave, and times."""
        conn, out, times = [None], {}, {}

        def op(name, *args):
            try:
                if conn[0] is None:
                    conn[0] = Conn(port, timeout=60)
                t0 = time.time()
                got = conn[0].call(*args)
                times[name] = time.time() - t0
                if name == "GET" and got != value:
                    raise WrongValue(f"{len(got or b'')} bytes, not byte-equal")
                out[name] = "ok"
                tally.ok()
            except Exception as e:
                out[name] = err_kind(e)[:70]
                tally.fail(e)
                if not isinstance(e, (ReplyError, WrongValue)) and conn[0] is not None:
                    conn[0].close()
                    conn[0] = None
            if measure:
                time.sleep(1)
                rss[f"after {name}"] = k.rss()

        op("SET", "SET", key, value)
        op("GET", "GET", key)
        op("DEL", "DEL", key)
        if conn[0] is not None:
            conn[0].close()
        return out, times

    # The sidecar is not polled from here to the last idle figure: a
    # request to it is activity that lets the allocator give memory back.
    k.watch.quiet.set()
    time.sleep(0.6)
    kout, kt = trial(k.port, res.kiln, "big:kiln", True)
    dout, dt = trial(r.port, res.direct, "big:direct", False)
    wait = opts.scale(20, 5)
    time.sleep(max(0, wait - 1))
    rss[f"{wait:.0f} s after DEL, idle"] = k.rss()
    http_get(k.metrics, "/metrics/alerts")
    time.sleep(1)
    rss["after one sidecar request (a scrape)"] = k.rss()
    k.watch.quiet.clear()
    ops = lambda o: ", ".join(f"{n} {v}" for n, v in o.items())
    secs = lambda t: " / ".join(f"{t[n]:.2f} s" if n in t else "-" for n in ("SET", "GET"))
    figs["via kiln"] = ops(kout)
    figs["direct"] = ops(dout)
    figs["SET / GET time: kiln"] = secs(kt)
    figs["SET / GET time: direct"] = secs(dt)
    for name, v in rss.items():
        figs[f"kiln RSS {name}"] = "n/a" if v is None else f"{v:.0f} MiB"
    idle, scraped = rss.get(f"{wait:.0f} s after DEL, idle"), rss.get("after one sidecar request (a scrape)")
    ok = all(v == "ok" for v in kout.values())
    res.headline = (f"round trip {'OK' if ok else 'FAILED: GET ' + kout.get('GET', '?')}; RSS {wait:.0f} s after DEL "
                    f"{mib(idle)} MiB idle, {mib(scraped)} MiB after a scrape")


def open_many(port, n, metrics=None):
    """`n` connections each sending PING: how many got +PONG, an error
    reply, were closed, hung (nothing in 2 s) or could not connect; and
    /health (while they are all held) if `metrics`."""
    socks, out = [], collections.Counter()
    first_err = None
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.sendall(PING)
            socks.append(s)
        except OSError:
            out["connect failed"] += 1
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    pending = set(socks)
    deadline = time.time() + 2
    while pending and time.time() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.time())):
            s = key.fileobj
            try:
                data = s.recv(256)
            except OSError:
                data = b""
            if data.startswith(b"+PONG"):
                out["replied"] += 1
            elif data.startswith(b"-"):
                out["refused"] += 1
                first_err = first_err or data.split(b"\r\n")[0].decode(errors="replace")
            else:
                out["closed"] += 1
            sel.unregister(s)
            pending.discard(s)
    out["hung"] += len(pending)
    health = None
    if metrics:
        status, _, took = http_get(metrics, "/health", timeout=2)
        health = f"{'ok' if status == 200 else 'no answer' if status is None else status} in {took * 1000:.0f} ms"
    sel.close()
    for s in socks:
        s.close()
    return out, first_err, health


def s_fd_exhaustion(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port, server="max_clients = 10000", prlimit=256)
    d = env.redis(name="direct", args=("--maxclients", "10000"), prefix=("prlimit", "--nofile=256:256"))
    env.running()
    n = 400
    kout, kerr, health = open_many(k.port, n, k.metrics)
    dout, derr, _ = open_many(d.port, n)
    res.kiln, res.direct = Tally(), Tally()
    for tally, out in ((res.kiln, kout), (res.direct, dout)):
        tally.steps = n
        tally.errors = n - out["replied"]
        for kind in ("refused", "hung", "closed", "connect failed"):
            if out[kind]:
                tally.kinds[kind] = out[kind]
    fmt = lambda o: f"{o['replied']} / {o['refused']} / {o['hung']} / {o['closed'] + o['connect failed']}"
    res.figures["replied / refused / hung / closed: kiln"] = fmt(kout)
    res.figures["replied / refused / hung / closed: direct"] = fmt(dout)
    if kerr:
        res.figures["kiln's refusal"] = kerr
    res.figures["/health while held"] = health
    lowered = [json.loads(x)["fields"] for x in log_stats(k.logfile)["text"] if "reduced_to" in x]
    res.figures["kiln's max_clients at start"] = (f"lowered to {lowered[0]['reduced_to']} (open-files limit "
                                                  f"{lowered[0].get('open_files_limit')})" if lowered else "10000, not lowered")
    time.sleep(0.5)
    try:
        c = Conn(k.port, 2)
        ok = c.call("PING") == "PONG"
        c.close()
    except (OSError, ReplyError) as e:
        ok = f"no ({err_kind(e)[:50]})"
    res.figures["kiln serves a new client afterwards"] = "yes" if ok is True else ok
    res.headline = f"kiln {fmt(kout)} (replied/refused/hung/closed), /health {health}"


def burst(port, n, workers=4):
    """`n` connections opened, PINGed and closed by `workers` threads:
    (Tally, seconds)."""
    tally = Tally()

    def work(count):
        for _ in range(count):
            s = None
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(PING)
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(64)
                    if not chunk:
                        raise ConnectionError("closed before the reply")
                    data += chunk
                if data.startswith(b"+PONG"):
                    tally.ok()
                else:
                    tally.fail(ReplyError(data.split(b"\r\n")[0].decode(errors="replace")[1:]))
            except OSError as e:
                tally.fail(e)
            finally:
                if s is not None:
                    s.close()

    t0 = time.time()
    threads = [threading.Thread(target=work, args=(n // workers,), daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return tally, time.time() - t0


def s_connection_burst(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port)
    env.running()
    n = 20_000 if not opts.quick else 4_000
    rss0, lines0 = k.rss(), log_line_count(k.logfile)
    res.kiln, kt = burst(k.port, n)
    time.sleep(1)
    rss1, lines1 = k.rss(), log_line_count(k.logfile)
    res.direct, dt = burst(r.port, n)
    res.figures["time for the burst: kiln / direct"] = f"{kt:.1f} s / {dt:.1f} s ({n / kt:,.0f} / {n / dt:,.0f} conn/s)"
    res.figures["kiln RSS before / after"] = f"{rss0:.0f} / {rss1:.0f} MiB"
    res.figures["kiln log lines during the burst"] = lines1 - lines0
    res.headline = f"{kt:.1f} s vs {dt:.1f} s direct, RSS {rss0:.0f} -> {rss1:.0f} MiB, {lines1 - lines0} log lines"


def s_cross_protocol(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port, upstream="connections = 1",
                 extra='[[cache.rules]]\nmatch = "by:*"\ncache = false\n')
    env.running()
    admin = Conn(r.port)
    admin.call("SET", "by:key", "v")

    def step(c, i, ld):
        if c.call("GET", "by:key") != b"v":
            raise WrongValue("GET by:key")

    def security_lines():
        try:
            with open(r.logfile, errors="replace") as f:
                return sum("SECURITY ATTACK" in line for line in f)
        except OSError:
            return 0

    def phase(port, label):
        tally = Tally()
        env.stop_load.clear()
        loaders = start_loaders(env, tally, lambda: Conn(port), step, 2, label, interval=0)
        time.sleep(1)
        conns0 = admin.call("INFO", "stats")
        sec0 = security_lines()
        answers = []
        for _ in range(3):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
                got, closed = b"", False
                try:
                    while True:
                        chunk = s.recv(4096)
                        if not chunk:
                            closed = True
                            break
                        got += chunk
                except OSError:
                    pass
                s.close()
                answers.append(f"{len(got)} bytes back, {'closed' if closed else 'left open 2 s'}")
            except OSError as e:
                answers.append(f"connect: {e}")
            time.sleep(1)
        time.sleep(1)
        stop_loaders(env, loaders)
        conns1 = admin.call("INFO", "stats")
        got = lambda info: int(re.search(rb"total_connections_received:(\d+)", info).group(1))
        return tally, answers, got(conns1) - got(conns0), security_lines() - sec0

    res.kiln, kans, kconns, ksec = phase(k.port, "kiln")
    res.direct, dans, dconns, dsec = phase(r.port, "direct")
    res.figures["HTTP sender got: kiln"] = "; ".join(sorted(set(kans)))
    res.figures["HTTP sender got: direct"] = "; ".join(sorted(set(dans)))
    res.figures["Redis 'SECURITY ATTACK' log lines: kiln phase / direct phase"] = f"{ksec} / {dsec}"
    res.figures["Redis connections opened during the attacks: kiln phase / direct phase"] = f"{kconns} / {dconns}"
    res.headline = (f"bystanders {res.kiln.errors} errors via kiln; Redis closed kiln's connection: "
                    f"{'yes' if ksec else 'no'}")


def cluster_nodes(port):
    """[(id, port, role, master id, [(lo, hi), ...])] from CLUSTER NODES."""
    c = Conn(port, 2)
    try:
        text = c.call("CLUSTER", "NODES").decode()
    finally:
        c.close()
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 8:
            continue
        ranges = []
        for s in f[8:]:
            if s.startswith("["):
                continue
            lo, _, hi = s.partition("-")
            ranges.append((int(lo), int(hi or lo)))
        role = "master" if "master" in f[2] else "slave"
        out.append((f[0], int(f[1].split("@")[0].rsplit(":", 1)[1]), role, f[3], ranges))
    return out


def role_of(port):
    try:
        c = Conn(port, 1)
        try:
            return c.call("ROLE")[0].decode()
        finally:
            c.close()
    except (OSError, ReplyError, IndexError, AttributeError):
        return None


def cluster_step(c, i, ld):
    key = f"cl:{ld.name}:{i % 200}"
    c.call("SET", key, i)
    if c.call("GET", key) != str(i).encode():
        raise WrongValue(f"GET {key}")


def start_cluster_load(env, res, k, ports, step, stale_key):
    """Two loaders through kiln `k` and two cluster-aware ones direct to
    `ports`, each running `step`, and a StaleChecker on `stale_key`:
    (loaders, checker), both started."""
    env.running()
    res.kiln, res.direct = Tally(), Tally()
    loaders = (start_loaders(env, res.kiln, lambda: Conn(k.port), step, 2, "kiln")
               + start_loaders(env, res.direct, lambda: ClusterClient(ports), step, 2, "direct"))
    stale = StaleChecker(env, lambda: ClusterClient(ports), lambda: Conn(k.port), stale_key)
    stale.start()
    env.threads.append(stale)
    return loaders, stale


def s_cluster_failover(env, res, opts):
    ports = env.cluster()
    k = env.kiln(cluster=ports)
    key = "stale:fo"
    slot = key_slot(key.encode())
    nodes = cluster_nodes(ports[0])
    primary = next(n for n in nodes if n[2] == "master" and any(lo <= slot <= hi for lo, hi in n[4]))
    replica = next(n for n in nodes if n[2] == "slave" and n[3] == primary[0])
    loaders, stale = start_cluster_load(env, res, k, ports, cluster_step, key)
    total = opts.scale(22, 14)
    t_start = time.time()
    time.sleep(opts.scale(4, 3))
    t_fo = time.time()
    c = Conn(replica[1], 5)
    try:
        reply = c.call("CLUSTER", "FAILOVER")
    except ReplyError as e:
        reply = f"-{e}"
    c.close()
    done = None
    while time.time() - t_fo < 15:
        if role_of(replica[1]) == "master":
            done = time.time()
            break
        time.sleep(0.02)
    time.sleep(max(0, total - (time.time() - t_start)))
    stop_loaders(env, loaders + [stale])
    res.figures["CLUSTER FAILOVER"] = (f"{reply}, replica primary after "
                                       f"{'never' if done is None else f'{(done - t_fo) * 1000:.0f} ms'}")
    res.figures.update(stale.summary(t_fo))
    res.headline = (f"longest direct-write-to-kiln window after failover "
                    f"{res.figures['longest write-to-kiln window after']}")


def s_cluster_reshard(env, res, opts):
    ports = env.cluster()
    k = env.kiln(cluster=ports)
    nodes = cluster_nodes(ports[0])
    masters = [n for n in nodes if n[2] == "master"]
    src = next(n for n in masters if any(lo == 0 for lo, _ in n[4]))
    dst = next(n for n in masters if n is not src)
    lo = min(a for a, _ in src[4])
    moving = range(lo, lo + 100)
    tags = [t for t in range(60_000) if lo <= key_slot(b"%d" % t) < lo + 120][:150]
    writer = ClusterClient(ports)
    for t in tags:
        for j in range(2):
            for side in ("kiln", "direct"):
                writer.call("SET", f"rs:{{{t}}}:{side}{j}", "0")
    # 200 filler keys of 1 KiB per tag, so the migration takes a while.
    src_conn = Conn(src[1], 30)
    for t in tags:
        src_conn.call("MSET", *[x for f in range(200) for x in (f"rs:{{{t}}}:f{f}", b"z" * 1024)])
    src_conn.close()
    writer.close()
    stale_key = f"rs:{{{tags[0]}}}:stale"

    def step(c, i, ld):
        key = f"rs:{{{tags[i % len(tags)]}}}:{ld.name}"
        c.call("SET", key, i)
        if c.call("GET", key) != str(i).encode():
            raise WrongValue(f"GET {key}")

    loaders, stale = start_cluster_load(env, res, k, ports, step, stale_key)
    time.sleep(3)
    t0 = time.time()
    try:
        p = subprocess.run(["redis-cli", "--cluster", "reshard", f"127.0.0.1:{src[1]}",
                            "--cluster-from", src[0], "--cluster-to", dst[0], "--cluster-slots", "100",
                            "--cluster-yes"], capture_output=True, text=True, timeout=120)
        rc = p.returncode
        if rc:
            res.notes.append("redis-cli reshard: " + (p.stderr or p.stdout).strip().splitlines()[-1][:200])
    except subprocess.TimeoutExpired:
        rc = "timed out after 120 s"
    took = time.time() - t0
    time.sleep(3)
    stop_loaders(env, loaders + [stale])
    after = {n[0]: n[4] for n in cluster_nodes(ports[0])}
    moved = [s for s in moving if any(a <= s <= b for a, b in after.get(dst[0], []))]
    keys_moved = sum(1 for t in tags if key_slot(b"%d" % t) in moved)
    res.figures["reshard"] = f"exit {rc}, {took:.1f} s, {len(moved)} of slots {lo}-{lo + 99} now on the target"
    res.figures["tags (4 loader keys + 1 each) in moved slots"] = f"{keys_moved} of {len(tags)}"
    res.figures.update(stale.summary(t0))
    res.headline = (f"reshard {took:.1f} s; longest write-to-kiln window during/after "
                    f"{res.figures['longest write-to-kiln window after']}")


def s_sentinel_failover(env, res, opts):
    p = env.redis(name="primary")
    rep = env.redis(name="replica", args=("--replicaof", "127.0.0.1", str(p.port)))
    deadline = time.time() + 15
    while b"master_link_status:up" not in one(rep.port, "INFO", "replication"):
        if time.time() > deadline:
            raise SetupError("replica never linked")
        time.sleep(0.1)
    sentinels = [env.sentinel(p.port) for _ in range(3)]
    deadline = time.time() + 30
    while True:
        try:
            ok = all(len(one(s, "SENTINEL", "REPLICAS", "mymaster")) >= 1
                     and len(one(s, "SENTINEL", "SENTINELS", "mymaster")) >= 2 for s in sentinels)
        except (OSError, ReplyError):
            ok = False
        if ok:
            break
        if time.time() > deadline:
            raise SetupError("sentinels did not find the replica and each other within 30 s")
        time.sleep(0.2)
    k = env.kiln(sentinel=sentinels)
    env.running()

    def step(c, i, ld):
        key = f"ctr:{ld.name}"
        c.call("INCR", key)
        ld.state["acked"] = ld.state.get("acked", 0) + 1
        c.call("GET", key)

    res.kiln, res.direct = Tally(), Tally()
    kl = start_loaders(env, res.kiln, lambda: Conn(k.port), step, 2, "kiln")
    dl = start_loaders(env, res.direct, lambda: SentinelClient(sentinels), step, 2, "direct")
    time.sleep(opts.scale(3, 2))
    t_fo = time.time()
    c = Conn(sentinels[0], 5)
    try:
        reply = c.call("SENTINEL", "FAILOVER", "mymaster")
    except ReplyError as e:
        reply = f"-{e}"
    c.close()
    done = None
    while time.time() - t_fo < 20:
        try:
            c = Conn(sentinels[0], 1)
            addr = c.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster")
            c.close()
            if addr and int(addr[1]) == rep.port and role_of(rep.port) == "master":
                done = time.time()
                break
        except (OSError, ReplyError):
            pass
        time.sleep(0.02)
    demoted = None
    while done and time.time() - t_fo < 30:
        if role_of(p.port) == "slave":
            demoted = time.time()
            break
        time.sleep(0.05)
    time.sleep(opts.scale(5, 3))
    stop_loaders(env, kl + dl)
    final = rep.port if done else p.port

    def lost(loaders):
        n = 0
        for ld in loaders:
            v = one(final, "GET", f"ctr:{ld.name}")
            n += max(0, ld.state.get("acked", 0) - int(v or 0))
        return n

    res.figures["SENTINEL FAILOVER"] = (f"{reply}, replica primary and named by Sentinel after "
                                        f"{'never' if done is None else f'{(done - t_fo) * 1000:.0f} ms'}")
    res.figures["old primary demoted by Sentinel after"] = ("never (30 s)" if demoted is None
                                                           else f"{(demoted - t_fo) * 1000:.0f} ms")
    res.figures["acknowledged INCRs lost: kiln / direct"] = f"{lost(kl)} / {lost(dl)}"
    res.headline = f"{res.kiln.errors} errors via kiln, {res.direct.errors} direct (Sentinel-following)"


def status_fields(port):
    """config_hash and l1_capacity_bytes from CACHE.STATUS."""
    flat = one(port, "CACHE.STATUS")
    out = {}
    for i, v in enumerate(flat[:-1]):
        if v in (b"config_hash", b"l1_capacity_bytes"):
            out[v.decode()] = flat[i + 1]
    return out


def s_bad_reload(env, res, opts):
    r = env.redis()
    k = env.kiln(upstream_port=r.port)
    env.running()
    res.kiln, res.direct = Tally(), Tally()
    loaders = (start_loaders(env, res.kiln, lambda: Conn(k.port), set_get, 2, "kiln")
               + start_loaders(env, res.direct, lambda: Conn(r.port), set_get, 2, "direct"))
    time.sleep(2)
    before = status_fields(k.port)
    line0 = log_line_count(k.logfile)
    bad = k.conf_text.replace('max_memory = "512MiB"', 'max_memory = "lots"')
    assert bad != k.conf_text
    with open(k.conf, "w") as f:
        f.write(bad)
    os.kill(k.proc.pid, signal.SIGHUP)
    time.sleep(opts.scale(3, 2))
    alive = k.proc.poll() is None
    try:
        after = status_fields(k.port)
        serving = "yes"
        same = all(before.get(f) == after.get(f) for f in ("config_hash", "l1_capacity_bytes"))
        res.figures["CACHE.STATUS config_hash, l1_capacity_bytes unchanged"] = (
            "yes" if same else f"no: {before} -> {after}")
    except (OSError, ReplyError) as e:
        serving = f"no ({err_kind(e)[:60]})"
    bad_lines = log_stats(k.logfile, line0)["text"]
    line1 = log_line_count(k.logfile)
    good = k.conf_text.replace('ttl = "5m"', 'ttl = "4m"') if 'ttl = "5m"' in k.conf_text else \
        k.conf_text.replace("[cache]\n", '[cache]\nttl = "4m"\n', 1)
    with open(k.conf, "w") as f:
        f.write(good)
    if alive:
        os.kill(k.proc.pid, signal.SIGHUP)
    time.sleep(2)
    good_lines = log_stats(k.logfile, line1)["text"]
    time.sleep(opts.scale(3, 1))
    stop_loaders(env, loaders)
    res.figures["kiln alive / serving after the bad SIGHUP"] = f"{'yes' if alive else 'no'} / {serving}"
    res.figures["log after the bad SIGHUP"] = " // ".join(short_line(x) for x in bad_lines) or "(nothing)"
    res.figures["log after a good SIGHUP (cache.ttl 4m)"] = " // ".join(short_line(x, 160) for x in good_lines) or "(nothing)"
    res.headline = f"kept serving: {serving}; {res.kiln.errors} errors via kiln"


def s_mixed(env, res, opts):
    r = env.redis()
    compare.fill(r.port)
    compare.fill_hashes(r.port)
    k = env.kiln(upstream_port=r.port)
    env.running()

    def step(c, i, ld):
        rnd = ld.rng.random()
        if i % 500 == 499:
            big = ld.state.setdefault("big", os.urandom(MIB))
            key = f"big:{ld.name}"
            c.call("SET", key, big)
            if c.call("GET", key) != big:
                raise WrongValue(f"GET {key} (1 MB)")
            return
        key = lambda: b"key:%012d" % (ld.rng.randrange(2000) if ld.rng.random() < 0.8 else ld.rng.randrange(100_000))
        if rnd < 0.55:
            c.call("GET", key())
        elif rnd < 0.65:
            c.call("MGET", *[key() for _ in range(10)])
        elif rnd < 0.75:
            c.call("HGETALL", b"h:%012d" % ld.rng.randrange(10_000))
        elif rnd < 0.92:
            c.call("SET", key(), b"y" * 100)
        else:
            c.call("DEL", key())

    res.kiln, res.direct = Tally(), Tally()
    loaders = (start_loaders(env, res.kiln, lambda: Conn(k.port), step, 3, "kiln", interval=0)
               + start_loaders(env, res.direct, lambda: Conn(r.port), step, 3, "direct", interval=0))
    samples = [k.rss()]
    minutes = opts.minutes
    for _ in range(minutes):
        env.stop_load.wait(60)
        samples.append(k.rss())
    stop_loaders(env, loaders)
    res.figures["kiln RSS each minute (MiB)"] = ", ".join("-" if s is None else f"{s:.0f}" for s in samples)
    res.figures["steps per second: kiln / direct"] = (f"{res.kiln.steps / (60 * minutes):,.0f} / "
                                                      f"{res.direct.steps / (60 * minutes):,.0f}")
    res.headline = f"{minutes} min: {res.kiln.cell()} errors via kiln; RSS " + " -> ".join(
        f"{s:.0f}" for s in samples if s is not None)


SCENARIOS = [
    ("idle-reaping", s_idle_reaping),
    ("restart-0.3s", s_restart),
    ("value-100MB", s_value_100mb),
    ("fd-exhaustion", s_fd_exhaustion),
    ("connection-burst", s_connection_burst),
    ("cross-protocol", s_cross_protocol),
    ("cluster-failover", s_cluster_failover),
    ("cluster-reshard", s_cluster_reshard),
    ("sentinel-failover", s_sentinel_failover),
    ("bad-reload", s_bad_reload),
    ("mixed-traffic", s_mixed),
]


def run_scenario(binary, name, fn, opts):
    res = Result(name)
    env = Env(binary, name, opts.keep)
    t0 = time.time()
    try:
        fn(env, res, opts)
    except Exception as e:
        what = "setup failed" if env.phase == "setup" else "failed"
        res.status = f"{what}: {type(e).__name__}: {e}"[:200]
        print(f"  {name}: {res.status}", file=sys.stderr)
        traceback.print_exc()
    finally:
        try:
            env.collect(res)
        except Exception as e:
            res.notes.append(f"collecting kiln's figures failed: {e}")
        env.close()
        if opts.keep:
            print(f"  {name}: files kept in {env.tmp}", file=sys.stderr)
    res.seconds = time.time() - t0
    return res


def mib(v):
    return "n/a" if v is None else f"{v:.0f}"


def alerts_cell(res):
    if not res.alerts_fired:
        return "none"
    return ", ".join(f"{n}{' x%d' % c if c > 1 else ''} ({res.alerts_ended.get(n, 0)} ended)"
                     for n, c in sorted(res.alerts_fired.items()))


def errors_cell(res):
    k = res.kiln.cell() if res.kiln else "n/a"
    d = res.direct.cell() if res.direct else "n/a"
    return f"{k} / {d}"


def figures_cell(res):
    parts = [f"{k}: {v}" for k, v in res.figures.items()]
    if res.status != "ok":
        parts.insert(0, f"**{res.status}**")
    return "; ".join(str(p).replace("|", "/") for p in parts)


def table(results):
    rows = []
    for res in results:
        log = res.log or {"lines": 0, "warn": 0, "error": 0}
        rows.append([res.name if res.status == "ok" else f"{res.name} ({res.status.split(':')[0]})",
                     errors_cell(res), f"{mib(res.rss_peak)} / {mib(res.rss_end)}", alerts_cell(res),
                     f"{log['lines']} ({log['warn']} / {log['error']})", f"{res.seconds:.0f} s",
                     figures_cell(res)])
    return md_table(["scenario", "client errors: via kiln / direct", "kiln RSS peak / end MiB",
                     "alerts fired (ended)", "kiln log lines (warn / error)", "took", "figures"], rows)


def error_kinds(results, label):
    lines = []
    for res in results:
        for side, tally in (("kiln", res.kiln), ("direct", res.direct)):
            if tally and tally.kinds:
                kinds = "; ".join(f"{n} x `{k}`" for k, n in tally.kinds.most_common(4))
                lines.append(f"- {label} {res.name}, {side}: {kinds}")
        for note in res.notes:
            lines.append(f"- {label} {res.name}: {note}")
    return lines


def commit_of(binary):
    """The short commit of the git checkout `binary` was built in, if it is
    in one (target/release/kiln of a worktree), with '+dirty' if so."""
    d = os.path.dirname(os.path.abspath(binary))
    try:
        top = subprocess.run(["git", "-C", d, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if top.returncode:
            return "unknown"
        dirty = subprocess.run(["git", "-C", d, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return top.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Opts:
    def __init__(self, args):
        self.quick, self.minutes, self.keep = args.quick, args.minutes, args.keep
        if self.quick and args.minutes_given is None:
            self.minutes = 1

    def scale(self, full, quick):
        return quick if self.quick else full


def selected(only):
    names = [n for n, _ in SCENARIOS]
    if not only:
        return SCENARIOS
    want = [w.strip() for w in only.split(",") if w.strip()]
    bad = [w for w in want if w not in names]
    if bad:
        sys.exit(f"unknown scenario(s) {', '.join(bad)}; known: {', '.join(names)}")
    return [(n, f) for n, f in SCENARIOS if n in want]


MACHINE = ("Loopback on a 2-core machine shared with another engineer's cargo builds, the Python "
           "clients, kiln and every redis-server on the same cores: times and counts under load are noisy "
           "(compare before and after within a row, and expect a few ms to a few hundred ms of jitter).")


def interrupted(*_):
    raise KeyboardInterrupt("SIGTERM")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", help="run the trial for this binary and print its table")
    ap.add_argument("--label", default=None, help="name of that binary in the output")
    ap.add_argument("--before", help="binary before (with --after: writes bench/results/ops.md)")
    ap.add_argument("--after", help="binary after")
    ap.add_argument("--before-commit", default=None)
    ap.add_argument("--after-commit", default=None)
    ap.add_argument("--minutes", type=int, default=None, help="mixed-traffic minutes (default 10, 1 with --quick)")
    ap.add_argument("--only", default="", help="comma-separated scenarios: " + ", ".join(n for n, _ in SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="shorter everything, for a try-out")
    ap.add_argument("--keep", action="store_true", help="keep each scenario's directory (logs, configs)")
    args = ap.parse_args()
    args.minutes_given = args.minutes
    if args.minutes is None:
        args.minutes = 10
    if bool(args.before) != bool(args.after) or bool(args.kiln) == bool(args.before):
        ap.error("give --kiln PATH, or --before PATH and --after PATH")
    for tool in ("redis-server", "redis-cli", "prlimit"):
        if not subprocess.run(["which", tool], capture_output=True).returncode == 0:
            sys.exit(f"{tool} is missing: apt-get install -y redis-server redis-tools util-linux")
    opts = Opts(args)
    scenarios = selected(args.only)

    # SIGTERM ends the run as Ctrl-C does: every scenario's finally stops its processes.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass

    t_start = time.time()
    if args.kiln:
        label = args.label or os.path.basename(args.kiln)
        binaries = [(label, os.path.abspath(args.kiln))]
    else:
        binaries = [("before", os.path.abspath(args.before)), ("after", os.path.abspath(args.after))]
    for _, b in binaries:
        if not os.access(b, os.X_OK):
            sys.exit(f"not an executable: {b}")
    results = {label: [] for label, _ in binaries}
    for name, fn in scenarios:
        for label, binary in binaries:
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {name} ...", file=sys.stderr, flush=True)
            res = run_scenario(binary, name, fn, opts)
            results[label].append(res)
            print(f"[{time.strftime('%H:%M:%S')}] {label}: {name}: {res.status}, {res.seconds:.0f} s; "
                  f"errors {errors_cell(res)}; {res.headline}", file=sys.stderr, flush=True)
    took = time.time() - t_start

    if args.kiln:
        label = binaries[0][0]
        print(f"# kiln operations trial: {label} ({commit_of(args.kiln)})\n\n{stamp()}; "
              f"{'quick; ' if opts.quick else ''}mixed traffic {opts.minutes} min; run took {took / 60:.1f} min. "
              f"{MACHINE}\n")
        print("\n".join(table(results[label])))
        kinds = error_kinds(results[label], label)
        if kinds:
            print("\nError kinds (most common first):\n\n" + "\n".join(kinds))
        return

    bc = args.before_commit or commit_of(args.before)
    ac = args.after_commit or commit_of(args.after)
    head = []
    for b, a in zip(results["before"], results["after"]):
        head.append([b.name, b.kiln.cell() if b.kiln else b.status, a.kiln.cell() if a.kiln else a.status,
                     f"{b.direct.cell() if b.direct else 'n/a'} / {a.direct.cell() if a.direct else 'n/a'}",
                     (b.headline or b.status).replace("|", "/"), (a.headline or a.status).replace("|", "/")])
    text = [
        "# kiln operations trial: before and after the production-hardening fixes",
        "",
        f"{stamp()}. before = `{bc}`, after = `{ac}`. "
        f"{'Quick run; ' if opts.quick else ''}mixed traffic {opts.minutes} min; the whole run took "
        f"{took / 60:.1f} min (each scenario for before, then for after).",
        "",
        MACHINE + " kiln: one worker thread, JSON logs at info, alerts.window 10s, otherwise "
        "compare.kiln_config (no start-up warmup, no hot keys). Errors are failed client steps "
        "(a step is one command or a SET then its GET): error replies, wrong values, timeouts (2 s) "
        "and lost connections. Direct clients reopen a pooled connection Redis closed while idle, "
        "follow MOVED/ASK (cluster) and ask Sentinel again after an error (only then, as redis-py's "
        "Sentinel pool does: see the lost INCRs of sentinel-failover). Alerts: the cache-rate ones (hit, "
        "miss, penetration) are kept quiet (alerts.min_requests = 10^9), since these loads read what "
        "they just wrote; the rest (circuit_open, tracking_lost, tracking_table_small, warmup_*) as "
        "shipped, seen on /metrics/alerts (polled every 0.5 s) or in kiln's log. RSS peak is VmHWM.",
        "",
        f"Reproduce: `python3 bench/ops.py --before BEFORE/kiln --after AFTER/kiln --minutes {opts.minutes}` "
        "(one binary: `--kiln PATH`; `--only NAME,...`; `--quick`). What each scenario does: the docstring "
        "of bench/ops.py.",
        "",
        "## Headline",
        "",
        *md_table(["scenario", "errors via kiln: before", "errors via kiln: after",
                   "errors direct: before run / after run", "before", "after"], head),
        "",
        f"## before ({bc})",
        "",
        *table(results["before"]),
        "",
        f"## after ({ac})",
        "",
        *table(results["after"]),
        "",
        "## Error kinds (most common first)",
        "",
        *(error_kinds(results["before"], "before") + error_kinds(results["after"], "after") or ["none"]),
        "",
    ]
    write_result("ops.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
