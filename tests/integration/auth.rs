//! Client auth: `server.requirepass` answered exactly as Redis with
//! `requirepass` answers (compared byte for byte), and `[[users]]` roles
//! with Redis's `-NOPERM` text.

use kiln::config::{Role, Secret, UserConfig};

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirepass_replies_as_redis_does() {
    let redis = Redis::start_with(&["--requirepass", "sekret"]);
    let kiln = Kiln::start_with_url(&format!("redis://:sekret@127.0.0.1:{}", redis.port), |c| {
        c.server.requirepass = Some(Secret("sekret".into()))
    })
    .await;
    let script: &[&[&str]] = &[
        &["PING"],
        &["GET", "k"],
        &["HELLO", "3"],
        &["HELLO"],
        &["CLIENT", "SETNAME", "x"],
        &["SELECT", "1"],
        &["AUTH"],
        &["AUTH", "wrong"],
        &["AUTH", "nobody", "sekret"],
        &["AUTH", "default", "wrong"],
        &["HELLO", "3", "AUTH", "default", "wrong"],
        &["HELLO", "4", "AUTH", "default", "sekret"],
        &["AUTH", "sekret"],
        &["SET", "k", "v"],
        &["GET", "k"],
        &["RESET"],
        &["GET", "k"],
        &["AUTH", "default", "sekret"],
        &["PING"],
        &["GET", "k"],
        &["QUIT"],
    ];
    let mut direct = redis.conn().await;
    let mut through = kiln.conn().await;
    for cmd in script {
        let want = direct.cmd(cmd).await;
        let got = through.cmd(cmd).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{cmd:?}"
        );
    }
    // HELLO ... AUTH authenticates and switches protocol at once.
    let mut c = kiln.conn().await;
    let hello = c.cmd(&["HELLO", "3", "AUTH", "default", "sekret"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "{hello:?}");
    assert_eq!(c.cmd(&["GET", "k"]).await, "$1\r\nv\r\n");
}

fn users(c: &mut kiln::Config) {
    for (name, password, role) in [
        ("reader", "rp", Role::Read),
        ("writer", "wp", Role::Write),
        ("boss", "bp", Role::Admin),
    ] {
        c.users.push(UserConfig {
            name: name.into(),
            password: Secret(password.into()),
            role,
        });
    }
}

/// A Redis holding `a0` = 1, and kiln with the users above in front of it.
async fn seeded_with_users() -> (Redis, Kiln) {
    let redis = Redis::start_seeded("a", 1, |_| "1".into()).await;
    let kiln = Kiln::start_with_url(&redis.url(), users).await;
    (redis, kiln)
}

fn noperm(cmd: &str) -> String {
    format!("-NOPERM this user has no permissions to run the '{cmd}' command\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_limit_what_a_user_may_run() {
    let (redis, kiln) = seeded_with_users().await;

    // Before auth, and with a wrong password: nothing runs.
    let mut c = kiln.conn().await;
    assert_eq!(
        c.cmd(&["GET", "a0"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
    let wrong = "-WRONGPASS invalid username-password pair or user is disabled.\r\n";
    assert_eq!(c.cmd(&["AUTH", "reader", "wp"]).await, wrong);
    assert_eq!(c.cmd(&["AUTH", "rp"]).await, wrong, "no default user");
    assert_eq!(
        c.cmd(&["GET", "a0"]).await,
        "-NOAUTH Authentication required.\r\n"
    );

    // read: reads only.
    assert_eq!(c.cmd(&["AUTH", "reader", "rp"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "a0"]).await, "$1\r\n1\r\n");
    assert_eq!(
        c.cmd(&["MGET", "a0", "zz"]).await,
        "*2\r\n$1\r\n1\r\n$-1\r\n"
    );
    assert_eq!(c.cmd(&["STRLEN", "a0"]).await, ":1\r\n");
    assert_eq!(c.cmd(&["SET", "a0", "2"]).await, noperm("set"));
    assert_eq!(c.cmd(&["DEL", "a0"]).await, noperm("del"));
    assert_eq!(c.cmd(&["EVAL", "return 1", "0"]).await, noperm("eval"));
    assert_eq!(
        c.cmd(&["CONFIG", "GET", "maxmemory"]).await,
        noperm("config|get")
    );
    assert_eq!(c.cmd(&["CACHE.STATUS"]).await, noperm("cache.status"));
    assert_eq!(c.cmd(&["CACHE.CLEAR"]).await, noperm("cache.clear"));
    // A refused command dooms the transaction, as in Redis.
    assert_eq!(c.cmd(&["MULTI"]).await, "+OK\r\n");
    assert_eq!(c.cmd(&["GET", "a0"]).await, "+QUEUED\r\n");
    assert_eq!(c.cmd(&["INCR", "a0"]).await, noperm("incr"));
    assert_eq!(
        c.cmd(&["EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(c.cmd(&["GET", "a0"]).await, "$1\r\n1\r\n", "nothing ran");
    assert_eq!(redis.conn().await.cmd_text(&["GET", "a0"]).await, "1");

    // write: writes, but no admin commands.
    let mut w = kiln.conn().await;
    assert_eq!(
        w.cmd(&["HELLO", "3", "AUTH", "writer", "wp"]).await[..4],
        b"%7\r\n"[..]
    );
    assert_eq!(w.cmd(&["SET", "a0", "2"]).await, "+OK\r\n");
    assert_eq!(
        w.cmd(&["CONFIG", "GET", "maxmemory"]).await,
        noperm("config|get")
    );
    assert_eq!(w.cmd(&["CACHE.WARMUP"]).await, noperm("cache.warmup"));
    assert_eq!(
        c.cmd(&["GET", "a0"]).await,
        "$1\r\n2\r\n",
        "the reader sees it"
    );

    // admin: everything.
    let mut b = kiln.conn().await;
    assert_eq!(b.cmd(&["AUTH", "boss", "bp"]).await, "+OK\r\n");
    let cfg = b.cmd(&["CONFIG", "GET", "maxmemory"]).await;
    assert!(cfg.starts_with(b"*2\r\n"), "{cfg:?}");
    let status = b.cmd(&["CACHE.STATUS"]).await;
    assert!(status.starts_with(b"*"), "{status:?}");
    assert_eq!(b.cmd(&["CACHE.CLEAR"]).await[..1], b":"[..]);
    // RESET logs the client out again.
    assert_eq!(b.cmd(&["RESET"]).await, "+RESET\r\n");
    assert_eq!(
        b.cmd(&["PING"]).await,
        "-NOAUTH Authentication required.\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_inside_a_relay_keeps_its_place_in_the_replies() {
    let (redis, kiln) = seeded_with_users().await;
    let mut c = kiln.conn().await;
    let hello = c.cmd(&["HELLO", "3", "AUTH", "reader", "rp"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "{hello:?}");
    // RESP3 SUBSCRIBE hands the client to a relay.
    let sub = c.cmd(&["SUBSCRIBE", "ch"]).await;
    assert!(sub.starts_with(b">3\r\n"), "{sub:?}");
    // Pipelined: upstream owes the first reply when the refusal is made.
    let mut batch = encode(&["GET", "a0"]);
    batch.extend(encode(&["SET", "a0", "2"]));
    batch.extend(encode(&["ECHO", "after"]));
    c.send_raw(&batch).await;
    assert_eq!(c.read().await, "$1\r\n1\r\n");
    assert_eq!(c.read().await, noperm("set"));
    assert_eq!(c.read().await, "$5\r\nafter\r\n");
    assert_eq!(redis.conn().await.cmd_text(&["GET", "a0"]).await, "1");
}
