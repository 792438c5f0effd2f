//! kiln's clients as other clients see them (`CLIENT LIST`, `CLIENT KILL`,
//! `CLIENT UNBLOCK`): one `ClientMeta` per connection, registered in
//! `Context::clients`, and the `Stop` that ends a client's task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::worker::lock;

/// One of kiln's clients as other clients see it: `CLIENT LIST`,
/// `CLIENT KILL`, and the kiln ids that `CLIENT UNBLOCK` and
/// `CLIENT TRACKING ... REDIRECT` name. Created with the connection and
/// removed when it ends.
pub struct ClientMeta {
    pub id: u64,
    pub addr: SocketAddr,
    /// The listener address the client connected to (`laddr=`).
    pub laddr: SocketAddr,
    /// The client socket's file descriptor (`fd=`), -1 if unknown.
    pub fd: i32,
    pub connected: Instant,
    /// Ends the client's task: `CLIENT KILL`, a reload that removed its
    /// user, or kiln shutting down.
    pub stop: Stop,
    /// The upstream client id of the connection this client is pinned to
    /// (its session or relay connection), read when a command names this
    /// client; `None` while it has none.
    pub pinned: Mutex<Option<Arc<AtomicU64>>>,
    pub state: Mutex<ClientState>,
    /// Another client redirected its tracking here while this one had no
    /// upstream connection of its own to receive the pushes: the one opened
    /// for it (`cmd::clients::redirect_target`), which the client's task
    /// relays once it is idle and out of any session.
    pub adopt: Mutex<Option<crate::upstream::RawSession>>,
    pub adopt_asked: tokio::sync::Notify,
    /// The upstream user the client's commands run as (`Client::upstream_as`),
    /// for a connection opened on its behalf.
    pub upstream_as: Mutex<crate::upstream::As>,
}

/// What tells a client's task to end: kiln shutting down (`shut_down`:
/// the connection writes what it owes, then closes) or `CLIENT KILL`
/// (`kill`: it closes at once, dropping what it was owed, as Redis frees a
/// killed client). The task polls it on every wake-up, so a poll is two
/// atomic operations (a load and a waker registration that keeps the same
/// waker), where a `CancellationToken`'s takes a lock and registers a
/// waiter: 6% of a forwarded command's instructions at `-P 1`.
#[derive(Default)]
pub struct Stop {
    /// `RUNNING`, `SHUTTING_DOWN` or `KILLED`; only ever raised.
    state: std::sync::atomic::AtomicU8,
    waker: atomic_waker::AtomicWaker,
}

impl Stop {
    pub const SHUTTING_DOWN: u8 = 1;
    pub const KILLED: u8 = 2;

    /// `CLIENT KILL`: the connection closes at once.
    pub fn kill(&self) {
        self.raise(Stop::KILLED);
    }

    /// kiln is stopping: the connection takes no more commands, writes
    /// what it owes and closes.
    pub fn shut_down(&self) {
        self.raise(Stop::SHUTTING_DOWN);
    }

    fn raise(&self, to: u8) {
        self.state
            .fetch_max(to, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake();
    }

    /// Ready once the state is `level` (`SHUTTING_DOWN` or `KILLED`) or
    /// past it; the task is woken when it gets there.
    pub fn poll_reached(&self, cx: &mut std::task::Context<'_>, level: u8) -> std::task::Poll<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.state.load(SeqCst) >= level {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.state.load(SeqCst) >= level {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }
}

/// The changing part of `ClientMeta`, updated by the client's own task
/// (the command name once per batch of commands read).
#[derive(Debug, Clone)]
pub struct ClientState {
    pub name: Option<String>,
    pub db: u32,
    pub user: String,
    pub resp: u8,
    /// The last command, lowercase, `name|sub` for a container (`cmd=`).
    pub cmd: String,
    pub last_active: Instant,
    /// Authenticated (or auth is off): a reload that removes its user
    /// closes the connection.
    pub logged_in: bool,
    /// Commands queued in MULTI; -1 outside a transaction (`multi=`).
    pub multi: i64,
    /// Waiting in a blocking command (`b` flag).
    pub blocked: bool,
    /// Relayed as a subscriber, a monitor or with its own tracking.
    pub relay: Option<RelayKind>,
    pub sub: usize,
    pub psub: usize,
    pub ssub: usize,
    /// `CLIENT TRACKING ... REDIRECT` target, a kiln id; -1 for none.
    pub redir: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayKind {
    Pubsub,
    Monitor,
    Tracking,
}

impl ClientMeta {
    pub fn new(id: u64, addr: SocketAddr, laddr: SocketAddr, fd: i32, db: u32) -> ClientMeta {
        let now = Instant::now();
        ClientMeta {
            id,
            addr,
            laddr,
            fd,
            connected: now,
            stop: Stop::default(),
            pinned: Mutex::new(None),
            adopt: Mutex::new(None),
            adopt_asked: tokio::sync::Notify::new(),
            upstream_as: Mutex::new(None),
            state: Mutex::new(ClientState {
                name: None,
                db,
                user: "default".into(),
                logged_in: false,
                resp: 2,
                cmd: "NULL".into(),
                last_active: now,
                multi: -1,
                blocked: false,
                relay: None,
                sub: 0,
                psub: 0,
                ssub: 0,
                redir: -1,
            }),
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, ClientState> {
        lock(&self.state)
    }

    /// Pins the client to an upstream connection whose id is in `id`, or
    /// unpins it.
    pub fn pin(&self, id: Option<Arc<AtomicU64>>) {
        *lock(&self.pinned) = id;
    }

    /// Upstream's id of the connection this client is pinned to.
    pub fn upstream_id(&self) -> Option<u64> {
        lock(&self.pinned)
            .as_ref()
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|id| *id != 0)
    }
}
