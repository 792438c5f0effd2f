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

use bytes::Bytes;

use crate::commands::CommandTable;
use crate::config::Role;

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
pub fn permit(table: &CommandTable, role: Role, name: &[u8], args: &[Bytes]) -> Result<(), String> {
    if role == Role::Admin || matches!(name, b"get" | b"mget") || about_self(name, args) {
        return Ok(());
    }
    let denied = name.starts_with(b"cache.")
        || table.is_admin(args)
        || (role == Role::Read && table.write_keys(args).is_some());
    if !denied {
        return Ok(());
    }
    let mut shown = String::from_utf8_lossy(name).into_owned();
    if table.get(name).is_some_and(|i| i.container) {
        if let Some(sub) = args.get(1) {
            shown.push('|');
            shown.push_str(&String::from_utf8_lossy(sub).to_ascii_lowercase());
        }
    }
    Err(format!(
        "NOPERM this user has no permissions to run the '{shown}' command"
    ))
}
