//! Pub/sub through kiln in front of a 3 primary + 3 replica cluster,
//! compared frame for frame with one standalone Redis given the same
//! calls (issue 23, item 3).

use crate::cluster::{cluster_and_kiln, tag_on};
use crate::util::{Conn, Redis};
use kiln::commands::slot::key_slot;

/// The next frame, as text.
async fn next(c: &mut Conn) -> String {
    String::from_utf8_lossy(&c.read().await).into_owned()
}

/// Subscribes `via` (through kiln) and `to` (standalone) the same way:
/// the confirmations are the same, frame for frame.
async fn subscribe_both(via: &mut Conn, to: &mut Conn, args: &[&str]) {
    for c in [&mut *via, &mut *to] {
        c.send(args).await;
    }
    for _ in 1..args.len() {
        let (got, want) = (next(via).await, next(to).await);
        assert_eq!(got, want, "{args:?}");
    }
}

/// Nothing more is queued for a subscriber: a PING's reply comes next.
async fn nothing_more(c: &mut Conn, resp3: bool) {
    c.send(&["PING"]).await;
    let pong = next(c).await;
    let want = match resp3 {
        true => "+PONG\r\n",
        false => "*2\r\n$4\r\npong\r\n$0\r\n\r\n",
    };
    assert_eq!(pong, want, "a message came more than once");
}

/// Keyspace notifications of keys on all three primaries reach one
/// `SUBSCRIBE` and one `PSUBSCRIBE` through kiln, each once, as one Redis
/// sends them (Redis Cluster publishes a key's events only on its node:
/// a subscriber on one node used to miss two thirds of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyspace_notifications_of_every_primary_reach_one_subscriber() {
    let (_cluster, kiln) = cluster_and_kiln().await;
    let redis = Redis::start();
    let keys: Vec<String> = (0..3)
        .map(|n| format!("{{{}}}:k", tag_on(n, 800)))
        .collect();
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    for c in [&mut k, &mut d] {
        assert_eq!(
            c.cmd_text(&["CONFIG", "SET", "notify-keyspace-events", "KEA"])
                .await,
            "+OK\r\n"
        );
    }
    for resp3 in [false, true] {
        let (mut s, mut sd) = (kiln.conn().await, redis.conn().await);
        let (mut p, mut pd) = (kiln.conn().await, redis.conn().await);
        if resp3 {
            for c in [&mut s, &mut sd, &mut p, &mut pd] {
                c.cmd(&["HELLO", "3"]).await;
            }
        }
        subscribe_both(
            &mut s,
            &mut sd,
            &["SUBSCRIBE", "__keyevent@0__:set", "plain"],
        )
        .await;
        subscribe_both(
            &mut p,
            &mut pd,
            &["PSUBSCRIBE", "__keyspace@0__:*", "nothing*"],
        )
        .await;
        for key in &keys {
            for c in [&mut k, &mut d] {
                assert_eq!(c.cmd_text(&["SET", key, "v"]).await, "+OK\r\n");
            }
            assert_eq!(next(&mut s).await, next(&mut sd).await, "{key}");
            assert_eq!(next(&mut p).await, next(&mut pd).await, "{key}");
        }
        // A key expiring on its node: an event kiln never saw the cause of.
        for c in [&mut k, &mut d] {
            c.cmd(&["PEXPIRE", &keys[2], "100"]).await;
        }
        for _ in 0..2 {
            // pexpire, then expired
            assert_eq!(next(&mut p).await, next(&mut pd).await);
        }
        nothing_more(&mut s, resp3).await;
        nothing_more(&mut p, resp3).await;
        // Unsubscribing: the same confirmations, counts included.
        subscribe_both(
            &mut s,
            &mut sd,
            &["UNSUBSCRIBE", "plain", "__keyevent@0__:set"],
        )
        .await;
        subscribe_both(
            &mut p,
            &mut pd,
            &["PUNSUBSCRIBE", "__keyspace@0__:*", "nothing*"],
        )
        .await;
    }
}

/// `PUBLISH` through kiln counts the subscribers through kiln as one
/// Redis does, wherever the channel's slot is: a channel subscriber and a
/// pattern subscriber (the count was 0 when the subscription was on
/// another node; the message was delivered all the same). Each message
/// arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_counts_the_subscribers_through_kiln() {
    let (_cluster, kiln) = cluster_and_kiln().await;
    let redis = Redis::start();
    let chans: Vec<String> = (0..3)
        .map(|n| format!("news.{{{}}}", tag_on(n, 810)))
        .collect();
    let (mut s, mut sd) = (kiln.conn().await, redis.conn().await);
    let (mut p, mut pd) = (kiln.conn().await, redis.conn().await);
    let mut args = vec!["SUBSCRIBE"];
    args.extend(chans.iter().map(|c| &c[..]));
    subscribe_both(&mut s, &mut sd, &args).await;
    subscribe_both(&mut p, &mut pd, &["PSUBSCRIBE", "news.*"]).await;
    let (mut k, mut d) = (kiln.conn().await, redis.conn().await);
    // PUBSUB asks where the subscriptions are.
    let mut asks = vec![vec!["PUBSUB", "NUMPAT"], vec!["PUBSUB", "NUMSUB", "x"]];
    asks.extend(chans.iter().map(|ch| vec!["PUBSUB", "NUMSUB", ch]));
    for ask in &asks {
        assert_eq!(k.cmd_text(ask).await, d.cmd_text(ask).await, "{ask:?}");
    }
    for ch in &chans {
        let (got, want) = (
            k.cmd_text(&["PUBLISH", ch, "hi"]).await,
            d.cmd_text(&["PUBLISH", ch, "hi"]).await,
        );
        assert_eq!(got, want, "PUBLISH {ch}");
        assert_eq!(got, ":2\r\n");
        assert_eq!(next(&mut s).await, next(&mut sd).await);
        assert_eq!(next(&mut p).await, next(&mut pd).await);
    }
    // A channel nobody subscribed to.
    assert_eq!(k.cmd_text(&["PUBLISH", "other", "x"]).await, ":0\r\n");
    nothing_more(&mut s, false).await;
    nothing_more(&mut p, false).await;
    // Shard channels of two shards on one connection.
    let (mut ss, mut ssd) = (kiln.conn().await, redis.conn().await);
    for ch in &chans[..2] {
        subscribe_both(&mut ss, &mut ssd, &["SSUBSCRIBE", ch]).await;
    }
    for ch in &chans[..2] {
        for c in [&mut k, &mut d] {
            assert_eq!(c.cmd_text(&["SPUBLISH", ch, "s"]).await, ":1\r\n");
        }
        assert_eq!(next(&mut ss).await, next(&mut ssd).await);
    }
    // Unsubscribing from everything, then from nothing: the same frames.
    subscribe_both(&mut s, &mut sd, &["UNSUBSCRIBE", &chans[1]]).await;
    for c in [&mut s, &mut sd] {
        c.send(&["UNSUBSCRIBE"]).await;
    }
    // Redis names the channels in the order of its hash table: compare
    // the channels named and the counts, which go down one by one.
    let (mut got, mut want) = ((vec![], vec![]), (vec![], vec![]));
    for _ in 0..2 {
        for (c, into) in [(&mut s, &mut got), (&mut sd, &mut want)] {
            let f = next(c).await;
            let (head, count) = f.rsplit_once(':').expect("a count");
            into.0.push(head.to_string());
            into.1.push(count.to_string());
        }
    }
    got.0.sort();
    want.0.sort();
    assert_eq!(got, want);
    subscribe_both(&mut s, &mut sd, &["UNSUBSCRIBE", "x"]).await;
    // Patterns whose own slots are on three primaries, each matched by a
    // channel of the next primary, get each message once.
    let node = |name: &str| {
        let s = key_slot(name.as_bytes());
        (s > 5460) as usize + (s > 10922) as usize
    };
    let (pats, pchans): (Vec<String>, Vec<String>) = (0..3)
        .map(|n| {
            let pat = (0..)
                .map(|j| format!("p{j}.*"))
                .find(|p| node(p) == n)
                .expect("a pattern");
            let ch = (0..)
                .map(|m| pat.replace('*', &m.to_string()))
                .find(|c| node(c) == (n + 1) % 3)
                .expect("a channel");
            (pat, ch)
        })
        .unzip();
    let mut args = vec!["PSUBSCRIBE"];
    args.extend(pats.iter().map(|c| &c[..]));
    subscribe_both(&mut p, &mut pd, &args).await;
    for _ in 0..5 {
        for ch in pchans.iter().rev() {
            for c in [&mut k, &mut d] {
                assert_eq!(c.cmd_text(&["PUBLISH", ch, "m"]).await, ":1\r\n");
            }
        }
    }
    // Each message once. Their order is publish order as a rule (each
    // comes from the primary that ran its PUBLISH, before its reply), but
    // two primaries' connections are read apart: under load (CI) one
    // message can come before the one published just ahead of it on
    // another primary, as for a client of the cluster itself.
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        got.push(next(&mut p).await);
        want.push(next(&mut pd).await);
    }
    got.sort();
    want.sort();
    assert_eq!(got, want);
    nothing_more(&mut p, false).await;
    // Under CLIENT REPLY OFF, Redis 7 still writes the confirmations.
    for resp3 in [false, true] {
        let (mut r, mut rd) = (kiln.conn().await, redis.conn().await);
        for c in [&mut r, &mut rd] {
            if resp3 {
                c.cmd(&["HELLO", "3"]).await;
            }
            c.send(&["CLIENT", "REPLY", "OFF"]).await;
        }
        subscribe_both(&mut r, &mut rd, &["SUBSCRIBE", &chans[0], &chans[2]]).await;
        subscribe_both(&mut r, &mut rd, &["PSUBSCRIBE", "x*"]).await;
        // A PING's reply is not written (it would come before these).
        for c in [&mut r, &mut rd] {
            c.send(&["PING"]).await;
        }
        subscribe_both(&mut r, &mut rd, &["UNSUBSCRIBE", &chans[2], "no"]).await;
        subscribe_both(&mut r, &mut rd, &["PUNSUBSCRIBE", "x*"]).await;
        // The subscription kept is live on both. (Asked while the
        // subscriber is connected: a count just after it hangs up depends
        // on when its server reads the close, through kiln or not.)
        // Counted: this subscriber and `p`'s `news.*`.
        for c in [&mut k, &mut d] {
            assert_eq!(c.cmd_text(&["PUBLISH", &chans[0], "y"]).await, ":2\r\n");
        }
        assert_eq!(next(&mut r).await, next(&mut rd).await);
        assert_eq!(next(&mut p).await, next(&mut pd).await);
    }
}

/// What a fresh review found: `SUBSCRIBE` with no channel gets Redis's
/// arity error (it got no reply at all); a subscription to several
/// primaries pipelined with `QUIT` gets its confirmations before `+OK`
/// (the connection closed without them); during a busy script a
/// `SUBSCRIBE` gets one `-BUSY` and subscribes nothing (it got the
/// `-BUSY` among confirmations, and one channel silently unsubscribed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arity_quit_and_a_busy_script() {
    let (cluster, kiln) = cluster_and_kiln().await;
    let redis = Redis::start();
    for resp3 in [false, true] {
        let (mut s, mut sd) = (kiln.conn().await, redis.conn().await);
        if resp3 {
            s.cmd(&["HELLO", "3"]).await;
            sd.cmd(&["HELLO", "3"]).await;
        }
        for args in [
            &["SUBSCRIBE"][..],
            &["PSUBSCRIBE"],
            &["SSUBSCRIBE"],
            &["PING"],
        ] {
            assert_eq!(s.cmd_text(args).await, sd.cmd_text(args).await, "{args:?}");
        }
    }
    // Confirmations from every primary, then QUIT's +OK, then the close.
    let mut pipeline = Vec::new();
    for c in [
        &["SUBSCRIBE", "a"][..],
        &["PSUBSCRIBE", "b*"],
        &["SUBSCRIBE", "__keyspace@0__:x"],
        &["QUIT"],
    ] {
        pipeline.extend(crate::util::encode(c));
    }
    let (mut s, mut sd) = (kiln.conn().await, redis.conn().await);
    s.send_raw(&pipeline).await;
    sd.send_raw(&pipeline).await;
    for _ in 0..4 {
        assert_eq!(next(&mut s).await, next(&mut sd).await);
    }
    assert!(s.closed().await, "closed after +OK");
    // A script busy on the primary of `news`.
    let mut k = kiln.conn().await;
    assert_eq!(
        k.cmd_text(&["CONFIG", "SET", "busy-reply-threshold", "10"])
            .await,
        "+OK\r\n"
    );
    let busy_key = "news";
    let node = cluster.owner_port(key_slot(busy_key.as_bytes()));
    let mut runner = kiln.conn().await;
    runner
        .send(&["EVAL", "while true do end", "1", busy_key])
        .await;
    let mut direct = Conn::connect(([127, 0, 0, 1], node).into()).await;
    let busy = crate::util::poll_until(std::time::Duration::from_millis(10), async || match direct
        .cmd_text(&["PING"])
        .await
    {
        r if r.starts_with("-BUSY ") => Ok(r),
        r => Err(format!("not busy yet: {r}")),
    })
    .await;
    let mut s = kiln.conn().await;
    assert_eq!(
        s.cmd_text(&["SUBSCRIBE", "a", "news", "sports"]).await,
        busy
    );
    assert_eq!(k.cmd_text(&["SCRIPT", "KILL"]).await, "+OK\r\n");
    runner.read().await;
    // One reply, and nothing was subscribed: the client is not in
    // subscribed mode (a RESP2 subscriber's PING is `*2 pong`).
    crate::util::poll_until(std::time::Duration::from_millis(10), async || {
        match s.cmd_text(&["PING"]).await {
            r if r == "+PONG\r\n" => Ok(()),
            r => Err(format!("still {r}")),
        }
    })
    .await;
    assert_eq!(k.cmd_text(&["PUBLISH", "news", "x"]).await, ":0\r\n");
}
