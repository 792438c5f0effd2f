//! A busy upstream: a script (or function) past Redis's
//! `busy-reply-threshold` (`lua-time-limit`). A direct client then gets
//! `-BUSY ...` for every command without Redis's `allow_busy` flag; through
//! kiln it must get the same, byte for byte, including for what kiln would
//! otherwise answer itself (PING, ECHO, SELECT, CLIENT ID, an L1 hit), and
//! `SCRIPT KILL` must reach upstream at once. Redis's own suite sends `PING`
//! and asserts `-BUSY` before it kills its runaway script: answered `+PONG`,
//! the script ran forever and every later client of that Redis got `-BUSY`.

use std::time::Duration;

use crate::util::*;

/// Sends `run` (a script or function that never ends) on a kiln client of
/// its own, and waits (bounded) until Redis refuses a direct client's PING
/// for it. The threshold, 200 ms, is above the 50 ms after which kiln takes
/// a connection with no reply for a possibly busy upstream (looked at by
/// each thread at most every 20 ms; Redis's default is 5 s; see README).
async fn runaway(kiln: &Kiln, direct: &mut Conn, run: &[&str]) -> Conn {
    assert_eq!(
        direct
            .cmd(&["CONFIG", "SET", "lua-time-limit", "200"])
            .await,
        "+OK\r\n"[..]
    );
    let mut runner = kiln.conn().await;
    runner.send(run).await;
    busy_reached(direct).await;
    runner
}

/// Waits (bounded) until Redis refuses a direct client's PING.
async fn busy_reached(direct: &mut Conn) {
    poll_until(Duration::from_millis(10), async || {
        match direct.cmd(&["PING"]).await {
            r if r.starts_with(b"-BUSY ") => Ok(()),
            r => Err(format!("upstream is not busy yet: {r:?}")),
        }
    })
    .await;
}

/// While the script runs, an L1 hit (first, before kiln has seen any
/// `-BUSY`), then PING, ECHO, SELECT, CLIENT ID and CLIENT GETNAME through
/// kiln get what a direct client gets: the same `-BUSY` line. `SCRIPT KILL`
/// through kiln ends it; then kiln answers as before (SELECT applies, the
/// key reads back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_script_is_busy_kiln_answers_nothing_redis_refuses() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["SET", "hot", "v"]).await, "+OK\r\n"[..]);
    for _ in 0..2 {
        assert_eq!(c.cmd(&["GET", "hot"]).await, bulk("v"), "cached");
    }
    let mut runner = runaway(&kiln, &mut direct, &["EVAL", "while true do end", "0"]).await;
    let cases: &[&[&str]] = &[
        &["GET", "hot"],
        &["PING"],
        &["ECHO", "x"],
        &["SELECT", "1"],
        &["CLIENT", "ID"],
        &["CLIENT", "GETNAME"],
    ];
    for args in cases {
        let want = direct.cmd(args).await;
        assert!(want.starts_with(b"-BUSY "), "{args:?} directly: {want:?}");
        assert_eq!(c.cmd(args).await, want, "{args:?} through kiln");
    }
    assert_eq!(c.cmd(&["SCRIPT", "KILL"]).await, "+OK\r\n"[..]);
    let killed = runner.read().await;
    assert!(
        killed.starts_with(b"-ERR") || killed.starts_with(b"-"),
        "{killed:?}"
    );
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n"[..]);
    assert_eq!(c.cmd(&["GET", "hot"]).await, bulk("v"));
    assert_eq!(c.cmd(&["SELECT", "1"]).await, "+OK\r\n"[..]);
    assert_eq!(
        c.cmd(&["GET", "hot"]).await,
        "$-1\r\n"[..],
        "database 1 now"
    );
    // The sibling: a client's own commands pipelined behind its script run
    // after it, as Redis runs a client's commands in order: its PING gets
    // +PONG once the script is killed, never -BUSY (kiln had just seen
    // -BUSY above, and asked upstream for this PING: Redis said -BUSY).
    let mut runner = kiln.conn().await;
    runner
        .send_raw(
            &[
                encode(&["EVAL", "while true do end", "0"]),
                encode(&["PING"]),
            ]
            .concat(),
        )
        .await;
    busy_reached(&mut direct).await;
    assert_eq!(c.cmd(&["SCRIPT", "KILL"]).await, "+OK\r\n"[..]);
    assert!(runner.read().await.starts_with(b"-"), "the script killed");
    assert_eq!(
        runner.read().await,
        "+PONG\r\n"[..],
        "its own PING, after it"
    );
}

/// The sibling: a function (`FCALL`) past the threshold. Redis's `-BUSY`
/// then names `FUNCTION KILL`; kiln's own answers (PING, CLIENT ID, an L1
/// hit) get that line too, and `FUNCTION KILL` through kiln ends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_function_is_busy_kiln_answers_nothing_redis_refuses() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    let mut c = kiln.conn().await;
    let lib = "#!lua name=spinlib\nredis.register_function{function_name='spin', callback=function() while true do end end, flags={'no-writes'}}";
    assert_eq!(c.cmd(&["FUNCTION", "LOAD", lib]).await, bulk("spinlib"));
    assert_eq!(c.cmd(&["SET", "hot", "v"]).await, "+OK\r\n"[..]);
    for _ in 0..2 {
        assert_eq!(c.cmd(&["GET", "hot"]).await, bulk("v"), "cached");
    }
    let mut runner = runaway(&kiln, &mut direct, &["FCALL", "spin", "0"]).await;
    for args in [&["GET", "hot"][..], &["PING"], &["CLIENT", "ID"]] {
        let want = direct.cmd(args).await;
        assert!(
            String::from_utf8_lossy(&want).contains("FUNCTION KILL"),
            "{want:?}"
        );
        assert_eq!(c.cmd(args).await, want, "{args:?} through kiln");
    }
    assert_eq!(c.cmd(&["FUNCTION", "KILL"]).await, "+OK\r\n"[..]);
    assert!(runner.read().await.starts_with(b"-"));
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n"[..]);
}
