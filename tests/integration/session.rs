//! Commands with connection state: transactions, blocking pops, pub/sub,
//! HELLO 3, inline commands, binary and huge values, deep pipelines.

use crate::util::{Conn, bulk, encode, redis_and_kiln, redis_and_kiln_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_aborts_when_another_client_writes() {
    let (_redis, kiln) = redis_and_kiln().await;
    let [mut a, mut b] = kiln.conns().await;
    a.cmd(&["SET", "w", "0"]).await;
    assert_eq!(a.cmd(&["GET", "w"]).await, bulk("0"));
    assert_eq!(a.cmd(&["WATCH", "w"]).await, "+OK\r\n");
    assert_eq!(b.cmd(&["SET", "w", "other"]).await, "+OK\r\n");
    assert_eq!(a.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "w", "mine"]).await, "+QUEUED\r\n");
    assert_eq!(a.cmd(&["EXEC"]).await, "*-1\r\n", "EXEC aborts");
    assert_eq!(a.cmd(&["GET", "w"]).await, bulk("other"));
    // Without interference the transaction runs, and EXEC invalidates.
    assert_eq!(a.cmd(&["WATCH", "w"]).await, "+OK\r\n");
    a.cmd(&["MULTI"]).await;
    a.cmd(&["SET", "w", "mine"]).await;
    a.cmd(&["INCR", "n"]).await;
    assert_eq!(a.cmd(&["EXEC"]).await, "*2\r\n+OK\r\n:1\r\n");
    assert_eq!(b.cmd(&["GET", "w"]).await, bulk("mine"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_invalidates_keys_written_in_multi() {
    let (_redis, kiln) = redis_and_kiln().await;
    let [mut a, mut reader] = kiln.conns().await;
    a.cmd(&["SET", "t", "old"]).await;
    assert_eq!(reader.cmd(&["GET", "t"]).await, bulk("old"));
    a.cmd(&["MULTI"]).await;
    a.cmd(&["SET", "t", "new"]).await;
    assert_eq!(a.cmd(&["EXEC"]).await, "*1\r\n+OK\r\n");
    assert_eq!(reader.cmd(&["GET", "t"]).await, bulk("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pop_is_woken_by_another_client() {
    let (redis, kiln) =
        redis_and_kiln_with(|c| c.upstream.command_timeout = std::time::Duration::from_millis(200))
            .await;
    let [mut waiter, mut pusher] = kiln.conns().await;
    waiter.send(&["BLPOP", "queue", "0"]).await;
    let mut direct = redis.conn().await;
    // Blocked upstream, and longer than command_timeout: blocking commands
    // are exempt from it.
    direct.wait_for(&["EVAL", "return tonumber(string.match(redis.call('INFO','clients'), 'blocked_clients:(%d+)'))", "0"], ":1\r\n").await;
    assert!(
        waiter
            .try_read_within(std::time::Duration::from_millis(300))
            .await
            .is_err(),
        "no reply (and no timeout error) while blocked past command_timeout"
    );
    assert_eq!(pusher.cmd(&["RPUSH", "queue", "job"]).await, ":1\r\n");
    assert_eq!(
        waiter.read().await,
        b"*2\r\n$5\r\nqueue\r\n$3\r\njob\r\n"[..]
    );
    // The waiter is usable again, on shared connections.
    assert_eq!(waiter.cmd(&["GET", "nothing"]).await, "$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_through_kiln() {
    let (_redis, kiln) = redis_and_kiln().await;
    let [mut sub, mut publisher] = kiln.conns().await;
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "news"]).await,
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"[..]
    );
    assert_eq!(
        sub.cmd(&["PSUBSCRIBE", "n*"]).await,
        b"*3\r\n$10\r\npsubscribe\r\n$2\r\nn*\r\n:2\r\n"[..]
    );
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "hi"]).await, ":2\r\n");
    assert_eq!(
        sub.read().await,
        b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"[..]
    );
    assert_eq!(
        sub.read().await,
        b"*4\r\n$8\r\npmessage\r\n$2\r\nn*\r\n$4\r\nnews\r\n$2\r\nhi\r\n"[..]
    );
    // RESP2 subscribed clients get Redis's own refusal for other commands.
    assert!(
        sub.cmd(&["GET", "x"])
            .await
            .starts_with(b"-ERR Can't execute 'get'")
    );
    assert_eq!(sub.cmd(&["RESET"]).await, "+RESET\r\n");
    assert_eq!(publisher.cmd(&["PUBLISH", "news", "again"]).await, ":0\r\n");
    assert_eq!(sub.cmd(&["SET", "x", "1"]).await, "+OK\r\n");
    assert_eq!(sub.cmd(&["GET", "x"]).await, bulk("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_pubsub_and_writes_in_relay() {
    let (_redis, kiln) = redis_and_kiln().await;
    let [mut sub, mut other] = kiln.conns().await;
    sub.cmd(&["HELLO", "3"]).await;
    other.cmd(&["SET", "k", "before"]).await;
    assert_eq!(other.cmd(&["GET", "k"]).await, bulk("before"));
    assert_eq!(
        sub.cmd(&["SUBSCRIBE", "c"]).await,
        b">3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n"[..]
    );
    // RESP3 allows any command while subscribed; writes still invalidate.
    assert_eq!(sub.cmd(&["SET", "k", "after"]).await, "+OK\r\n");
    assert_eq!(other.cmd(&["GET", "k"]).await, bulk("after"));
    other.cmd(&["PUBLISH", "c", "m"]).await;
    assert_eq!(
        sub.read().await,
        b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\nm\r\n"[..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_switches_protocol() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["HSET", "h", "f", "v"]).await;
    let hello = c.cmd(&["HELLO", "3"]).await;
    let text = String::from_utf8_lossy(&hello);
    assert!(
        text.starts_with("%7\r\n") && text.contains("$5\r\nproto\r\n:3\r\n"),
        "{text}"
    );
    assert_eq!(c.cmd(&["GET", "none"]).await, "_\r\n");
    assert_eq!(
        c.cmd(&["GET", "none"]).await,
        "_\r\n",
        "cached nil in RESP3"
    );
    assert_eq!(
        c.cmd(&["HGETALL", "h"]).await,
        b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n"[..]
    );
    assert_eq!(
        c.cmd(&["HELLO", "4"]).await,
        "-NOPROTO unsupported protocol version\r\n"
    );
    let back = c.cmd(&["HELLO", "2"]).await;
    assert!(back.starts_with(b"*14\r\n"));
    assert_eq!(
        c.cmd(&["GET", "none"]).await,
        "$-1\r\n",
        "cached nil in RESP2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.send_raw(b"PING\r\n").await;
    assert_eq!(c.read().await, "+PONG\r\n");
    c.send_raw(b"SET \"two words\" 'it''s'\r\nGET \"two words\"\n")
        .await;
    // Same as Redis: a closing quote must be followed by a space.
    assert_eq!(
        c.read().await,
        "-ERR Protocol error: unbalanced quotes in request\r\n"
    );
    assert!(c.closed().await);
    let mut c = kiln.conn().await;
    c.send_raw(b"SET \"two words\" \"a\\x00b\"\r\nGET \"two words\"\r\n")
        .await;
    assert_eq!(c.read().await, "+OK\r\n");
    assert_eq!(c.read().await, b"$3\r\na\x00b\r\n"[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_and_values_round_trip() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    let value: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
    let key: &[u8] = b"bin\r\n\x00\xff key";
    assert_eq!(c.cmd(&[&b"SET"[..], key, &value]).await, "+OK\r\n");
    for _ in 0..2 {
        let got = c.cmd(&[&b"GET"[..], key]).await;
        assert_eq!(crate::util::bulk_payload(&got).expect("bulk"), value);
    }
    let direct = redis.conn().await.cmd(&[&b"GET"[..], key]).await;
    assert_eq!(crate::util::bulk_payload(&direct).expect("bulk"), value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_megabyte_values() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    let value: Vec<u8> = (0..50 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.cmd(&[&b"SET"[..], b"huge", &value]).await, "+OK\r\n");
    let got = c.cmd(&["GET", "huge"]).await;
    assert_eq!(got.len(), value.len() + 13);
    assert!(crate::util::bulk_payload(&got).expect("bulk") == value);
    assert_eq!(c.cmd(&["STRLEN", "huge"]).await, ":52428800\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_pipelined_commands() {
    let (_redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    const N: usize = 100_000;
    let mut batch = Vec::with_capacity(N * 40);
    for i in 0..N {
        let k = format!("p{}", (i / 2) % 1000);
        if i % 2 == 0 {
            batch.extend(encode(&["SET", &k, &i.to_string()]));
        } else {
            batch.extend(encode(&["GET", &k]));
        }
    }
    // Write everything before reading anything, as redis-cli --pipe does.
    let (mut rd, mut wr) = c.stream.split();
    let writer = async {
        tokio::io::AsyncWriteExt::write_all(&mut wr, &batch)
            .await
            .expect("write");
    };
    let reader = async {
        let mut conn_buf = Vec::new();
        let mut replies = 0;
        let mut last = Vec::new();
        let mut pos = 0;
        while replies < N {
            let mut chunk = [0u8; 65536];
            let n = tokio::time::timeout(
                crate::util::WAIT,
                tokio::io::AsyncReadExt::read(&mut rd, &mut chunk),
            )
            .await
            .expect("replies keep coming")
            .expect("read");
            assert!(n > 0, "closed after {replies} replies");
            conn_buf.extend_from_slice(&chunk[..n]);
            while let Ok(Some((_, len))) = redis_protocol::resp2::decode::decode(&conn_buf[pos..]) {
                last = conn_buf[pos..pos + len].to_vec();
                pos += len;
                replies += 1;
            }
        }
        last
    };
    let ((), last) = tokio::join!(writer, reader);
    // The last command was GET p999 right after SET p999 99998.
    assert_eq!(last, bulk("99998"));
    let _: &mut Conn = &mut c;
}

/// Waits (bounded) until Redis has closed every client whose CLIENT LIST
/// line contains `what` (`flags=x`: in MULTI; `cmd=watch`).
async fn reaped(redis_port: u16, what: &str) {
    crate::util::poll_until(std::time::Duration::from_millis(100), async || {
        let list = crate::util::cli(redis_port, &["CLIENT", "LIST"]);
        let left: Vec<&str> = list
            .lines()
            .filter(|l| l.contains(what) && !l.contains("cmd=client|list"))
            .collect();
        match left.is_empty() {
            true => Ok(()),
            false => Err(format!("not reaped yet: {left:?}")),
        }
    })
    .await;
}

/// Redis's `timeout` (or a CLIENT KILL) closes a client's session
/// connection mid-transaction: a direct client is disconnected and
/// nothing of its transaction runs. kiln used to make the connection again
/// when next needed: the rest of the MULTI ran outside any transaction
/// (SET and INCR applied, then `EXEC without MULTI`), and an EXEC after a
/// lost WATCH ran, overwriting another client's write. Now every later
/// command on that session fails and nothing runs; the sibling, a WATCH
/// lost the same way, fails its EXEC too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_upstream_closed_runs_nothing_more() {
    let (redis, kiln) = redis_and_kiln().await;
    // Direct calls on connections of their own: Redis reaps idle ones.
    let direct = |args: &[&str]| crate::util::cli(redis.port, args);
    assert_eq!(direct(&["CONFIG", "SET", "timeout", "1"]).trim(), "OK");
    let [mut a, mut b] = kiln.conns().await;

    assert_eq!(a.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(a.cmd(&["SET", "ta", "1"]).await, "+QUEUED\r\n");
    reaped(redis.port, "flags=x").await;
    let set = a.cmd(&["SET", "tb", "2"]).await;
    let incr = a.cmd(&["INCR", "tc"]).await;
    let exec = a.cmd(&["EXEC"]).await;
    for r in [&set, &incr, &exec] {
        assert!(r.starts_with(b"-"), "{r:?} {set:?} {incr:?} {exec:?}");
    }
    for k in ["ta", "tb", "tc"] {
        assert_eq!(direct(&["GET", k]).trim(), "", "{k} was written");
    }

    // The sibling: WATCH, then the session is reaped and another client
    // writes; the EXEC must not run.
    assert_eq!(b.cmd(&["SET", "wk", "0"]).await, "+OK\r\n");
    assert_eq!(b.cmd(&["WATCH", "wk"]).await, "+OK\r\n");
    reaped(redis.port, "cmd=watch").await;
    assert_eq!(direct(&["SET", "wk", "other"]).trim(), "OK");
    b.cmd(&["MULTI"]).await;
    b.cmd(&["SET", "wk", "mine"]).await;
    let exec = b.cmd(&["EXEC"]).await;
    assert!(exec.starts_with(b"-") || exec == "*-1\r\n", "{exec:?}");
    assert_eq!(direct(&["GET", "wk"]).trim(), "other");
}
