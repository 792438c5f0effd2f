//! Load for tests: tasks that run until told to stop and count what they
//! did, and a stress run of direct writes against reads through kiln with
//! its drain check. Every wait is bounded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use super::{Kiln, Redis, WAIT};

/// Tasks that run until `stop`, sharing a stop flag and a counter.
pub struct Workers<T> {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<T>>,
}

impl<T: Send + 'static> Default for Workers<T> {
    fn default() -> Self {
        Workers {
            stop: Default::default(),
            count: Default::default(),
            tasks: Vec::new(),
        }
    }
}

impl<T: Send + 'static> Workers<T> {
    /// Spawns `work(stop, count)`: a task that runs until `stop` is set,
    /// adding what it did to `count`.
    pub fn spawn<F>(&mut self, work: impl FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) -> F)
    where
        F: Future<Output = T> + Send + 'static,
    {
        let task = work(self.stop.clone(), self.count.clone());
        self.tasks.push(tokio::spawn(task));
    }

    /// What the tasks counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits (bounded by `WAIT`) until the tasks counted `n`: the load is
    /// really running.
    pub async fn wait_count(&self, n: u64, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.count() < n {
            assert!(Instant::now() < deadline, "{what} never got going");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Tells every task to stop and waits for them (bounded by `WAIT`
    /// each): their results, in the order they were spawned.
    pub async fn stop(&mut self) -> Vec<T> {
        self.stop.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        for t in std::mem::take(&mut self.tasks) {
            let r = tokio::time::timeout(WAIT, t)
                .await
                .expect("the tasks stop in time")
                .expect("task");
            out.push(r);
        }
        out
    }
}

/// A command's arguments.
pub type Args = Vec<String>;

/// What a stress run did: writes sent directly, reads sent through kiln.
pub struct Stressed {
    pub writes: u64,
    pub reads: u64,
}

/// `writers` tasks send `write(w, n)` straight to `redis` (n = 0, 1, ...)
/// while `readers` tasks send each of `read(n)` through `kiln` (n = r,
/// r + 1, ...), every reply to a read passed to `check`, for `run`.
pub async fn stress(
    redis: &Redis,
    kiln: &Kiln,
    (writers, readers): (usize, usize),
    run: Duration,
    write: impl Fn(usize, usize) -> Args + Send + Sync + 'static,
    read: impl Fn(usize) -> Vec<Args> + Send + Sync + 'static,
    check: fn(&Args, &[u8]),
) -> Stressed {
    let (write, read) = (Arc::new(write), Arc::new(read));
    let mut w_tasks = Workers::default();
    for w in 0..writers {
        let (write, mut d) = (write.clone(), redis.conn().await);
        w_tasks.spawn(|stop, writes| async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                d.cmd(&write(w, n)).await;
                n += 1;
                writes.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut r_tasks = Workers::default();
    for r in 0..readers {
        let (read, mut c) = (read.clone(), kiln.conn().await);
        r_tasks.spawn(|stop, reads| async move {
            let mut n = r;
            while !stop.load(Ordering::Relaxed) {
                for args in read(n) {
                    check(&args, &c.cmd(&args).await);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        });
    }
    tokio::time::sleep(run).await;
    w_tasks.stop().await;
    r_tasks.stop().await;
    Stressed {
        writes: w_tasks.count(),
        reads: r_tasks.count(),
    }
}

/// Once the writes stopped: polls (bounded by `WAIT`) until kiln answers
/// each of `probes` as `redis` does directly, then asks again (from L1
/// now), where every answer must agree too. `what` names the run in a
/// failure. How many probes differed on the first poll.
pub async fn drain(redis: &Redis, kiln: &Kiln, probes: &[Args], what: &str) -> usize {
    let (mut d, mut k) = (redis.conn().await, kiln.conn().await);
    let deadline = Instant::now() + WAIT;
    let mut first_pass_stale = None;
    loop {
        let mut stale = Vec::new();
        for args in probes {
            if k.cmd(args).await != d.cmd(args).await {
                stale.push(args);
            }
        }
        first_pass_stale.get_or_insert(stale.len());
        if stale.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: stale after drain: {stale:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for args in probes {
        assert_eq!(
            k.cmd(args).await,
            d.cmd(args).await,
            "{what}: {args:?} stale"
        );
    }
    first_pass_stale.unwrap_or(0)
}
