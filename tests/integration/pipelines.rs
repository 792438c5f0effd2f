//! Found by a review against Redis 7.0 directly: pipelines that cross a
//! read on a reader connection, a held session, a relay's start, a slow or
//! busy upstream, and commands kiln answers itself for an upstream ACL
//! user. Each reply is compared with what Redis answers to the same bytes.

use std::time::{Duration, Instant};

use crate::util::*;

/// How many reply frames to read: a count, or up to this frame.
#[derive(Clone, Copy)]
enum Upto {
    Frames(usize),
    Frame(&'static str),
}

/// Reads replies as `upto` says, each bounded by `WAIT`.
async fn replies(c: &mut Conn, upto: Upto) -> Vec<u8> {
    let mut all = Vec::new();
    let mut n = 0;
    loop {
        let done = match upto {
            Upto::Frames(want) => n == want,
            Upto::Frame(last) => all.ends_with(last.as_bytes()),
        };
        if done {
            return all;
        }
        all.extend_from_slice(&c.read().await);
        n += 1;
    }
}

/// Sends `cmds` in one write to a fresh connection of each, returns both
/// answers (kiln's, Redis's).
async fn both(kiln: &Kiln, redis: &Redis, cmds: &[&[&str]], upto: Upto) -> (Vec<u8>, Vec<u8>) {
    let bytes: Vec<u8> = cmds.iter().flat_map(|c| encode(c)).collect();
    let mut k = kiln.conn().await;
    k.send_raw(&bytes).await;
    let got = replies(&mut k, upto).await;
    let mut d = redis.conn().await;
    d.send_raw(&bytes).await;
    let want = replies(&mut d, upto).await;
    (got, want)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_never_overtakes_a_read_sent_before_it() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    let mut k = kiln.conn().await;
    let mut wrong = Vec::new();
    for i in 0..200 {
        direct.cmd(&["SET", "rb", "old"]).await;
        // A write in flight, then a read that misses L1 (read on a reader
        // connection), then a write of that key on the shared connection.
        let (read, write): (&[&str], &[&str]) = if i % 2 == 0 {
            (&["GET", "rb"], &["SET", "rb", "new"])
        } else {
            (&["MGET", "rb", "rc"], &["DEL", "rb"])
        };
        let batch: Vec<u8> = [&["SET", "ra", "1"][..], read, write]
            .iter()
            .flat_map(|c| encode(c))
            .collect();
        k.send_raw(&batch).await;
        let (_, got, _) = (k.read().await, k.read().await, k.read().await);
        let want: &[u8] = if i % 2 == 0 {
            b"$3\r\nold\r\n"
        } else {
            b"*2\r\n$3\r\nold\r\n$-1\r\n"
        };
        if got != want {
            wrong.push((i, got));
        }
    }
    assert!(
        wrong.is_empty(),
        "reads answered with a later write's value: {wrong:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_kiln_answers_are_refused_as_upstream_acl_refuses_them() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    set_user(&mut direct, "app", &["~*", "&*", "+@all", "-@dangerous"]).await;
    set_user(
        &mut direct,
        "lim",
        &["~*", "+@all", "-ping", "-select", "-echo"],
    )
    .await;
    let mut victim = kiln.conn().await;
    let victim_id = String::from_utf8_lossy(&victim.cmd(&["CLIENT", "ID"]).await)
        .trim_start_matches(':')
        .trim()
        .to_string();
    for (user, cmds) in [
        (
            "app",
            vec![
                vec!["CLIENT", "LIST"],
                vec!["CLIENT", "KILL", "ID", &victim_id],
            ],
        ),
        (
            "lim",
            vec![vec!["PING"], vec!["SELECT", "1"], vec!["ECHO", "x"]],
        ),
    ] {
        let mut k = kiln.conn().await;
        let mut d = redis.conn().await;
        assert_eq!(k.cmd(&["AUTH", user, "pw"]).await, "+OK\r\n");
        d.cmd(&["AUTH", user, "pw"]).await;
        for c in cmds {
            let got = k.cmd(&c).await;
            let want = d.cmd(&c).await;
            assert!(want.starts_with(b"-NOPERM"), "{want:?}");
            assert_eq!(got, want, "{user}: {c:?}");
        }
    }
    assert_eq!(
        victim.cmd(&["PING"]).await,
        "+PONG\r\n",
        "the victim was not killed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connections_wait_for_a_slow_upstream() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let kiln = Kiln::start(&redis).await;
    let mut a = kiln.conn().await;
    a.send(&["DEBUG", "SLEEP", "2"]).await;
    let mut direct = redis.conn().await;
    // Wait until upstream is inside the sleep: a direct PING stalls.
    let deadline = Instant::now() + WAIT;
    loop {
        direct.send(&["PING"]).await;
        match direct.try_read_within(Duration::from_millis(100)).await {
            Err(()) => break,
            Ok(r) => assert_eq!(r.as_deref(), Some(&b"+PONG\r\n"[..])),
        }
        assert!(Instant::now() < deadline, "DEBUG SLEEP never started");
    }
    let start = Instant::now();
    // Each needs a connection kiln has not opened yet.
    let mut sub = kiln.conn().await;
    sub.send(&["SUBSCRIBE", "q"]).await;
    let mut blpop = kiln.conn().await;
    blpop.send(&["BLPOP", "nol", "0.5"]).await;
    let mut sel = kiln.conn().await;
    sel.send_raw(&[encode(&["SELECT", "6"]), encode(&["GET", "x"])].concat())
        .await;
    assert_eq!(
        sub.read().await,
        "*3\r\n$9\r\nsubscribe\r\n$1\r\nq\r\n:1\r\n"
    );
    assert_eq!(blpop.read().await, "*-1\r\n");
    assert_eq!(sel.read().await, "+OK\r\n");
    assert_eq!(sel.read().await, "$-1\r\n");
    assert_eq!(a.read().await, "+OK\r\n");
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(direct.cmd(&["PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_script_gives_busy_to_new_connections_and_leaves_the_breaker_closed() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    direct
        .cmd(&["CONFIG", "SET", "busy-reply-threshold", "100"])
        .await;
    let mut script = kiln.conn().await;
    script.send(&["EVAL", "while true do end", "0"]).await;
    let deadline = Instant::now() + WAIT;
    let busy = loop {
        let r = redis.conn().await.cmd(&["GET", "x"]).await;
        if r.starts_with(b"-BUSY") {
            break r;
        }
        assert!(Instant::now() < deadline, "script never busy");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for db in 2..8 {
        let mut c = kiln.conn().await;
        let db = db.to_string();
        c.send_raw(&[encode(&["SELECT", &db]), encode(&["GET", "x"])].concat())
            .await;
        // SELECT too, as Redis refuses it while busy (it has no
        // `allow_busy` flag): the same line.
        assert_eq!(
            c.read().await,
            busy,
            "db {db}: SELECT gets upstream's -BUSY"
        );
        assert_eq!(
            c.read().await,
            busy,
            "db {db}: upstream's -BUSY, not a kiln error"
        );
    }
    let mut status = kiln.conn().await;
    let s = status.cmd(&["CACHE.STATUS", "JSON"]).await;
    assert!(show(&s).contains("\"upstream\":\"closed\""), "{}", show(&s));
    assert_eq!(status.cmd(&["SCRIPT", "KILL"]).await, "+OK\r\n");
    assert!(script.read().await.starts_with(b"-ERR Script killed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_a_relay_keeps_reply_order() {
    let (redis, kiln) = redis_and_kiln().await;
    for cmds in [
        &[
            &["CLIENT", "TRACKING", "ON"][..],
            &["CLIENT", "GETREDIR"],
            &["RESET"],
        ][..],
        &[&["MONITOR"][..], &["CLIENT", "GETNAME"], &["RESET"]],
        &[
            &["SUBSCRIBE", "a", "b"][..],
            &["PING"],
            &["CLIENT", "GETNAME"],
            &["RESET"],
        ],
    ] {
        let (got, want) = both(&kiln, &redis, cmds, Upto::Frame("+RESET\r\n")).await;
        // MONITOR shows the monitoring client's own commands; a command
        // kiln answers never reaches upstream, so it has no line there.
        let replies = |b: &[u8]| {
            show(b)
                .split_inclusive("\r\n")
                .filter(|l| {
                    !(l.starts_with('+') && l[1..].starts_with(|c: char| c.is_ascii_digit()))
                })
                .collect::<String>()
        };
        assert_eq!(replies(&got), replies(&want), "{cmds:?}");
    }
    // RESP3 subscriber: kiln's answer after upstream's pushes before it.
    let cmds: &[&[&str]] = &[
        &["HELLO", "3"],
        &["SUBSCRIBE", "c"],
        &["CLIENT", "SETNAME", "zz"],
        &["UNSUBSCRIBE", "c"],
        &["CLIENT", "GETNAME"],
    ];
    let (got, want) = both(&kiln, &redis, cmds, Upto::Frames(5)).await;
    let after = |b: &[u8]| {
        let s = show(b);
        s[s.find("modules").expect("HELLO map")..].to_string()
    };
    assert_eq!(after(&got), after(&want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_auth_pipelined_as_redis_runs_them() {
    let (redis, kiln) = redis_and_kiln().await;
    set_user(&mut redis.conn().await, "app", &["~*", "+@all"]).await;
    for cmds in [
        &[
            &["WATCH", "x"][..],
            &["AUTH", "app", "pw"],
            &["ACL", "WHOAMI"],
            &["UNWATCH"],
            &["ACL", "WHOAMI"],
        ][..],
        &[
            &["BLPOP", "nol", "0.2"][..],
            &["AUTH", "app", "pw"],
            &["ACL", "WHOAMI"],
        ],
        &[&["WATCH", "x"][..], &["UNWATCH"], &["SUBSCRIBE", "c1"]],
        &[&["MULTI"][..], &["DISCARD"], &["MONITOR"], &["RESET"]],
        &[&["RESET", "x"][..], &["CLIENT", "KILL"]],
    ] {
        let (got, want) = both(&kiln, &redis, cmds, Upto::Frames(cmds.len())).await;
        assert_eq!(show(&got), show(&want), "{cmds:?}");
    }
    // HELLO after EXEC waits for the session instead of being refused.
    let (got, _) = both(
        &kiln,
        &redis,
        &[&["MULTI"], &["EXEC"], &["HELLO", "3"]],
        Upto::Frames(3),
    )
    .await;
    assert!(
        show(&got).starts_with("+OK\r\n*0\r\n%7\r\n"),
        "{}",
        show(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_kiln_answers_abort_a_transaction_instead_of_reaching_it() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut c = kiln.conn().await;
    let batch: Vec<u8> = [
        &["MULTI"][..],
        &["CLIENT", "REPLY", "OFF"],
        &["SET", "ra", "3"],
        &["EXEC"],
        &["CLIENT", "SETNAME", "nm"],
        &["MULTI"],
        &["CLIENT", "SETNAME", "inside"],
        &["EXEC"],
        &["PING"],
    ]
    .iter()
    .flat_map(|c| encode(c))
    .collect();
    c.send_raw(&batch).await;
    let got = replies(&mut c, Upto::Frames(9)).await;
    let abort = "-EXECABORT Transaction discarded because of previous errors.\r\n";
    assert_eq!(
        show(&got),
        format!(
            "+OK\r\n-ERR 'CLIENT REPLY' inside MULTI is not supported by kiln\r\n+QUEUED\r\n{abort}\
             +OK\r\n+OK\r\n-ERR 'CLIENT SETNAME' inside MULTI is not supported by kiln\r\n{abort}+PONG\r\n"
        )
    );
    assert_eq!(
        c.cmd(&["GET", "ra"]).await,
        "$-1\r\n",
        "the transaction did not run"
    );
    // No pooled upstream connection was named by the client.
    let list = redis.conn().await.cmd_text(&["CLIENT", "LIST"]).await;
    assert!(!list.contains("name=inside"), "{list}");
}

/// Read and write buffers are lent per worker thread and given back when
/// empty (`kiln::buffers`): a command cut across reads keeps its first
/// part while other clients borrow and return buffers between the
/// pieces, and a pipeline whose replies pass one buffer comes back whole.
/// Both compared with Redis answering the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_cut_across_reads_survive_other_clients_between_the_pieces() {
    let (redis, kiln) = redis_and_kiln().await;
    let value: String = (0..40_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let set = encode(&["SET", "cut", &value]);
    let (head, tail) = set.split_at(set.len() / 2);
    let mut others = Vec::new();
    for _ in 0..4 {
        others.push(kiln.conn().await);
    }
    let mut k = kiln.conn().await;
    k.send_raw(head).await;
    // Other clients of the same kiln use (and give back) buffers while the
    // first half waits in its connection's.
    for (i, o) in others.iter_mut().enumerate() {
        let key = format!("other{i}");
        assert_eq!(&o.cmd(&["SET", &key, "x"]).await[..], b"+OK\r\n");
        assert_eq!(&o.cmd(&["GET", &key]).await[..], b"$1\r\nx\r\n");
        assert_eq!(&o.cmd(&["GET", &key]).await[..], b"$1\r\nx\r\n");
    }
    k.send_raw(tail).await;
    assert_eq!(&k.read().await[..], b"+OK\r\n");
    let got = k.cmd(&["GET", "cut"]).await;
    assert_eq!(bulk_payload(&got).as_deref(), Some(value.as_bytes()));
    // The same cut against Redis, and a pipeline of 400 reads (1.6 MB of
    // replies, the commands arriving in several reads), against both.
    let mut d = redis.conn().await;
    d.send_raw(head).await;
    d.send_raw(tail).await;
    assert_eq!(&d.read().await[..], b"+OK\r\n");
    let hundred = "v".repeat(100);
    assert_eq!(&k.cmd(&["SET", "h", &hundred]).await[..], b"+OK\r\n");
    let mut reads: Vec<&[&str]> = Vec::new();
    for i in 0..400 {
        reads.push(if i % 10 == 0 {
            &["GET", "cut"]
        } else {
            &["GET", "h"]
        });
    }
    let (mine, theirs) = both(&kiln, &redis, &reads, Upto::Frames(400)).await;
    assert!(
        mine == theirs,
        "kiln {} / Redis {} bytes differ",
        mine.len(),
        theirs.len()
    );
    assert!(mine.len() > 16 * 1024);
}

/// Shutdown while a command is held back for earlier replies (a write
/// behind a GET's fill, a blocking command behind a read): the held
/// command is never run, what was owed is written, and the connection
/// closes. The held command used to send the connection's loop round
/// without waiting, spinning its worker at 100% CPU so kiln never exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_commands_held_behind_earlier_replies_ends() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    direct.cmd(&["SET", "held", "v"]).await;
    let mut status = kiln.conn().await;
    let (mut write_held, mut block_held) = (kiln.conn().await, kiln.conn().await);
    // Upstream holds every command for a while: the GETs' fills wait, and
    // the SET and the BLPOP behind them are held in kiln.
    assert_eq!(
        direct.cmd(&["CLIENT", "PAUSE", "700", "ALL"]).await,
        "+OK\r\n"
    );
    let pipeline = |a: &[&str], b: &[&str]| [encode(a), encode(b)].concat();
    write_held
        .send_raw(&pipeline(&["GET", "held"], &["SET", "held", "w"]))
        .await;
    block_held
        .send_raw(&pipeline(&["GET", "held"], &["BLPOP", "nolist", "0"]))
        .await;
    // Both have read their pipelines (CLIENT LIST shows the GET as their
    // last command) before kiln is stopped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let list = String::from_utf8_lossy(&status.cmd(&["CLIENT", "LIST"]).await).into_owned();
        if list.matches("cmd=get").count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "pipelines not read: {list}");
    }
    drop(status);
    tokio::time::timeout(WAIT, kiln.stop())
        .await
        .expect("kiln stops")
        .expect("cleanly");
    for c in [&mut write_held, &mut block_held] {
        assert_eq!(c.read().await, "$1\r\nv\r\n", "the GET owed is written");
        assert!(c.closed().await, "then the connection closes");
    }
    assert_eq!(
        direct.cmd(&["GET", "held"]).await,
        "$1\r\nv\r\n",
        "the held SET never ran"
    );
}
