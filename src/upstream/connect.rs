//! How one upstream connection is made: the `Connector` (address, TLS,
//! credentials, database, protocol, the setup commands, bounded by
//! `connect_timeout` and counted against the breaker), the client
//! credentials a connection may run as (`Creds`), and what every node's
//! connections share (`Common`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::UpstreamAddr;
use crate::error::{ErrorCounts, UpstreamError};
use crate::protocol::Proto;
use crate::protocol::scan::Scanner;
use crate::tls::Stream;
use crate::upstream::breaker;
use crate::upstream::breaker::Breaker;
use crate::upstream::request::ReaderSpec;

/// How to open one upstream connection in a given state.
pub struct Connector {
    pub(crate) addr: UpstreamAddr,
    /// `host:port` to connect to, read at each connect: a Sentinel-managed
    /// node's changes on failover.
    pub(crate) target: Arc<arc_swap::ArcSwap<String>>,
    /// Bumped when `target` changes: connections made before move.
    pub(crate) moves: Arc<Moves>,
    pub(crate) db: u32,
    pub(crate) proto: Proto,
    pub(crate) connect_timeout: Duration,
    pub command_timeout: Duration,
    /// Commands run after protocol, auth and database are set.
    pub(crate) extra: Vec<Vec<Vec<u8>>>,
    /// Where this connection's failures are counted.
    pub errors: Arc<ErrorCounts>,
    pub breaker: Arc<Breaker>,
    /// For a `rediss://` upstream.
    pub(crate) tls: Option<UpstreamTls>,
    /// Ask upstream for the connection's `CLIENT ID` after setup: a
    /// connection pinned to one client (session, relay) is what kiln's
    /// `CLIENT UNBLOCK`, `CLIENT TRACKING ... REDIRECT` name upstream.
    pub(crate) want_id: bool,
}

/// How to wrap an upstream connection in TLS.
#[derive(Clone)]
pub struct UpstreamTls {
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) name: rustls::pki_types::ServerName<'static>,
}

impl Connector {
    /// A connect step, bounded by `connect_timeout`; its failure names the
    /// target (and `what` failed: "" for TCP, "TLS: ").
    pub(crate) async fn within<T>(
        &self,
        target: &str,
        what: &str,
        step: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> Result<T, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, step).await {
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr: target.to_string(),
                after: self.connect_timeout,
            }),
            Ok(Err(e)) => Err(UpstreamError::Connect {
                addr: target.to_string(),
                reason: format!("{what}{e}"),
            }),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Counts a failure, and tells the breaker when it was upstream's.
    /// When that opens the circuit on a node that could not be reached, the
    /// node is watched until it accepts connections again (see
    /// `Breaker::upstream_back`); a refused set-up or an overdue reply
    /// comes from a node that accepts connections, which then says nothing.
    pub fn failed(&self, e: &UpstreamError) {
        self.errors.count(e);
        if e.is_upstream_failure() && self.breaker.failure() && e.is_unreachable() {
            self.watch_recovery();
        }
    }

    /// Tries a TCP connect to the node every `breaker::RECOVERY_POLL` while
    /// its circuit is open, and ends the open window at the first success.
    fn watch_recovery(&self) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (target, breaker, limit) = (
            self.target.clone(),
            self.breaker.clone(),
            self.connect_timeout,
        );
        rt.spawn(async move {
            while breaker.state() == breaker::State::Open {
                tokio::time::sleep(breaker::RECOVERY_POLL).await;
                let to = target.load_full();
                if let Ok(Ok(_)) =
                    tokio::time::timeout(limit, TcpStream::connect(to.as_str())).await
                {
                    breaker.upstream_back();
                    return;
                }
            }
        });
    }

    /// Whether upstream accepts a new TCP connection within
    /// `connect_timeout`: told apart from a reply that is only slow, an
    /// unreachable upstream is the one reason to give up on a request in
    /// flight.
    pub async fn reachable(&self) -> Result<(), UpstreamError> {
        let target = self.target();
        self.within(&target, "", TcpStream::connect(&target))
            .await
            .map(drop)
    }

    /// Waits for `step` (setup replies) as long as upstream stays
    /// reachable: setup replies, like any reply, may be slow (a script,
    /// `DEBUG SLEEP`, `CLIENT PAUSE`). `Err` once it is not reachable.
    pub(crate) async fn patiently<T>(
        &self,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, UpstreamError> {
        tokio::pin!(step);
        loop {
            tokio::select! {
                r = &mut step => return Ok(r),
                _ = tokio::time::sleep(self.connect_timeout) => self.reachable().await?,
            }
        }
    }

    pub(crate) fn target(&self) -> String {
        self.target.load().as_ref().clone()
    }

    /// How many times the node's address changed: a connection made at an
    /// older generation goes to an old address.
    pub fn generation(&self) -> u64 {
        self.moves
            .generation
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the node is between primaries (a Sentinel failover in
    /// progress): requests wait rather than go to either.
    pub fn paused(&self) -> bool {
        self.moves.paused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Connects and brings the connection to the wanted protocol, user and
    /// database. Also returns what upstream sent after the setup replies.
    pub async fn connect(&self) -> Result<(Stream, BytesMut), UpstreamError> {
        self.connect_with_id().await.map(|(s, b, _)| (s, b))
    }

    /// `connect`, plus upstream's id of the connection when the connector
    /// asks for it (0 otherwise, or when upstream refuses `CLIENT ID`).
    pub async fn connect_with_id(&self) -> Result<(Stream, BytesMut, u64), UpstreamError> {
        let target = self.target();
        let stream = self
            .within(&target, "", TcpStream::connect(&target))
            .await?;
        let _ = stream.set_nodelay(true);
        let mut stream = match &self.tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let handshake = tls.connector.connect(tls.name.clone(), stream);
                Stream::Tls(Box::new(self.within(&target, "TLS: ", handshake).await?))
            }
        };
        let mut cmds: Vec<Vec<Vec<u8>>> = Vec::new();
        let auth: Option<Vec<Vec<u8>>> = self.addr.password.as_ref().map(|p| {
            let user = self
                .addr
                .username
                .clone()
                .unwrap_or_else(|| "default".into());
            vec![user.into_bytes(), p.clone().into_bytes()]
        });
        match (self.proto, auth) {
            (Proto::Resp3, Some(a)) => {
                let mut c = vec![b"HELLO".to_vec(), b"3".to_vec(), b"AUTH".to_vec()];
                c.extend(a);
                cmds.push(c);
            }
            (Proto::Resp3, None) => cmds.push(vec![b"HELLO".to_vec(), b"3".to_vec()]),
            (Proto::Resp2, Some(a)) => {
                let mut c = vec![b"AUTH".to_vec()];
                c.extend(a);
                cmds.push(c);
            }
            (Proto::Resp2, None) => {}
        }
        if self.db != 0 {
            cmds.push(vec![b"SELECT".to_vec(), self.db.to_string().into_bytes()]);
        }
        cmds.extend(self.extra.iter().cloned());
        let mut leftover = BytesMut::new();
        let timed_out = || UpstreamError::ConnectTimeout {
            addr: target.clone(),
            after: self.connect_timeout,
        };
        if !cmds.is_empty() {
            let setup = setup(&mut stream, &cmds);
            (_, leftover) = self.patiently(setup).await.map_err(|_| timed_out())??;
        }
        let mut id = 0;
        if self.want_id && leftover.is_empty() {
            let client_id = [b"CLIENT".to_vec(), b"ID".to_vec()];
            let ask = ask(&mut stream, &client_id);
            let reply = self.patiently(ask).await.map_err(|_| timed_out())??;
            id = crate::protocol::reply::integer(&reply).map_or(0, |n| n as u64);
        }
        Ok((stream, leftover, id))
    }
}

/// An upstream ACL user a client logged in as through kiln (see
/// `cmd::local` AUTH): its commands go over connections authenticated as
/// that user, so upstream's ACLs decide as they would directly. Never
/// printed: it holds a password.
#[derive(PartialEq, Eq, Hash)]
pub struct Creds {
    pub user: String,
    pub(crate) pass: Vec<u8>,
}

impl Creds {
    pub fn new(user: &[u8], pass: &[u8]) -> Creds {
        Creds {
            user: String::from_utf8_lossy(user).into_owned(),
            pass: pass.to_vec(),
        }
    }
}

impl std::fmt::Debug for Creds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Creds({}, <redacted>)", self.user)
    }
}

/// Whose connections: kiln's own upstream user (`None`) or a client's.
pub type As = Option<Arc<Creds>>;

/// What every node's connections are made with.
pub(crate) struct Common {
    pub(crate) per_key: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
    pub(crate) reader_spec: ReaderSpec,
    pub(crate) errors: Arc<ErrorCounts>,
    pub(crate) breaker: crate::config::BreakerConfig,
    pub(crate) tls_ca: Option<String>,
}

impl Common {
    pub(crate) fn tls_for(&self, addr: &UpstreamAddr) -> Result<Option<UpstreamTls>, String> {
        if !addr.tls {
            return Ok(None);
        }
        Ok(Some(UpstreamTls {
            connector: crate::tls::connector(self.tls_ca.as_deref())?,
            name: crate::tls::server_name(&addr.host)?,
        }))
    }
}

/// A node's address changes (Sentinel): see `Connector::generation` and
/// `Connector::paused`.
#[derive(Default)]
pub(crate) struct Moves {
    pub(crate) generation: std::sync::atomic::AtomicU64,
    pub(crate) paused: std::sync::atomic::AtomicBool,
}

/// Sends one command on a freshly set up stream and reads its reply,
/// error replies included.
pub(crate) async fn ask<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cmd: &[Vec<u8>],
) -> Result<Bytes, UpstreamError> {
    send_setup(stream, std::slice::from_ref(&cmd.to_vec())).await?;
    read_one(stream, &mut BytesMut::new()).await
}

/// Writes `cmds` on a stream being set up, and flushes them.
pub(crate) async fn send_setup<S: AsyncWrite + Unpin>(
    stream: &mut S,
    cmds: &[Vec<Vec<u8>>],
) -> Result<(), UpstreamError> {
    let mut out = BytesMut::new();
    for c in cmds {
        crate::protocol::request::encode_command_into(&mut out, c);
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| UpstreamError::Setup(e.to_string()))?;
    stream
        .flush()
        .await
        .map_err(|e| UpstreamError::Setup(e.to_string()))
}

/// Reads exactly one reply from a freshly connected stream (setup commands).
pub(crate) async fn read_one<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Bytes, UpstreamError> {
    let mut scanner = Scanner::new();
    loop {
        if let Some(f) = scanner
            .next_frame(buf)
            .map_err(|e| UpstreamError::Setup(e.to_string()))?
        {
            return Ok(buf.split_to(f.len).freeze());
        }
        match stream.read_buf(buf).await {
            Ok(0) => {
                return Err(UpstreamError::Setup(
                    "connection closed during setup".into(),
                ));
            }
            Ok(_) => {}
            Err(e) => return Err(UpstreamError::Setup(e.to_string())),
        }
    }
}

/// Sends `cmds` and checks that none was refused. Returns their replies and
/// whatever arrived after them (or pushes that came between them), which
/// belongs to the connection's next reader: once tracking is on,
/// invalidations may follow the last reply at once, and dropping part of one
/// would leave the stream mid-frame.
pub(crate) async fn setup<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    cmds: &[Vec<Vec<u8>>],
) -> Result<(Vec<Bytes>, BytesMut), UpstreamError> {
    send_setup(stream, cmds).await?;
    let mut buf = BytesMut::new();
    let mut replies = Vec::with_capacity(cmds.len());
    let mut pushes = BytesMut::new();
    for c in cmds {
        let mut r = read_one(stream, &mut buf).await?;
        while r.first() == Some(&b'>') {
            pushes.extend_from_slice(&r);
            r = read_one(stream, &mut buf).await?;
        }
        if r.starts_with(b"-BUSY") || r.starts_with(b"-LOADING") {
            let text = String::from_utf8_lossy(r[1..].trim_ascii_end()).into_owned();
            return Err(UpstreamError::Busy(text));
        }
        if r.first() == Some(&b'-') || r.first() == Some(&b'!') {
            let name = String::from_utf8_lossy(&c[0]).into_owned();
            let text = String::from_utf8_lossy(r.trim_ascii_end()).into_owned();
            // A database upstream does not have: say which setting names
            // it (kiln started before upstream could be asked).
            let hint = match text.contains("DB index is out of range") {
                true => {
                    " (the database upstream.url or upstream.sentinel.db names is beyond upstream's `databases`)"
                }
                false => "",
            };
            return Err(UpstreamError::Setup(format!(
                "{name}: {}{hint}",
                &text[1..]
            )));
        }
        replies.push(r);
    }
    pushes.extend_from_slice(&buf);
    Ok((replies, pushes))
}
