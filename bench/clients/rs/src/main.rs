//! redis-rs's run of the matrix steps (see `../matrix.py`):
//! `matrix-rs <port> <prefix>`, one line per step, "<step> ok" or
//! "<step> FAIL <why>".

use redis::{Commands, RedisResult};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (port, prefix) = (&args[1], args[2].clone());
    let t = |n: &str| format!("{prefix}:{{{n}}}");
    let client = match redis::Client::open(format!("redis://127.0.0.1:{port}/")) {
        Ok(c) => c,
        Err(e) => return println!("connect FAIL {e}"),
    };
    let mut c = match client.get_connection() {
        Ok(c) => c,
        Err(e) => return println!("connect FAIL {e}"),
    };
    let mut step = |name: &str, f: &mut dyn FnMut(&mut redis::Connection) -> RedisResult<Result<(), String>>| {
        match f(&mut c) {
            Ok(Ok(())) => println!("{name} ok"),
            Ok(Err(why)) => println!("{name} FAIL {why}"),
            Err(e) => println!("{name} FAIL {e}"),
        }
    };
    let want = |ok: bool, why: String| if ok { Ok(()) } else { Err(why) };
    step("ping", &mut |c| {
        let r: String = redis::cmd("PING").query(c)?;
        Ok(want(r == "PONG", r))
    });
    step("set_get", &mut |c| {
        let _: () = c.set(t("a"), "v1")?;
        let r: String = c.get(t("a"))?;
        Ok(want(r == "v1", r))
    });
    step("incr", &mut |c| {
        let _: () = c.del(t("n"))?;
        let r: i64 = c.incr(t("n"), 5)?;
        Ok(want(r == 5, r.to_string()))
    });
    step("mset_mget_across_slots", &mut |c| {
        let _: () = c.mset(&[(t("x"), "1"), (t("y"), "2"), (t("z"), "3")])?;
        let r: Vec<Option<String>> = c.mget(&[t("x"), t("y"), t("z"), t("none")])?;
        let w = vec![Some("1".into()), Some("2".into()), Some("3".into()), None];
        Ok(want(r == w, format!("{r:?}")))
    });
    step("hash", &mut |c| {
        let _: () = c.del(t("h"))?;
        let _: () = c.hset_multiple(t("h"), &[("f1", "a"), ("f2", "b")])?;
        let r: Vec<String> = redis::cmd("HMGET").arg(t("h")).arg("f1").arg("f2").query(c)?;
        Ok(want(r == ["a", "b"], format!("{r:?}")))
    });
    step("list", &mut |c| {
        let _: () = c.del(t("l"))?;
        let _: () = c.rpush(t("l"), &["a", "b", "c"])?;
        let r: Vec<String> = c.lrange(t("l"), 0, -1)?;
        Ok(want(r == ["a", "b", "c"], format!("{r:?}")))
    });
    step("expire_ttl", &mut |c| {
        let _: () = c.set_ex(t("e"), "v", 100)?;
        let r: i64 = c.ttl(t("e"))?;
        Ok(want(r > 90 && r <= 100, r.to_string()))
    });
    step("pipeline", &mut |c| {
        let _: () = c.del(t("p"))?;
        let mut p = redis::pipe();
        for _ in 0..10 {
            p.incr(t("p"), 1);
        }
        let r: Vec<i64> = p.query(c)?;
        Ok(want(r == (1..=10).collect::<Vec<_>>(), format!("{r:?}")))
    });
    step("transaction", &mut |c| {
        let k = format!("{prefix}:{{tx}}");
        let (_, _, r): ((), i64, String) = redis::pipe()
            .atomic()
            .set(&k, "1")
            .incr(&k, 1)
            .get(&k)
            .query(c)?;
        Ok(want(r == "2", r))
    });
    step("eval", &mut |c| {
        let _: () = c.set(t("s"), "sv")?;
        let r: String = redis::Script::new("return redis.call('GET', KEYS[1])")
            .key(t("s"))
            .invoke(c)?;
        Ok(want(r == "sv", r))
    });
    step("scan", &mut |c| {
        let seen: std::collections::HashSet<String> = c
            .scan_match::<_, String>(format!("{prefix}:*"))?
            .collect::<RedisResult<_>>()?;
        let missed: Vec<String> = ["a", "x", "y", "z", "h"]
            .iter()
            .map(|n| t(n))
            .filter(|k| !seen.contains(k))
            .collect();
        Ok(want(missed.is_empty(), format!("missed {missed:?}")))
    });
    let ch = format!("{prefix}:news");
    let sub_client = client.clone();
    step("pubsub", &mut |c| {
        let mut s = sub_client.get_connection()?;
        let mut ps = s.as_pubsub();
        ps.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        ps.subscribe(&ch)?;
        let n: i64 = c.publish(&ch, "hello")?;
        let m = ps.get_message()?;
        let payload: String = m.get_payload()?;
        Ok(want(
            n == 1 && m.get_channel_name() == ch && payload == "hello",
            format!("PUBLISH counted {n}, message {payload:?}"),
        ))
    });
    step("del", &mut |c| {
        let r: i64 = c.del(&[t("a"), t("x"), t("y"), t("z"), t("nope")])?;
        Ok(want(r == 4, r.to_string()))
    });
    step("select_db", &mut |_| {
        let mut d = redis::Client::open(format!("redis://127.0.0.1:{port}/1"))?.get_connection()?;
        let r: String = redis::cmd("PING").query(&mut d)?;
        Ok(want(r == "PONG", r))
    });
}
