//! Live reload (`SIGHUP`, `CACHE.RELOAD`): the config file is read again,
//! merged with the command-line flags and validated as at start. An invalid
//! file changes nothing and the error names the key and line. A valid one
//! is put in force at once, with no connection dropped: `[cache]` (the L1
//! drops the entries whose rule, TTL or rollout share changed), `[warmup]`,
//! `[alerts]`, `[admin]`, the `[server]` client limits, `deny_commands`,
//! users and `requirepass` (clients logged in stay logged in; a removed
//! user's connections are closed), `[server.tls]` (new handshakes), and
//! `log.level`.
//!
//! What cannot change in a running process keeps its running value and is
//! reported as needing a restart: listen addresses, `server.threads`,
//! `upstream.*`, `coherence.*`, `metrics.*`, `log.format`, and the hot-key
//! sketch's size (`warmup.hotkeys`).

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use crate::config::Config;
use crate::context::{ClientSettings, Context, Loaded, hash_text};

/// What a reload did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Dotted keys whose values changed and are now in force.
    pub changed: Vec<String>,
    /// Dotted keys that changed in the file but keep their running values.
    pub needs_restart: Vec<String>,
    /// L1 entries dropped because their rule, TTL or share changed.
    pub dropped: usize,
    /// Client connections closed because their user was removed.
    pub closed: usize,
}

/// The keys a running process cannot change, as config paths.
const RESTART_ONLY: &[&str] = &[
    "server.listen",
    "server.threads",
    "upstream",
    "coherence.mode",
    "coherence.check_interval",
    "metrics",
    "log.format",
    "warmup.hotkeys",
];

/// Re-reads and applies the config file. `Err` is the message to show
/// (key and line for a bad value); nothing has changed then.
pub fn reload(ctx: &Context) -> Result<Applied, String> {
    let result = try_reload(ctx);
    let i = usize::from(result.is_err());
    ctx.config.results[i].fetch_add(1, Ordering::Relaxed);
    match &result {
        Ok(a) => tracing::info!(
            changed = ?a.changed,
            needs_restart = ?a.needs_restart,
            l1_dropped = a.dropped,
            clients_closed = a.closed,
            "config reloaded"
        ),
        Err(e) => {
            // The reply's RESP error code is for the client, not the log.
            let e = e.strip_prefix("ERR ").unwrap_or(e);
            tracing::error!(error = %e, "config reload rejected; the running config stays in force")
        }
    }
    result
}

fn try_reload(ctx: &Context) -> Result<Applied, String> {
    let Some((path, overrides)) = ctx.config.source() else {
        return Err("ERR no config file to reload (kiln was started without --config)".into());
    };
    let (mut new, text) = Config::load(&path).map_err(|e| format!("ERR {path}: {e}"))?;
    new.apply(&overrides);
    new.validate(&text)
        .map_err(|e| format!("ERR {path}: {e}"))?;
    check_db(ctx, &new).map_err(|e| format!("ERR {path}: {e}"))?;
    let mut current = ctx.config.current();
    let old = &current.config;
    let mut applied = Applied::default();
    // Restart-only keys keep their running values.
    for key in RESTART_ONLY {
        // The URL is compared as written: serialized, its password is
        // redacted, and a new password must not pass unnoticed.
        let url_moved = *key == "upstream" && old.upstream.url != new.upstream.url;
        if url_moved || value_at(old, key) != value_at(&new, key) {
            applied.needs_restart.push((*key).to_string());
        }
    }
    new.server.listen = old.server.listen.clone();
    new.server.threads = old.server.threads;
    new.upstream = old.upstream.clone();
    // Of `[coherence]`, only the audit's share applies live.
    new.coherence = crate::config::CoherenceConfig {
        audit_share: new.coherence.audit_share,
        ..old.coherence.clone()
    };
    new.metrics = old.metrics.clone();
    new.log.format = old.log.format;
    new.warmup.hotkeys = old.warmup.hotkeys.clone();
    // Turning TLS on or off changes what the listener speaks: a restart
    // (a new certificate or key for it applies live).
    if old.server.tls.is_some() != new.server.tls.is_some() {
        applied.needs_restart.push("server.tls".into());
        new.server.tls = old.server.tls.clone();
    }
    // In bcast mode the upstream channel tracks the prefixes of what is
    // cached, fixed when it was opened: rules that would cache other
    // keys (never invalidated) wait for a restart.
    if old.coherence.mode == crate::config::CoherenceMode::Bcast
        && crate::coherence::bcast_prefixes(&old.cache)
            != crate::coherence::bcast_prefixes(&new.cache)
    {
        applied
            .needs_restart
            .push("cache.rules (bcast prefixes)".into());
        new.cache.rules = old.cache.rules.clone();
        new.cache.ttl = old.cache.ttl;
    }
    applied.changed = changed_keys(old, &new);
    // Build what can fail first, so a failure changes nothing.
    let live = ClientSettings::new(&new).map_err(|e| format!("ERR {path}: {e}"))?;
    live.admin.inherit(&ctx.live().admin);
    crate::telemetry::set_level(&new.log.level)
        .map_err(|e| format!("ERR {path}: log.level: {e}"))?;
    ctx.set_live(live);
    // Both as the open-files limit holds them (see `fdlimit`).
    let held =
        |c: &Config| crate::fdlimit::max_clients(c.server.max_clients, c.upstream.max_sessions);
    ctx.set_max_clients(held(old), held(&new));
    applied.dropped = ctx.l1.configure(&new.cache);
    ctx.warmup.configure(&new.warmup);
    ctx.health.configure(&new.alerts);
    ctx.coherence.audit.configure(new.coherence.audit_share);
    applied.closed = close_removed_users(ctx);
    *current = Loaded {
        config: new,
        at: SystemTime::now(),
        hash: hash_text(&text),
    };
    Ok(applied)
}

/// Closes the connections of clients logged in as a user the config in
/// force no longer has (when client auth is on at all).
/// A database the described upstream does not have is refused, as at
/// start (`Context::new`): the file would not start kiln again. It is a
/// restart-only key, so nothing running changes either way.
fn check_db(ctx: &Context, new: &Config) -> Result<(), String> {
    use crate::config::Topology;
    let (db, key) = match new.topology() {
        Ok(Topology::Standalone(a)) => (a.db, "upstream.url"),
        Ok(Topology::Sentinel { primary, .. }) => (primary.db, "upstream.sentinel.db"),
        _ => return Ok(()),
    };
    let databases = ctx.databases.load(Ordering::Relaxed);
    if ctx.table.load().from_upstream && db >= databases {
        return Err(crate::context::db_out_of_range(key, db, databases));
    }
    Ok(())
}

fn close_removed_users(ctx: &Context) -> usize {
    let live = ctx.live();
    if !live.users.enabled() {
        return 0;
    }
    let clients: Vec<_> = ctx.clients().values().cloned().collect();
    let mut closed = 0;
    for m in clients {
        let st = m.state().clone();
        if st.logged_in && live.users.role_of(&st.user).is_none() {
            tracing::info!(client = m.id, user = %st.user, "user removed by reload: closing its connection");
            m.stop.kill();
            closed += 1;
        }
    }
    closed
}

/// The TOML value at a dotted path of a config (secrets come out redacted,
/// so a changed password shows as a changed user, see `changed_keys`).
fn value_at(cfg: &Config, path: &str) -> Option<toml::Value> {
    let mut v = toml::Value::try_from(cfg).ok()?;
    for part in path.split('.') {
        v = v.get(part)?.clone();
    }
    Some(v)
}

/// The dotted keys whose values differ between two configs. Secrets are
/// compared, never printed.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if let (Ok(a), Ok(b)) = (toml::Value::try_from(old), toml::Value::try_from(new)) {
        diff("", &a, &b, &mut out);
    }
    let pass = |c: &Config| {
        (
            c.server
                .requirepass
                .as_ref()
                .map(|p| p.expose().to_string()),
            c.users
                .iter()
                .map(|u| (u.name.clone(), u.password.expose().to_string()))
                .collect::<Vec<_>>(),
        )
    };
    if pass(old) != pass(new) && !out.iter().any(|k| k == "users") {
        out.push("passwords".into());
    }
    out
}

fn diff(prefix: &str, a: &toml::Value, b: &toml::Value, out: &mut Vec<String>) {
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => diff(&path, p, q, out),
                    _ => out.push(path),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_leaves_and_passwords() {
        let old = Config::default();
        let mut new = Config::default();
        new.cache.ttl = std::time::Duration::from_secs(1);
        new.server.max_clients = 5;
        assert_eq!(
            changed_keys(&old, &new),
            ["cache.ttl", "server.max_clients"]
        );
        let mut with_pass = Config::default();
        with_pass.server.requirepass = Some(crate::config::Secret("a".into()));
        let mut other_pass = with_pass.clone();
        other_pass.server.requirepass = Some(crate::config::Secret("b".into()));
        let keys = changed_keys(&with_pass, &other_pass);
        assert!(keys.contains(&"passwords".to_string()), "{keys:?}");
        assert!(!format!("{keys:?}").contains('b'));
    }

    #[test]
    fn restart_only_values_are_found() {
        let mut new = Config::default();
        new.upstream.connections = 9;
        let old = Config::default();
        assert_ne!(value_at(&old, "upstream"), value_at(&new, "upstream"));
        assert_eq!(value_at(&old, "metrics"), value_at(&new, "metrics"));
    }

    #[test]
    fn hash_is_short_and_stable() {
        assert_eq!(hash_text("a"), hash_text("a"));
        assert_ne!(hash_text("a"), hash_text("b"));
        assert_eq!(hash_text("a").len(), 16);
    }
}
