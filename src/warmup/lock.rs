//! The fleet lock: one warmup at a time across every kiln sharing an
//! upstream. Taken with `SET key owner NX PX ttl`; extended and released
//! only by its owner (Lua compare-then-PEXPIRE / compare-then-DEL), so an
//! instance whose lock expired and was taken over cannot touch the new
//! owner's lock.

use std::time::Duration;

use bytes::Bytes;

use crate::error::UpstreamError;
use crate::protocol::request::encode_command;
use crate::upstream::Link;

const EXTEND: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                      return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                       return redis.call('DEL', KEYS[1]) else return 0 end";

pub struct FleetLock {
    conn: Link,
    key: String,
    owner: String,
    ttl_ms: String,
}

async fn call(conn: &Link, args: &[&str]) -> Result<Bytes, UpstreamError> {
    conn.send(encode_command(args), None, true)
        .await
        .unwrap_or_else(|_| Err(UpstreamError::Lost("request dropped".into())))
}

fn is_one(reply: &[u8]) -> Result<bool, UpstreamError> {
    match reply {
        b":1\r\n" => Ok(true),
        b":0\r\n" => Ok(false),
        other => Err(UpstreamError::Setup(
            String::from_utf8_lossy(other).trim_end().to_string(),
        )),
    }
}

impl FleetLock {
    /// `Ok(None)` when another owner holds it.
    pub async fn acquire(
        conn: Link,
        key: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<FleetLock>, UpstreamError> {
        let ttl_ms = ttl.as_millis().max(1).to_string();
        let reply = call(&conn, &["SET", key, owner, "NX", "PX", &ttl_ms]).await?;
        match &reply[..] {
            b"+OK\r\n" => Ok(Some(FleetLock {
                conn,
                key: key.to_string(),
                owner: owner.to_string(),
                ttl_ms,
            })),
            b"$-1\r\n" | b"_\r\n" => Ok(None),
            other => Err(UpstreamError::Setup(
                String::from_utf8_lossy(other).trim_end().to_string(),
            )),
        }
    }

    /// Pushes the expiry out again; `false` if the lock is no longer ours.
    pub async fn extend(&self) -> Result<bool, UpstreamError> {
        is_one(
            &call(
                &self.conn,
                &["EVAL", EXTEND, "1", &self.key, &self.owner, &self.ttl_ms],
            )
            .await?,
        )
    }

    /// Deletes the lock if it is still ours; `false` if it was not.
    pub async fn release(&self) -> Result<bool, UpstreamError> {
        is_one(&call(&self.conn, &["EVAL", RELEASE, "1", &self.key, &self.owner]).await?)
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }
}
