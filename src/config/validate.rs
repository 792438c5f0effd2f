//! `Config::validate`: the checks serde cannot make, one function per
//! table, each error naming the key and, when the file set it, its line.
//! TLS files are loaded here (`tls`), so a bad certificate stops
//! check-config rather than the first client.

use std::net::SocketAddr;
use std::time::Duration;

use super::text::{element_line, error_line, line_of, nth_table_line};
use crate::config::{
    CoherenceMode, Config, ConfigError, GIB, LineRef, MAX_AFTER_HITS, Topology, UpstreamAddr,
    parse_rate, valid_log_filter,
};

/// The shortest `warmup.interval` accepted.
pub const MIN_WARMUP_INTERVAL: Duration = Duration::from_secs(1);

impl Config {
    /// Checks values serde cannot; `text` is the file, for line numbers.
    /// The first fault found is returned, tables in file order.
    pub fn validate(&self, text: &str) -> Result<(), ConfigError> {
        self.check_upstream_and_limits(text)?;
        self.check_cache(text)?;
        self.check_warmup(text)?;
        self.check_ops(text)?;
        self.check_users(text)?;
        self.check_log(text)?;
        Ok(())
    }

    /// Listen addresses, the upstream topology and TLS on both sides,
    /// the `[server]` and `[upstream]` limits and timeouts.
    fn check_upstream_and_limits(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        for (key, addr) in [
            ("server.listen", &self.server.listen),
            ("metrics.listen", &self.metrics.listen),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(bad(key, format!("`{addr}` is not an ip:port address")));
            }
        }
        let upstream = self.validate_topology(text)?;
        if let Some(tls) = &self.server.tls {
            crate::tls::acceptor(&tls.cert, &tls.key)
                .map_err(|e| bad(&format!("server.tls.{}", e.key), e.message))?;
        }
        if let Some(ca) = &self.upstream.tls_ca {
            if !upstream.tls {
                return Err(bad(
                    "upstream.tls_ca",
                    "set, but upstream.url is not rediss://".into(),
                ));
            }
            crate::tls::connector(Some(ca)).map_err(|m| bad("upstream.tls_ca", m))?;
        }
        if upstream.tls {
            crate::tls::server_name(&upstream.host).map_err(|m| bad("upstream.url", m))?;
            if self.upstream.tls_ca.is_none() {
                // Something must verify upstream's certificate: the
                // system's roots, when there are any.
                crate::tls::connector(None).map_err(|m| bad("upstream.url", m))?;
            }
        }
        let positive = [
            ("server.max_clients", self.server.max_clients as u64),
            ("server.max_bulk_len", self.server.max_bulk_len),
            ("server.max_multibulk_len", self.server.max_multibulk_len),
            ("server.max_inline_len", self.server.max_inline_len),
            ("server.max_output_buffer", self.server.max_output_buffer),
            ("server.max_pipeline", self.server.max_pipeline as u64),
            ("upstream.connections", self.upstream.connections as u64),
            ("upstream.max_sessions", self.upstream.max_sessions as u64),
            (
                "upstream.breaker.failures",
                self.upstream.breaker.failures as u64,
            ),
            (
                "upstream.breaker.half_open_probes",
                self.upstream.breaker.half_open_probes as u64,
            ),
            ("cache.max_memory", self.cache.max_memory),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        if self.upstream.connections > 64 {
            return Err(bad("upstream.connections", "must be at most 64".into()));
        }
        if self.server.max_bulk_len > 4 * GIB {
            return Err(bad("server.max_bulk_len", "must be at most 4GiB".into()));
        }
        for (key, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.command_timeout", self.upstream.command_timeout),
            ("coherence.check_interval", self.coherence.check_interval),
            ("upstream.breaker.open_for", self.upstream.breaker.open_for),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        Ok(())
    }

    /// `[cache]`: value size against memory, cached commands, refresh-ahead,
    /// adaptive TTL and each rule.
    fn check_cache(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        if self.cache.max_value_size > self.cache.max_memory / 4 {
            // Blame the key the file sets: a small max_memory with the
            // default max_value_size is the common case.
            let key = if line_of(text, "cache.max_value_size").is_some()
                || line_of(text, "cache.max_memory").is_none()
            {
                "cache.max_value_size"
            } else {
                "cache.max_memory"
            };
            return Err(bad(
                key,
                format!(
                    "cache.max_value_size ({} bytes) must be at most a quarter of cache.max_memory ({} bytes): raise max_memory or set max_value_size lower",
                    self.cache.max_value_size, self.cache.max_memory
                ),
            ));
        }
        let cached = crate::commands::reads::mask(&self.cache.commands).map_err(|(name, m)| {
            ConfigError::Invalid {
                key: "cache.commands".into(),
                line: LineRef(
                    element_line(text, line_of(text, "cache.commands"), &name)
                        .or_else(|| line_of(text, "cache.commands")),
                ),
                message: m,
            }
        })?;
        let a = self.coherence.audit_share;
        if !(0.0..=1.0).contains(&a) {
            return Err(bad(
                "coherence.audit_share",
                format!("{a} must be a share between 0 (off) and 1 (every hit), such as 0.001"),
            ));
        }
        let r = self.cache.refresh_ahead;
        if !(r == 0.0 || (r > 0.0 && r < 1.0)) {
            return Err(bad(
                "cache.refresh_ahead",
                format!("{r} must be 0 (off) or a fraction between 0 and 1 such as 0.8"),
            ));
        }
        if let Some(a) = &self.cache.adaptive_ttl {
            let key = if line_of(text, "cache.adaptive_ttl").is_some() {
                "cache.adaptive_ttl"
            } else {
                "cache.adaptive_ttl.max"
            };
            if self.coherence.mode == CoherenceMode::Ttl {
                return Err(bad(
                    key,
                    "cannot be used with coherence.mode = \"ttl\": with no invalidations, a longer life only means staler reads".into(),
                ));
            }
            if a.max.is_zero() {
                return Err(bad(key, "max must be greater than 0".into()));
            }
            let most = MAX_AFTER_HITS;
            if a.after_hits == 0 || a.after_hits > most {
                return Err(bad(
                    key,
                    format!(
                        "after_hits must be between 1 and {most} (an entry counts that many hits)"
                    ),
                ));
            }
        }
        for (i, rule) in self.cache.rules.iter().enumerate() {
            if let Some(cmds) = &rule.commands {
                let header = nth_table_line(text, "cache.rules", i);
                let commands_line = element_line(text, header, "commands");
                let at = |name: Option<&str>, message: String| ConfigError::Invalid {
                    key: format!("cache.rules[{i}].commands"),
                    line: LineRef(
                        name.and_then(|n| element_line(text, commands_line, n))
                            .or(commands_line)
                            .or(header),
                    ),
                    message,
                };
                crate::commands::reads::mask(cmds).map_err(|(n, m)| at(Some(&n), m))?;
                if let Some(wider) = cmds.iter().find(|c| {
                    crate::commands::reads::mask(std::slice::from_ref(*c))
                        .is_ok_and(|m| m & !cached != 0)
                }) {
                    return Err(at(
                        Some(wider),
                        format!(
                            "`{}` is not in cache.commands: a rule can only narrow what cache.commands caches",
                            wider.to_ascii_uppercase()
                        ),
                    ));
                }
            }
            if rule.pattern.is_empty() {
                return Err(ConfigError::Invalid {
                    key: format!("cache.rules[{i}].match"),
                    line: LineRef(nth_table_line(text, "cache.rules", i)),
                    message: "must not be empty".into(),
                });
            }
            if rule.percent > 100 {
                return Err(ConfigError::Invalid {
                    key: format!("cache.rules[{i}].percent"),
                    line: LineRef(nth_table_line(text, "cache.rules", i)),
                    message: "must be between 0 and 100".into(),
                });
            }
        }
        Ok(())
    }

    /// `[warmup]`: sizes, the schedule or interval, timeouts and phases.
    fn check_warmup(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        let w = &self.warmup;
        for (key, v) in [
            ("warmup.max_keys", w.max_keys),
            ("warmup.batch_size", w.batch_size as u64),
            ("warmup.concurrency", w.concurrency as u64),
            ("warmup.hotkeys.keep", w.hotkeys.keep as u64),
            ("warmup.hotkeys.sample", w.hotkeys.sample as u64),
        ] {
            if v == 0 {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        if w.schedule.is_some() && w.interval.is_some() {
            return Err(bad(
                "warmup.interval",
                "set either warmup.schedule or warmup.interval, not both".into(),
            ));
        }
        if let Some(expr) = &w.schedule {
            let fields = expr.split_whitespace().count();
            if fields != 5 && !expr.trim_start().starts_with('@') {
                return Err(bad(
                    "warmup.schedule",
                    format!(
                        "`{expr}` has {fields} fields; a cron expression has 5 (minute hour day-of-month month day-of-week)"
                    ),
                ));
            }
            let cron = expr.parse::<croner::Cron>().map_err(|e| {
                bad(
                    "warmup.schedule",
                    format!("`{expr}` is not a cron expression: {e}"),
                )
            })?;
            if cron
                .find_next_occurrence(&chrono::Utc::now(), false)
                .is_err()
            {
                return Err(bad(
                    "warmup.schedule",
                    format!("`{expr}` never fires: no date matches it (a 30 February?)"),
                ));
            }
        }
        // A run reads every hot key and may take seconds; runs closer
        // than this would only queue behind each other.
        if w.interval.is_some_and(|d| d < MIN_WARMUP_INTERVAL) {
            return Err(bad(
                "warmup.interval",
                format!("must be at least {MIN_WARMUP_INTERVAL:?}"),
            ));
        }
        for (key, d) in [
            ("warmup.op_timeout", w.op_timeout),
            ("warmup.lock.ttl", w.lock.ttl),
            ("warmup.hotkeys.save_every", w.hotkeys.save_every),
        ] {
            if d.is_zero() {
                return Err(bad(key, "must be greater than 0".into()));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in w.phase.iter().enumerate() {
            let at = |message: String| ConfigError::Invalid {
                key: format!("warmup.phase[{i}]"),
                line: LineRef(nth_table_line(text, "warmup.phase", i)),
                message,
            };
            if p.patterns.is_empty() || p.patterns.iter().any(|m| m.is_empty()) {
                return Err(at("`match` needs at least one non-empty pattern".into()));
            }
            if !names.insert(p.name.to_ascii_lowercase()) {
                return Err(at(format!("phase name `{}` is used twice", p.name)));
            }
        }
        Ok(())
    }

    /// `[alerts]` thresholds and `[admin]` rate limits.
    fn check_ops(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        let a = &self.alerts;
        for (key, v) in [
            ("alerts.miss_rate", a.miss_rate),
            ("alerts.hit_rate_warning", a.hit_rate_warning),
            ("alerts.hit_rate_critical", a.hit_rate_critical),
            ("alerts.penetration_warning", a.penetration_warning),
            ("alerts.penetration_critical", a.penetration_critical),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(key, format!("{v} is not a fraction between 0 and 1")));
            }
        }
        // Each critical threshold lies past its warning one, or the
        // critical alert would fire before (or without) the warning. The
        // error names whichever of the two the file sets.
        for (warning, critical, (w, c), inverted, side) in [
            (
                "alerts.hit_rate_warning",
                "alerts.hit_rate_critical",
                (a.hit_rate_warning, a.hit_rate_critical),
                a.hit_rate_critical > a.hit_rate_warning,
                "at most",
            ),
            (
                "alerts.penetration_warning",
                "alerts.penetration_critical",
                (a.penetration_warning, a.penetration_critical),
                a.penetration_critical < a.penetration_warning,
                "at least",
            ),
        ] {
            if inverted {
                let key = match error_line(text, critical) {
                    Some(_) => critical,
                    None => warning,
                };
                return Err(bad(
                    key,
                    format!(
                        "{critical} ({c}) must be {side} {warning} ({w}): the critical alert would fire before the warning"
                    ),
                ));
            }
        }
        if a.window < Duration::from_secs(1) {
            return Err(bad("alerts.window", "must be at least 1s".into()));
        }
        let mut named: Vec<String> = Vec::new();
        for (cmd, rate) in &self.admin.rate_limits {
            // Commands are case-insensitive: two spellings of one would
            // leave which limit applies to chance.
            let upper = cmd.to_ascii_uppercase();
            if let Some(other) = named.iter().find(|n| n.to_ascii_uppercase() == upper) {
                return Err(bad(
                    "admin.rate_limits",
                    format!("`{other}` and `{cmd}` name the same command; keep one"),
                ));
            }
            named.push(cmd.clone());
            if !crate::commands::is_admin_command(cmd.as_bytes()) {
                let known: Vec<String> = crate::commands::ADMIN
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
                    .collect();
                return Err(bad(
                    "admin.rate_limits",
                    format!(
                        "`{cmd}` is not one of kiln's commands ({})",
                        known.join(", ")
                    ),
                ));
            }
            parse_rate(rate).map_err(|m| bad("admin.rate_limits", m))?;
        }
        Ok(())
    }

    /// `server.requirepass` and `[[users]]`: names, passwords, no user twice.
    fn check_users(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        if self
            .server
            .requirepass
            .as_ref()
            .is_some_and(|p| p.0.is_empty())
        {
            return Err(bad("server.requirepass", "must not be empty".into()));
        }
        let mut seen = std::collections::HashSet::new();
        if self.server.requirepass.is_some() {
            seen.insert("default".to_string());
        }
        for (i, u) in self.users.iter().enumerate() {
            let at = |message: String| ConfigError::Invalid {
                key: format!("users[{i}]"),
                line: LineRef(nth_table_line(text, "users", i)),
                message,
            };
            if u.name.is_empty() || u.name.contains(char::is_whitespace) {
                return Err(at(format!("`{}` is not a user name", u.name)));
            }
            if u.password.0.is_empty() {
                return Err(at("password must not be empty".into()));
            }
            if !seen.insert(u.name.clone()) {
                return Err(at(format!(
                    "user `{}` is defined twice (server.requirepass is the `default` user's password)",
                    u.name
                )));
            }
        }
        Ok(())
    }

    /// `log.level`: a level or a filter of `target=level` directives.
    fn check_log(&self, text: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| invalid(text, key, message);
        if !valid_log_filter(&self.log.level) {
            return Err(bad(
                "log.level",
                format!("`{}` is not a log level or filter", self.log.level),
            ));
        }
        Ok(())
    }

    /// `topology`, with errors naming the key and line; returns the
    /// address of credentials and TLS every node is reached with.
    fn validate_topology(&self, text: &str) -> Result<UpstreamAddr, ConfigError> {
        let url_line = line_of(text, "upstream.url");
        let cluster_line = line_of(text, "upstream.cluster");
        let sentinel_line = text
            .lines()
            .position(|l| l.trim() == "[upstream.sentinel]")
            .map(|i| i + 1);
        let set = [
            ("upstream.url", url_line),
            (
                "upstream.cluster",
                cluster_line.or(self.upstream.cluster.as_ref().map(|_| 0)),
            ),
            (
                "upstream.sentinel",
                sentinel_line.or(self.upstream.sentinel.as_ref().map(|_| 0)),
            ),
        ];
        let named: Vec<_> = set.iter().filter(|(_, l)| l.is_some()).collect();
        if named.len() > 1 {
            let (key, line) = named[1];
            return Err(ConfigError::Invalid {
                key: key.to_string(),
                line: LineRef(line.filter(|l| *l > 0)),
                message: format!(
                    "set together with {}: give exactly one of upstream.url, upstream.cluster, [upstream.sentinel]",
                    named[0].0
                ),
            });
        }
        let key = if self.upstream.cluster.is_some() {
            "upstream.cluster"
        } else if self.upstream.sentinel.is_some() {
            "upstream.sentinel"
        } else {
            "upstream.url"
        };
        let line = match key {
            "upstream.sentinel" => sentinel_line,
            k => line_of(text, k),
        };
        let invalid = |message: String| ConfigError::Invalid {
            key: key.to_string(),
            line: LineRef(line),
            message,
        };
        if self.upstream.topology_refresh.is_zero() {
            return Err(ConfigError::Invalid {
                key: "upstream.topology_refresh".into(),
                line: LineRef(line_of(text, "upstream.topology_refresh")),
                message: "must be more than 0".into(),
            });
        }
        match self.topology().map_err(invalid)? {
            Topology::Standalone(a) => Ok(a),
            Topology::Cluster(seeds) => {
                if seeds.iter().any(|s| s.db != 0) {
                    return Err(ConfigError::Invalid {
                        key: key.into(),
                        line: LineRef(line),
                        message:
                            "names a database other than 0: a Redis Cluster has only database 0"
                                .into(),
                    });
                }
                Ok(seeds[0].clone())
            }
            Topology::Sentinel { primary, .. } => Ok(UpstreamAddr {
                host: "sentinel".into(),
                ..primary
            }),
        }
    }
}

/// `key` is invalid for `message`, at the line the file sets it on.
fn invalid(text: &str, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        line: LineRef(error_line(text, key)),
        message,
    }
}
