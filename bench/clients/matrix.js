// One client library's run of the matrix steps (see matrix.py) against
// a Redis endpoint: `node matrix.js <ioredis5|ioredis6|redis5|redis6> <port> <prefix>`.
// Prints one line per step: "<step> ok" or "<step> FAIL <why>".
const [lib, port, prefix] = process.argv.slice(2);
const T = (n) => `${prefix}:{${n}}`;

async function client() {
  if (lib.startsWith("ioredis")) {
    const Redis = require(lib);
    const mk = () => new Redis({ port: +port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0 });
    const c = mk();
    await c.connect();
    return {
      call: (...a) => c.call(...a),
      pipeline: async (cmds) => {
        const p = c.pipeline();
        for (const x of cmds) p.call(...x);
        return (await p.exec()).map(([e, v]) => { if (e) throw e; return v; });
      },
      multi: async (cmds) => {
        const p = c.multi();
        for (const x of cmds) p.call(...x);
        return (await p.exec()).map(([e, v]) => { if (e) throw e; return v; });
      },
      subscriber: async (ch, onMsg) => {
        const s = mk();
        await s.connect();
        s.on("message", (c2, m) => onMsg(c2, m));
        await s.subscribe(ch);
        return () => s.disconnect();
      },
      select: (db) => c.select(db),
      close: () => c.disconnect(),
    };
  }
  const { createClient } = require(lib);
  const c = createClient({ url: `redis://127.0.0.1:${port}`, socket: { reconnectStrategy: false } });
  c.on("error", () => {});
  await c.connect();
  return {
    call: (...a) => c.sendCommand(a.map(String)),
    pipeline: async (cmds) => {
      const p = c.multi();
      for (const x of cmds) p.addCommand(x.map(String));
      return p.execAsPipeline();
    },
    multi: async (cmds) => {
      const p = c.multi();
      for (const x of cmds) p.addCommand(x.map(String));
      return p.exec();
    },
    subscriber: async (ch, onMsg) => {
      const s = c.duplicate();
      s.on("error", () => {});
      await s.connect();
      await s.subscribe(ch, (m, c2) => onMsg(c2, m));
      return () => s.destroy ? s.destroy() : s.disconnect();
    },
    select: (db) => c.select(db),
    close: () => (c.destroy ? c.destroy() : c.disconnect()),
  };
}

const eq = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const str = (v) => (Buffer.isBuffer(v) ? v.toString() : v);

const steps = [
  ["ping", async (c) => { const r = await c.call("PING"); if (r !== "PONG") throw `PING: ${r}`; }],
  ["set_get", async (c) => {
    await c.call("SET", T("a"), "v1");
    const r = str(await c.call("GET", T("a")));
    if (r !== "v1") throw `GET: ${r}`;
  }],
  ["incr", async (c) => {
    await c.call("DEL", T("n"));
    const r = await c.call("INCRBY", T("n"), "5");
    if (Number(r) !== 5) throw `INCRBY: ${r}`;
  }],
  ["mset_mget_across_slots", async (c) => {
    await c.call("MSET", T("x"), "1", T("y"), "2", T("z"), "3");
    const r = (await c.call("MGET", T("x"), T("y"), T("z"), T("none"))).map(str);
    if (!eq(r, ["1", "2", "3", null])) throw `MGET: ${JSON.stringify(r)}`;
  }],
  ["hash", async (c) => {
    await c.call("DEL", T("h"));
    await c.call("HSET", T("h"), "f1", "a", "f2", "b");
    const r = (await c.call("HMGET", T("h"), "f1", "f2")).map(str);
    if (!eq(r, ["a", "b"])) throw `HMGET: ${JSON.stringify(r)}`;
  }],
  ["list", async (c) => {
    await c.call("DEL", T("l"));
    await c.call("RPUSH", T("l"), "a", "b", "c");
    const r = (await c.call("LRANGE", T("l"), "0", "-1")).map(str);
    if (!eq(r, ["a", "b", "c"])) throw `LRANGE: ${JSON.stringify(r)}`;
  }],
  ["expire_ttl", async (c) => {
    await c.call("SET", T("e"), "v", "EX", "100");
    const r = Number(await c.call("TTL", T("e")));
    if (!(r > 90 && r <= 100)) throw `TTL: ${r}`;
  }],
  ["pipeline", async (c) => {
    await c.call("DEL", T("p"));
    const r = await c.pipeline(Array.from({ length: 10 }, () => ["INCR", T("p")]));
    if (!eq(r.map(Number), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])) throw `pipeline: ${JSON.stringify(r)}`;
  }],
  ["transaction", async (c) => {
    const k = `${prefix}:{tx}`;
    const r = await c.multi([["SET", k, "1"], ["INCR", k], ["GET", k]]);
    if (str(r[2]) !== "2") throw `EXEC: ${JSON.stringify(r)}`;
  }],
  ["eval", async (c) => {
    await c.call("SET", T("s"), "sv");
    const r = str(await c.call("EVAL", "return redis.call('GET', KEYS[1])", "1", T("s")));
    if (r !== "sv") throw `EVAL: ${r}`;
  }],
  ["scan", async (c) => {
    const seen = new Set();
    let cur = "0";
    do {
      const [next, keys] = await c.call("SCAN", cur, "MATCH", `${prefix}:*`, "COUNT", "100");
      keys.map(str).forEach((k) => seen.add(k));
      cur = str(next);
    } while (cur !== "0");
    for (const k of [T("a"), T("x"), T("y"), T("z"), T("h")]) if (!seen.has(k)) throw `SCAN missed ${k}`;
  }],
  ["pubsub", async (c) => {
    const ch = `${prefix}:news`;
    let got = null;
    const stop = await c.subscriber(ch, (chan, msg) => { got = [str(chan), str(msg)]; });
    const n = Number(await c.call("PUBLISH", ch, "hello"));
    for (let i = 0; i < 100 && !got; i++) await new Promise((r) => setTimeout(r, 20));
    await stop();
    if (n !== 1) throw `PUBLISH counted ${n}`;
    if (!eq(got, [ch, "hello"])) throw `message: ${JSON.stringify(got)}`;
  }],
  ["del", async (c) => {
    const r = Number(await c.call("DEL", T("a"), T("x"), T("y"), T("z"), T("nope")));
    if (r !== 4) throw `DEL: ${r}`;
  }],
  ["select_db", async (c) => { await c.select(1); await c.select(0); }],
];

(async () => {
  let c;
  try {
    c = await client();
  } catch (e) {
    console.log(`connect FAIL ${e}`);
    process.exit(0);
  }
  for (const [name, f] of steps) {
    try {
      await Promise.race([f(c), new Promise((_, rej) => setTimeout(() => rej("timeout 5s"), 5000))]);
      console.log(`${name} ok`);
    } catch (e) {
      console.log(`${name} FAIL ${String(e && e.message ? e.message : e).replace(/\n/g, " ")}`);
    }
  }
  await c.close();
  process.exit(0);
})();
