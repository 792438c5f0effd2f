//! Client authentication and roles (`server.requirepass`, `[[users]]`).
//!
//! With neither set, every client is the passwordless `default` user with
//! every permission, as in Redis (admin commands are then loopback-only, see
//! `admin`). With either set, a new connection is unauthenticated: only
//! `AUTH`, `HELLO ... AUTH`, `QUIT` and `RESET` are accepted, everything else
//! gets `-NOAUTH Authentication required.` `requirepass` is the password of
//! the `default` user, with the admin role.
//!
//! Roles: `read` runs commands that do not write; `write` runs everything
//! but Redis `admin`-flagged commands (CONFIG, SHUTDOWN, DEBUG, MONITOR,
//! CLIENT KILL, ...) and `CACHE.*`; `admin` runs everything. A command a
//! role may not run gets Redis's own `-NOPERM` text.
//!
//! Passwords are compared in constant time (in the length of what the
//! client sent) and never logged: `check-config` prints them redacted.

use std::sync::Arc;

use bytes::Bytes;

use crate::config::{Config, Role};
use crate::context::Context;

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

pub const NOAUTH: &str = "NOAUTH Authentication required.";
pub const WRONGPASS: &str = "WRONGPASS invalid username-password pair or user is disabled.";

/// Commands an unauthenticated client may send.
pub fn allowed_before_auth(name: &[u8]) -> bool {
    matches!(name, b"auth" | b"hello" | b"quit" | b"reset")
}

/// Commands kiln answers about the client itself: every role may run them.
fn about_self(name: &[u8], args: &[Bytes]) -> bool {
    match name {
        b"ping" | b"echo" | b"select" | b"hello" | b"auth" | b"quit" | b"reset" => true,
        b"client" => args.get(1).is_some_and(|s| {
            super::clients::ABOUT_SELF
                .iter()
                .any(|sub| s.eq_ignore_ascii_case(sub))
        }),
        _ => false,
    }
}

/// Whether `role` may run this command; the `-NOPERM` error if not.
pub fn permit(ctx: &Context, role: Role, name: &[u8], args: &[Bytes]) -> Result<(), String> {
    if role == Role::Admin || matches!(name, b"get" | b"mget") || about_self(name, args) {
        return Ok(());
    }
    let denied = name.starts_with(b"cache.")
        || ctx.table.is_admin(args)
        || (role == Role::Read && ctx.table.write_keys(args).is_some());
    if !denied {
        return Ok(());
    }
    let mut shown = String::from_utf8_lossy(name).into_owned();
    if ctx.table.get(name).is_some_and(|i| i.container) {
        if let Some(sub) = args.get(1) {
            shown.push('|');
            shown.push_str(&String::from_utf8_lossy(sub).to_ascii_lowercase());
        }
    }
    Err(format!(
        "NOPERM this user has no permissions to run the '{shown}' command"
    ))
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
}
