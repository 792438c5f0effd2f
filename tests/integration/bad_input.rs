//! Malformed input gets Redis's own protocol error (compared byte for byte
//! with a direct Redis where Redis has the same limit) and a close; the
//! process and every other client go on.

use std::time::Duration;

use crate::util::{Conn, Kiln, Redis, redis_and_kiln, redis_and_kiln_with};

/// Inputs that Redis and kiln both reject the same way.
const SHARED: &[&[u8]] = &[
    b"*abc\r\n",
    b"*1\r\n$-5\r\n",
    b"*1\r\n:1\r\n",
    b"*2\r\n$3\r\nGET\r\n+x\r\n",
    b"*1\r\n$x\r\n",
    b"*1\r\n$2147483648000\r\n",
    b"*1\r\n$999999999999\r\nabc",
    b"SET \"open quote\r\n",
    b"SET 'a'b c\r\n",
    b"PING\r\n*-x\r\n",
    // Lengths are read as Redis's string2ll reads them: no leading zero,
    // sign or space, no "-0".
    b"*2\r\n$04\r\nECHO\r\n$1\r\nx\r\n",
    b"*02\r\n$4\r\nECHO\r\n$1\r\nx\r\n",
    b"*1\r\n$-0\r\nPING\r\n",
    b"*-0\r\n",
    b"PING\r\n*00\r\n",
    b"*2\r\n$4\r\nECHO\r\n$+1\r\nx\r\n",
    b"*2\r\n$4\r\nECHO\r\n$ 1\r\nx\r\n",
];

async fn reply_and_close(c: &mut Conn) -> (Vec<u8>, bool) {
    let mut all = Vec::new();
    while let Ok(Some(r)) = c.try_read_within(Duration::from_secs(5)).await {
        all.extend_from_slice(&r);
    }
    (all, true)
}

/// `input` sent raw to a direct Redis and to kiln: what each wrote until
/// it closed (or went quiet), and kiln's connection.
async fn sent_to_both(direct: &Redis, kiln: &Kiln, input: &[u8]) -> (Vec<u8>, Vec<u8>, Conn) {
    let mut d = direct.conn().await;
    d.send_raw(input).await;
    let (want, _) = reply_and_close(&mut d).await;
    let mut k = kiln.conn().await;
    k.send_raw(input).await;
    let (got, _) = reply_and_close(&mut k).await;
    (want, got, k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_match_redis_and_close() {
    let direct_server = Redis::start();
    let behind = Redis::start();
    let kiln = Kiln::start(&behind).await;
    let mut bystander = kiln.conn().await;
    for input in SHARED {
        let (want, got, _) = sent_to_both(&direct_server, &kiln, input).await;
        assert!(
            String::from_utf8_lossy(&want).contains("Protocol error"),
            "{input:?}: {want:?}"
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "input {input:?}"
        );
        assert_eq!(bystander.cmd(&["PING"]).await, "+PONG\r\n");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_abandoned_sockets() {
    let (_redis, kiln) = redis_and_kiln_with(|c| {
        c.server.max_bulk_len = 1024 * 1024;
        c.server.max_multibulk_len = 1000;
    })
    .await;
    let mut bystander = kiln.conn().await;
    let cases: &[(&[u8], &str)] = &[
        (
            b"*1001\r\n",
            "-ERR Protocol error: invalid multibulk length\r\n",
        ),
        (
            b"*1\r\n$1048577\r\n",
            "-ERR Protocol error: invalid bulk length\r\n",
        ),
        (
            &[b'x'; 70_000],
            "-ERR Protocol error: too big inline request\r\n",
        ),
        (
            &[b'*'; 70_000],
            "-ERR Protocol error: too big mbulk count string\r\n",
        ),
    ];
    for (input, want) in cases {
        let mut k = kiln.conn().await;
        // The write may fail once kiln has closed: that is fine.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut k.stream, input).await;
        assert_eq!(k.read().await, want.as_bytes());
        assert!(k.closed().await, "closed after {want}");
    }
    // Half frames and sockets dropped mid-request.
    for partial in [
        &b"*2\r\n$3\r\nGET\r\n"[..],
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\nabc",
        b"GET k",
        b"",
    ] {
        let mut k = kiln.conn().await;
        k.send_raw(partial).await;
        drop(k);
    }
    // Binary garbage is an unknown inline command to Redis too.
    let mut g = kiln.conn().await;
    g.send_raw(b"\x01\x02\xff garbage\r\n").await;
    assert!(g.read().await.starts_with(b"-ERR unknown command"));
    assert_eq!(g.cmd(&["PING"]).await, "+PONG\r\n", "that client goes on");
    assert_eq!(bystander.cmd(&["SET", "alive", "yes"]).await, "+OK\r\n");
    assert_eq!(
        kiln.conn().await.cmd(&["GET", "alive"]).await,
        crate::util::bulk("yes")
    );
    // Each limit was counted under its own name.
    let (_, body) = crate::util::http_get(kiln.metrics, "/metrics").await;
    for (limit, want) in [
        ("max_multibulk_len", 1),
        ("max_bulk_len", 1),
        ("max_inline_len", 2),
    ] {
        let line = format!("proxy_client_limit_total{{limit=\"{limit}\"}} {want}");
        assert!(body.contains(&line), "no `{line}` in:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_arity_and_unknown_commands() {
    let (_redis, kiln) =
        redis_and_kiln_with(|c| c.server.deny_commands = vec!["KEYS".into()]).await;
    let mut c = kiln.conn().await;
    assert_eq!(
        c.cmd(&["GET"]).await,
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        c.cmd(&["PING", "a", "b"]).await,
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert!(
        c.cmd(&["FOO"])
            .await
            .starts_with(b"-ERR unknown command 'FOO'")
    );
    assert_eq!(
        c.cmd(&["keys", "*"]).await,
        "-ERR command 'keys' is disabled on this proxy\r\n"
    );
    assert!(
        c.cmd(&["CLIENT", "CACHING", "yes"])
            .await
            .starts_with(b"-ERR 'CLIENT CACHING' is refused by kiln")
    );
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_refuses_with_redis_error() {
    let (_redis, kiln) = redis_and_kiln_with(|c| c.server.max_clients = 2).await;
    // A connection's slot is freed when kiln sees it close, a moment after
    // the client drops it: retry until the harness's own probe is gone.
    let deadline = std::time::Instant::now() + crate::util::WAIT;
    loop {
        let mut conns = Vec::new();
        let mut replies = Vec::new();
        for _ in 0..3 {
            let mut c = kiln.conn().await;
            replies.push(c.cmd(&["PING"]).await);
            conns.push(c);
        }
        if replies[0] == "+PONG\r\n" && replies[1] == "+PONG\r\n" {
            assert_eq!(replies[2], "-ERR max number of clients reached\r\n");
            assert!(conns[2].closed().await);
            assert_eq!(
                conns[0].cmd(&["PING"]).await,
                "+PONG\r\n",
                "served clients go on"
            );
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never had two slots: {replies:?}"
        );
        drop(conns);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_gives_errors_not_hangs() {
    let (mut redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    c.cmd(&["SET", "k", "v"]).await;
    redis.kill();
    let reply = c.cmd(&["SET", "k", "w"]).await;
    assert!(reply.starts_with(b"-ERR upstream: "), "{reply:?}");
    let reply = c.cmd(&["INCR", "n"]).await;
    assert!(reply.starts_with(b"-ERR upstream: "), "{reply:?}");
    assert_eq!(c.cmd(&["PING"]).await, "+PONG\r\n");
}

/// An HTTP request sent to kiln (a `POST` line, a `Host:` header), as a
/// command of its own or after others in one pipeline, closes that client
/// with nothing written (not even the replies owed before it), byte for
/// byte as Redis closes it; nothing reaches upstream, so a client sharing
/// kiln's one upstream connection goes on and kiln counts no upstream
/// error (it used to forward the line: Redis closed the shared connection).
/// A subscribed client (relayed on a connection of its own) is closed the
/// same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_protocol_requests_close_only_the_sender() {
    let direct = Redis::start();
    let (_redis, kiln) = redis_and_kiln_with(|c| c.upstream.connections = 1).await;
    let mut bystander = kiln.conn().await;
    assert_eq!(bystander.cmd(&["SET", "k", "v"]).await, "+OK\r\n"[..]);
    let inputs: &[&[u8]] = &[
        b"POST / HTTP/1.1\r\nHost: example\r\n\r\n",
        b"Host: example\r\n",
        b"PING\r\nhost: x\r\n",
        b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\npost\r\n",
        b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\nPOST / HTTP/1.1\r\n",
    ];
    for input in inputs {
        let (want, got, mut k) = sent_to_both(&direct, &kiln, input).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "input {input:?}"
        );
        assert!(k.closed().await, "{input:?}: connection left open");
        bystander.send(&["SET", "k", "v"]).await;
        assert_eq!(bystander.read().await, "+OK\r\n"[..], "after {input:?}");
    }
    let (_, metrics) = crate::util::http_get(kiln.metrics, "/metrics").await;
    let failures: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("upstream_errors_total{") && !l.ends_with(" 0"))
        .collect();
    assert!(failures.is_empty(), "upstream failures: {failures:?}");
}
