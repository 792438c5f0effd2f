//! Upstream ACL users through kiln, beyond the login itself (see
//! `transparency_stress`): L1 serves a user what upstream lets it read, and
//! forgets that when the user's rights change, through kiln or directly.

use std::time::{Duration, Instant};

use crate::util::*;

const NOPERM: &str =
    "-NOPERM this user has no permissions to access one of the keys used as arguments\r\n";

async fn bob(kiln: &Kiln) -> Conn {
    let mut c = kiln.conn().await;
    assert_eq!(c.cmd(&["AUTH", "bob", "pw"]).await, "+OK\r\n");
    c
}

/// Reads `public:1` as bob until `done(reply)`, bounded.
async fn read_until(c: &mut Conn, done: impl Fn(&[u8]) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let r = c.cmd(&["GET", "public:1"]).await;
        if done(&r) {
            return start.elapsed();
        }
        assert!(start.elapsed() < WAIT, "never reached; last {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_user_is_served_from_l1_until_its_rights_change() {
    let (redis, kiln) = redis_and_kiln_with(|c| {
        c.coherence.check_interval = Duration::from_millis(200);
    })
    .await;
    let mut direct = redis.conn().await;
    set_user(&mut direct, "bob", &["~public:*", "+@all"]).await;
    direct.cmd(&["SET", "public:1", "p"]).await;
    let mut b = bob(&kiln).await;

    // Once upstream said bob may read it, bob's reads are L1 hits: upstream
    // sees no more GETs.
    read_until(&mut b, |r| r == bulk("p")).await;
    let start = Instant::now();
    loop {
        let before = redis.calls("get").await;
        for _ in 0..5 {
            assert_eq!(b.cmd(&["GET", "public:1"]).await, bulk("p"));
        }
        if redis.calls("get").await == before {
            break;
        }
        assert!(start.elapsed() < WAIT, "bob's reads never came from L1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Rights taken away directly upstream: seen within the check interval.
    direct
        .cmd(&["ACL", "SETUSER", "bob", "resetkeys", "~other:*"])
        .await;
    let took = read_until(&mut b, |r| r == NOPERM.as_bytes()).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(b.cmd(&["GET", "public:1"]).await, NOPERM);

    // Given back and taken away again through kiln: at once.
    let mut admin = kiln.conn().await;
    admin
        .cmd(&["ACL", "SETUSER", "bob", "resetkeys", "~public:*"])
        .await;
    read_until(&mut b, |r| r == bulk("p")).await;
    assert_eq!(
        admin
            .cmd(&["ACL", "SETUSER", "bob", "resetkeys", "~other:*"])
            .await,
        "+OK\r\n"
    );
    assert_eq!(b.cmd(&["GET", "public:1"]).await, NOPERM);
    // Its MGET is refused as upstream refuses it.
    let want = {
        let mut d = redis.conn().await;
        d.cmd(&["AUTH", "bob", "pw"]).await;
        d.cmd(&["MGET", "public:1"]).await
    };
    assert_eq!(b.cmd(&["MGET", "public:1"]).await, want);
    // The default user still reads it from L1 as before.
    assert_eq!(admin.cmd(&["GET", "public:1"]).await, bulk("p"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_runs_its_sessions_as_itself() {
    // Transactions, blocking commands and subscriptions run on connections
    // of the user too: upstream's ACL refuses what it would directly.
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    set_user(&mut direct, "bob", &["~public:*", "&news", "+@all"]).await;
    let mut b = bob(&kiln).await;
    assert_eq!(b.cmd(&["MULTI"]).await, "+OK\r\n");
    let queued = b.cmd(&["SET", "secret", "x"]).await;
    assert!(queued.starts_with(b"-NOPERM"), "{queued:?}");
    let exec = b.cmd(&["EXEC"]).await;
    assert!(exec.starts_with(b"-EXECABORT"), "{exec:?}");
    let blpop = b.cmd(&["BLPOP", "secret", "1"]).await;
    assert!(blpop.starts_with(b"-NOPERM"), "{blpop:?}");
    let sub = b.cmd(&["SUBSCRIBE", "private"]).await;
    assert!(sub.starts_with(b"-NOPERM"), "{sub:?}");
    let mut c = bob(&kiln).await;
    let sub = c.cmd(&["SUBSCRIBE", "news"]).await;
    assert!(sub.starts_with(b"*3\r\n$9\r\nsubscribe"), "{sub:?}");
}

/// The same for the other cached reads, whose `ACL DRYRUN` needs the call's
/// arguments (Redis checks arity there): an allowed user's `HGET` is served
/// from L1, a refused one's gets upstream's `-NOPERM`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_reads_of_an_upstream_user_follow_its_rights() {
    let (redis, kiln) = redis_and_kiln().await;
    let mut direct = redis.conn().await;
    set_user(&mut direct, "bob", &["~public:*", "+@all"]).await;
    direct.cmd(&["HSET", "public:h", "f", "v"]).await;
    direct.cmd(&["HSET", "secret:h", "f", "s"]).await;
    let mut b = bob(&kiln).await;
    let start = Instant::now();
    loop {
        assert_eq!(b.cmd(&["HGET", "public:h", "f"]).await, bulk("v"));
        let before = redis.calls("hget").await;
        for _ in 0..5 {
            assert_eq!(b.cmd(&["HGET", "public:h", "f"]).await, bulk("v"));
        }
        if redis.calls("hget").await == before {
            break;
        }
        assert!(start.elapsed() < WAIT, "bob's HGETs never came from L1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The default user caches the secret; bob still gets upstream's no.
    let mut admin = kiln.conn().await;
    assert_eq!(admin.cmd(&["HGET", "secret:h", "f"]).await, bulk("s"));
    assert_eq!(
        admin.cmd(&["HGETALL", "secret:h"]).await,
        b"*2\r\n$1\r\nf\r\n$1\r\ns\r\n"[..]
    );
    for _ in 0..3 {
        assert_eq!(b.cmd(&["HGET", "secret:h", "f"]).await, NOPERM);
        assert_eq!(b.cmd(&["HGETALL", "secret:h"]).await, NOPERM);
    }
}
