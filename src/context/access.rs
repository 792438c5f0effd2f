//! Who may do what, as `Context` holds it: client users and their roles
//! (`Users`, from `server.requirepass` and `[[users]]`), the admin
//! commands' rate limits and loopback rule (`AdminLimits`, `[admin]`), and
//! upstream's ACL answers for reads L1 serves (`Permissions`). The checks
//! that use them live with the commands (`cmd::auth`, `cmd::admin`,
//! `cmd::acl`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::{ADMIN_DEFAULT_RATE, AdminConfig, Config, Role, parse_rate};
use crate::upstream::Creds;
use crate::worker::lock;

/// One user kiln knows. No `Debug`: it holds a password.
pub struct User {
    pub name: String,
    password: Vec<u8>,
    pub role: Role,
}

/// The configured users; empty when auth is off.
#[derive(Default)]
pub struct Users {
    users: Vec<Arc<User>>,
}

impl Users {
    pub fn new(cfg: &Config) -> Users {
        let mut users: Vec<Arc<User>> = cfg
            .users
            .iter()
            .map(|u| {
                Arc::new(User {
                    name: u.name.clone(),
                    password: u.password.expose().as_bytes().to_vec(),
                    role: u.role,
                })
            })
            .collect();
        if let Some(p) = &cfg.server.requirepass {
            users.push(Arc::new(User {
                name: "default".into(),
                password: p.expose().as_bytes().to_vec(),
                role: Role::Admin,
            }));
        }
        Users { users }
    }

    /// The role of the user named `name`, if it exists.
    pub fn role_of(&self, name: &str) -> Option<Role> {
        self.users.iter().find(|u| u.name == name).map(|u| u.role)
    }

    /// Whether clients must authenticate.
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// The user these credentials name, or `None` for a wrong pair. Every
    /// user's password is compared, so the time taken does not say which
    /// user exists.
    pub fn check(&self, name: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let mut found = None;
        for u in &self.users {
            let pass_ok = ct_eq(&u.password, password);
            if pass_ok & (u.name.as_bytes() == name) {
                found = Some(u.clone());
            }
        }
        found
    }
}

/// Constant-time equality: the time depends only on `given`'s length.
fn ct_eq(secret: &[u8], given: &[u8]) -> bool {
    let mut diff = (secret.len() != given.len()) as u8;
    for (i, &g) in given.iter().enumerate() {
        // Wraps over the secret rather than branching on its length.
        let s = secret
            .get(i % secret.len().max(1))
            .copied()
            .unwrap_or_default();
        diff |= s ^ g;
    }
    std::hint::black_box(diff) == 0
}

/// Rate limits and access rules for admin commands.
pub struct AdminLimits {
    allow_remote: bool,
    rates: HashMap<String, (u32, Duration)>,
    default: (u32, Duration),
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl AdminLimits {
    pub fn new(cfg: &AdminConfig) -> AdminLimits {
        let rates = cfg
            .rate_limits
            .iter()
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), parse_rate(v).ok()?)))
            .collect();
        AdminLimits {
            allow_remote: cfg.allow_remote,
            rates,
            default: parse_rate(ADMIN_DEFAULT_RATE).unwrap_or((60, Duration::from_secs(60))),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Gives back the token `take` took for `name` (lowercase): the
    /// command was refused (a `CACHE.WARMUP` while one runs, a syntax
    /// error), and only what ran counts against the rate.
    pub fn refund(&self, name: &str) {
        let (count, _) = self.rates.get(name).copied().unwrap_or(self.default);
        if let Some((tokens, _)) = lock(&self.buckets).get_mut(name) {
            *tokens = (*tokens + 1.0).min(count as f64);
        }
    }

    /// Whether a client at `addr` may run admin commands.
    pub fn admits(&self, addr: std::net::SocketAddr) -> bool {
        self.allow_remote || addr.ip().is_loopback()
    }

    /// Takes a token for `name` (lowercase); `Err(seconds)` to wait.
    /// Carries the rate-limit state of `old` over, so a reload does not
    /// hand out fresh tokens.
    pub fn inherit(&self, old: &AdminLimits) {
        let old = lock(&old.buckets).clone();
        *lock(&self.buckets) = old;
    }

    pub fn take(&self, name: &str) -> Result<(), u64> {
        let (count, per) = self.rates.get(name).copied().unwrap_or(self.default);
        let refill = count as f64 / per.as_secs_f64();
        let mut buckets = lock(&self.buckets);
        let now = Instant::now();
        let (tokens, last) = buckets
            .entry(name.to_string())
            .or_insert((count as f64, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * refill).min(count as f64);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - *tokens) / refill).ceil() as u64)
        }
    }
}

/// Most (user, command, key) answers kept; past it they are all dropped
/// and learned again, so the table stays bounded.
const MAX_ENTRIES: usize = 100_000;

/// Upstream's answers to `ACL DRYRUN`, by user, then (command, key).
#[derive(Default)]
pub struct Permissions {
    known: Mutex<Known>,
}

#[derive(Default)]
struct Known {
    /// The ACL generation (`Coherence::acl_changes`) these answers are for.
    generation: u64,
    /// By user name first, so a lookup borrows the name rather than
    /// copying it (one per GET of such a user).
    map: HashMap<String, HashMap<(&'static str, Bytes), bool>>,
    /// Answers held, over every user.
    len: usize,
}

impl Permissions {
    /// Whether `who` may run `cmd key`: `Some` when upstream said so for
    /// the ACLs in force, `None` when not known yet.
    pub fn allowed(
        &self,
        generation: u64,
        who: &Creds,
        cmd: &'static str,
        key: &Bytes,
    ) -> Option<bool> {
        let mut k = lock(&self.known);
        if k.generation != generation {
            k.map.clear();
            k.len = 0;
            k.generation = generation;
            return None;
        }
        k.map
            .get(who.user.as_str())?
            .get(&(cmd, key.clone()))
            .copied()
    }

    pub fn learned(
        &self,
        generation: u64,
        user: &str,
        cmd: &'static str,
        key: Bytes,
        allowed: bool,
    ) {
        let mut k = lock(&self.known);
        if k.generation != generation {
            return;
        }
        if k.len >= MAX_ENTRIES {
            k.map.clear();
            k.len = 0;
        }
        let fresh = k
            .map
            .entry(user.to_string())
            .or_default()
            .insert((cmd, key), allowed)
            .is_none();
        k.len += usize::from(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret1"));
        assert!(!ct_eq(b"secret", b"secre"));
        assert!(!ct_eq(b"secret", b""));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
        // Wrapping must not make a repeated secret equal.
        assert!(!ct_eq(b"ab", b"abab"));
    }

    #[test]
    fn only_loopback_unless_remote_is_allowed() {
        let mut cfg = AdminConfig::default();
        let local: std::net::SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let local6: std::net::SocketAddr = "[::1]:5000".parse().expect("addr");
        let remote: std::net::SocketAddr = "192.0.2.7:5000".parse().expect("addr");
        let limits = AdminLimits::new(&cfg);
        assert!(limits.admits(local) && limits.admits(local6) && !limits.admits(remote));
        cfg.allow_remote = true;
        assert!(AdminLimits::new(&cfg).admits(remote));
    }

    #[test]
    fn token_buckets_refuse_past_the_rate() {
        let limits = AdminLimits::new(&AdminConfig::default());
        assert!(limits.take("cache.clear").is_ok() && limits.take("cache.clear").is_ok());
        let wait = limits.take("cache.clear").expect_err("2/min spent");
        assert!((1..=30).contains(&wait), "{wait}");
        assert!(
            (0..60).all(|_| limits.take("cache.status").is_ok()),
            "60/min by default"
        );
        assert!(limits.take("cache.status").is_err());
    }
}
