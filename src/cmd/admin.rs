//! The `CACHE.*` admin commands, answered by kiln in the client's protocol
//! (RESP3 maps, RESP2 flat field/value arrays).
//!
//! # Format
//! - `CACHE.WARMUP [SYNC] [PHASE name ...] [MATCH pattern] [LIMIT n]` -> the
//!   trace id; with SYNC, the status once the run ends;
//!   `-BUSY warmup <id> is running` if one is. `CACHE.WARMUP CANCEL` -> OK.
//! - `CACHE.STATUS [JSON]` -> status fields, or the same as one JSON string.
//! - `CACHE.CLEAR` -> entries dropped. `CACHE.INVALIDATE key [key ...]` or
//!   `CACHE.INVALIDATE MATCH pattern` -> entries dropped. Upstream untouched.
//! - `CACHE.HOTKEYS [COUNT n]` -> keys and counts, hottest first.
//!
//! Accepted only from loopback clients unless `admin.allow_remote`; rate
//! limited per command across clients (`admin.rate_limits`).

use bytes::{Bytes, BytesMut};

use super::{Client, Flow, Replies, Then, arity_error};
use crate::cache::Source;
use crate::context::Context;
use crate::protocol::request::Command;
use crate::protocol::{Proto, encode};
use crate::warmup::{RunOptions, Snapshot};

pub fn is_admin(name: &[u8]) -> bool {
    name.starts_with(b"cache.")
}

/// Redis's reply to an unknown command.
fn unknown_command(args: &[Bytes]) -> String {
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&args[0])
    );
    let start = msg.len();
    for a in &args[1..] {
        if msg.len() - start >= 128 {
            break;
        }
        msg.push_str(&format!("'{}' ", String::from_utf8_lossy(a)));
    }
    msg
}

pub fn dispatch(c: &mut Client, name: &[u8], cmd: Command, r: &mut Replies<'_>) -> Flow {
    let a = &cmd.args;
    let lname = String::from_utf8_lossy(name).into_owned();
    if !crate::commands::is_admin_command(name) {
        r.error(&unknown_command(a));
        return Flow::Continue;
    }
    // With auth configured, the admin role decides instead (see `auth`).
    if !c.live.users.enabled() && !c.live.admin.admits(c.addr) {
        let msg = format!(
            "NOPERM {} is accepted only from loopback clients (admin.allow_remote = false)",
            lname.to_ascii_uppercase()
        );
        r.error(&msg);
        return Flow::Continue;
    }
    let arity_ok = match name {
        b"cache.status" => a.len() <= 2,
        b"cache.clear" | b"cache.reload" => a.len() == 1,
        b"cache.invalidate" => a.len() >= 2,
        // `COUNT` without its number is a syntax error, as Redis says it.
        b"cache.hotkeys" => a.len() <= 3,
        _ => true,
    };
    if !arity_ok {
        r.error(&arity_error(&lname));
        return Flow::Continue;
    }
    let cancel = name == b"cache.warmup" && a.len() == 2 && a[1].eq_ignore_ascii_case(b"CANCEL");
    if !cancel {
        if let Err(wait) = c.live.admin.take(&lname) {
            let msg = format!(
                "ERR rate limit exceeded for {}, retry in {wait}s",
                lname.to_ascii_uppercase()
            );
            r.error(&msg);
            return Flow::Continue;
        }
    }
    let ctx = c.ctx.clone();
    let proto = c.proto;
    match name {
        b"cache.warmup" if cancel => {
            if ctx.warmup.cancel() {
                r.ready(|o| encode::simple(o, "OK"));
            } else {
                r.error("ERR no warmup is running");
            }
        }
        b"cache.warmup" => {
            if !warmup(c, a, r) {
                c.live.admin.refund(&lname);
            }
        }
        b"cache.status" => {
            if a.len() == 2 && !a[1].eq_ignore_ascii_case(b"JSON") {
                r.error("ERR syntax error");
            } else {
                let fields = status_fields(&ctx, &ctx.warmup.snapshot());
                if a.len() == 2 {
                    let json = to_json(&fields).to_string();
                    r.ready(|o| encode::bulk(o, json.as_bytes()));
                } else {
                    r.ready(|o| encode_fields(o, &fields, proto));
                }
            }
        }
        b"cache.clear" => {
            let n = ctx.l1.clear(Source::Admin);
            r.ready(|o| encode::int(o, n as i64));
        }
        b"cache.reload" => match crate::reload::reload(&ctx) {
            Ok(applied) if applied.needs_restart.is_empty() => r.ready(|o| encode::simple(o, "OK")),
            Ok(applied) => {
                let text = format!(
                    "OK; kept running values, needs a restart: {}",
                    applied.needs_restart.join(", ")
                );
                r.ready(|o| encode::simple(o, &text));
            }
            Err(e) => r.error(&e.replace(['\r', '\n'], " ")),
        },
        b"cache.invalidate" => {
            let n = if a.len() == 3 && a[1].eq_ignore_ascii_case(b"MATCH") {
                ctx.l1.invalidate_matching(&a[2], Source::Admin)
            } else {
                a[1..]
                    .iter()
                    .map(|k| ctx.l1.invalidate(k, Source::Admin))
                    .sum()
            };
            r.ready(|o| encode::int(o, n as i64));
        }
        b"cache.hotkeys" => {
            let count = match a.len() {
                1 => Some(10),
                3 if a[1].eq_ignore_ascii_case(b"COUNT") => super::parse_i64(&a[2])
                    .filter(|n| *n > 0)
                    .map(|n| n as usize),
                _ => None,
            };
            match count.map(|n| ctx.warmup.hot_top(n)) {
                None => r.error("ERR syntax error"),
                Some(None) => {
                    r.error("ERR hot-key tracking is disabled (warmup.hotkeys.enabled = false)")
                }
                Some(Some(top)) => {
                    r.ready(|o| {
                        encode::map(o, top.len(), proto);
                        for (k, n) in &top {
                            encode::bulk(o, k);
                            encode::int(o, *n as i64);
                        }
                    });
                }
            }
        }
        _ => r.error(&unknown_command(a)),
    }
    Flow::Continue
}

/// The arguments of `CACHE.WARMUP [SYNC] [PHASE name...|MATCH pattern]
/// [LIMIT n]`: the run asked for and whether to wait for it, or the error.
fn warmup_args(c: &Client, a: &[Bytes]) -> Result<(RunOptions, bool), String> {
    let mut req = RunOptions::default();
    let mut sync = false;
    let keyword = |b: &[u8]| {
        ["SYNC", "PHASE", "MATCH", "LIMIT"]
            .iter()
            .any(|k| b.eq_ignore_ascii_case(k.as_bytes()))
    };
    let mut i = 1;
    while i < a.len() {
        let arg = &a[i];
        if arg.eq_ignore_ascii_case(b"SYNC") {
            sync = true;
            i += 1;
        } else if arg.eq_ignore_ascii_case(b"PHASE") {
            i += 1;
            let first = i;
            while i < a.len() && !keyword(&a[i]) {
                let name = String::from_utf8_lossy(&a[i]).into_owned();
                if !c.ctx.warmup.has_phase(&name) {
                    return Err(format!("ERR unknown warmup phase '{name}'"));
                }
                req.phases.push(name);
                i += 1;
            }
            if i == first {
                return Err("ERR syntax error".into());
            }
        } else if arg.eq_ignore_ascii_case(b"MATCH") && i + 1 < a.len() {
            req.pattern = Some(String::from_utf8_lossy(&a[i + 1]).into_owned());
            i += 2;
        } else if arg.eq_ignore_ascii_case(b"LIMIT") && i + 1 < a.len() {
            match super::parse_i64(&a[i + 1]) {
                Some(n) if n > 0 => req.limit = Some(n as u64),
                _ => {
                    return Err("ERR value is not an integer or out of range".into());
                }
            }
            i += 2;
        } else {
            return Err("ERR syntax error".into());
        }
    }
    if req.pattern.is_some() && !req.phases.is_empty() {
        return Err("ERR PHASE and MATCH cannot be combined".into());
    }
    Ok((req, sync))
}

/// `CACHE.WARMUP`: starts a run; `false` when none was started (a syntax
/// error, or `BUSY`).
fn warmup(c: &mut Client, a: &[Bytes], r: &mut Replies<'_>) -> bool {
    let (req, sync) = match warmup_args(c, a) {
        Ok(v) => v,
        Err(e) => {
            r.error(&e);
            return false;
        }
    };
    let ctx = c.ctx.clone();
    match ctx.warmup.start(req) {
        Err(busy) => {
            r.error(&format!("BUSY warmup {busy} is running"));
            return false;
        }
        Ok((id, _)) if !sync => r.ready(|o| encode::bulk(o, id.as_bytes())),
        Ok((_, done)) => {
            let proto = c.proto;
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                let _ = done.await;
                let mut out = BytesMut::new();
                encode_fields(
                    &mut out,
                    &status_fields(&ctx, &ctx.warmup.snapshot()),
                    proto,
                );
                let _ = tx.send(Ok(out.freeze()));
            });
            c.expect(r, rx, Then::Nothing);
        }
    }
    true
}

/// A status value, encodable as RESP2, RESP3 and JSON.
pub enum Val {
    Str(String),
    Int(i64),
    Float(f64),
    List(Vec<Vec<(&'static str, Val)>>),
}

pub fn status_fields(ctx: &Context, w: &Snapshot) -> Vec<(&'static str, Val)> {
    let (config_loaded, config_hash) = ctx.config.loaded();
    let load =
        |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as i64;
    let s = &ctx.l1.stats;
    let hits = s.hits.load();
    let misses = s.misses.load();
    let hit_rate = if hits + misses == 0 {
        0.0
    } else {
        hits as f64 / (hits + misses) as f64
    };
    let phases = w
        .phases
        .iter()
        .map(|p| {
            vec![
                ("name", Val::Str(p.name.clone())),
                ("status", Val::Str(p.status.into())),
                ("keys_planned", Val::Int(p.keys_planned as i64)),
                ("keys_warmed", Val::Int(p.keys_warmed as i64)),
                ("batches_failed", Val::Int(p.batches_failed as i64)),
                ("error", Val::Str(p.error.clone().unwrap_or_default())),
            ]
        })
        .collect();
    let mut fields = vec![
        ("status", Val::Str(w.status.into())),
        ("trace_id", Val::Str(w.trace_id.clone())),
        (
            "last_warmup",
            Val::Str(
                w.last_warmup
                    .map(|t| humantime::format_rfc3339_millis(t).to_string())
                    .unwrap_or_default(),
            ),
        ),
        ("duration_ms", Val::Int(w.duration.as_millis() as i64)),
        ("keys_warmed", Val::Int(w.keys_warmed as i64)),
        ("keys_too_large", Val::Int(w.keys_too_large as i64)),
        ("progress", Val::Str(format!("{}/{}", w.done, w.planned))),
        ("phases", Val::List(phases)),
        ("l1_entries", Val::Int(ctx.l1.len() as i64)),
        ("l1_bytes", Val::Int(ctx.l1.weight() as i64)),
        ("l1_capacity_bytes", Val::Int(ctx.l1.capacity() as i64)),
        ("hits", Val::Int(hits as i64)),
        ("misses", Val::Int(misses as i64)),
        ("hit_rate", Val::Float(hit_rate)),
        (
            "fills_rejected",
            Val::Int(ctx.l1.stats.fills_rejected.load() as i64),
        ),
        (
            "coherence",
            Val::Str(format!("{:?}:{}", ctx.coherence.mode, ctx.coherence.state()).to_lowercase()),
        ),
        (
            "tracking_table_max_keys",
            Val::Int(
                ctx.coherence
                    .tracking_table_max
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ),
        (
            "l1_entries_capacity",
            Val::Int(ctx.l1.entries_capacity() as i64),
        ),
        (
            "tracking_table_warning",
            Val::Str(
                ctx.coherence
                    .tracking_table_small(&ctx.l1)
                    .map(|(table, l1)| {
                        format!("{l1} keys held in L1 or tracked upstream, and upstream tracks at most {table} keys (tracking-table-max-keys): L1 churns; raise it or use coherence.mode = \"bcast\"")
                    })
                    .unwrap_or_default(),
            ),
        ),
        (
            "heat_reporting",
            Val::Str(ctx.l1.heat.reporting().as_str().into()),
        ),
        (
            "heat_touches",
            Val::Int(ctx.l1.heat.touches.load(std::sync::atomic::Ordering::Relaxed) as i64),
        ),
        ("audit_share", Val::Float(ctx.coherence.audit.share())),
        ("audit_reads", Val::Int(load(&ctx.coherence.audit.reads))),
        ("audit_stale", Val::Int(load(&ctx.coherence.audit.stale))),
        ("audit_races", Val::Int(load(&ctx.coherence.audit.races))),
        (
            "upstream",
            Val::Str(ctx.upstream.breaker.state().as_str().into()),
        ),
    ];
    fields.extend(topology_fields(ctx));
    fields.extend([
        ("uptime_s", Val::Int(ctx.started.elapsed().as_secs() as i64)),
        (
            "config_loaded",
            Val::Str(humantime::format_rfc3339_millis(config_loaded).to_string()),
        ),
        ("config_hash", Val::Str(config_hash)),
        ("version", Val::Str(env!("CARGO_PKG_VERSION").into())),
    ]);
    fields
}

/// What upstream is (SPEC 3a): `topology` (`standalone`, `cluster` or
/// `sentinel`), `primary` (the node a standalone or Sentinel upstream's
/// connections go to), `cluster_primaries` and `cluster_slots` (each
/// primary's slot ranges), redirections and topology refreshes, Sentinel
/// failovers and the last one's recovery time.
fn topology_fields(ctx: &Context) -> Vec<(&'static str, Val)> {
    use std::sync::atomic::Ordering::Relaxed;
    let up = &ctx.upstream;
    let kind = match (up.cluster(), up.sentinel()) {
        (Some(_), _) => "cluster",
        (None, Some(_)) => "sentinel",
        (None, None) => "standalone",
    };
    let mut out = vec![
        ("topology", Val::Str(kind.into())),
        ("primary", Val::Str(up.primary().unwrap_or_default())),
    ];
    let (primaries, slots, moved, ask, refreshes) = match up.cluster() {
        Some(r) => {
            let ranges = r.describe();
            let mut names: Vec<&String> = ranges.iter().map(|r| &r.0).collect();
            names.sort();
            names.dedup();
            let list = ranges
                .iter()
                .map(|(node, first, last)| {
                    vec![
                        ("node", Val::Str(node.clone())),
                        ("slots", Val::Str(format!("{first}-{last}"))),
                    ]
                })
                .collect();
            (
                names.len() as i64,
                list,
                r.stats.moved.load(Relaxed) as i64,
                r.stats.ask.load(Relaxed) as i64,
                r.stats.refreshes.load(Relaxed) as i64,
            )
        }
        None => (0, Vec::new(), 0, 0, 0),
    };
    let (mut failovers, recovery) = up.sentinel().map_or((0, 0), |f| {
        (
            f.failovers.load(Relaxed) as i64,
            f.last_recovery_ms.load(Relaxed) as i64,
        )
    });
    if let Some(r) = up.cluster() {
        failovers += r.stats.failovers.load(Relaxed) as i64;
    }
    out.extend([
        ("cluster_primaries", Val::Int(primaries)),
        ("cluster_slots", Val::List(slots)),
        ("redirections_moved", Val::Int(moved)),
        ("redirections_ask", Val::Int(ask)),
        ("topology_refreshes", Val::Int(refreshes)),
        ("failovers", Val::Int(failovers)),
        ("last_failover_recovery_ms", Val::Int(recovery)),
    ]);
    out
}

pub fn encode_fields(o: &mut BytesMut, fields: &[(&'static str, Val)], proto: Proto) {
    encode::map(o, fields.len(), proto);
    for (k, v) in fields {
        encode::bulk(o, k.as_bytes());
        match v {
            Val::Str(s) => encode::bulk(o, s.as_bytes()),
            Val::Int(n) => encode::int(o, *n),
            Val::Float(f) => match proto {
                Proto::Resp3 => {
                    o.extend_from_slice(format!(",{f}\r\n").as_bytes());
                }
                Proto::Resp2 => encode::bulk(o, f.to_string().as_bytes()),
            },
            Val::List(items) => {
                encode::array(o, items.len());
                for item in items {
                    encode_fields(o, item, proto);
                }
            }
        }
    }
}

pub fn to_json(fields: &[(&'static str, Val)]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in fields {
        let j = match v {
            Val::Str(s) => serde_json::Value::from(s.clone()),
            Val::Int(n) => serde_json::Value::from(*n),
            Val::Float(f) => serde_json::Value::from(*f),
            Val::List(items) => {
                serde_json::Value::Array(items.iter().map(|i| to_json(i)).collect())
            }
        };
        m.insert(k.to_string(), j);
    }
    serde_json::Value::Object(m)
}
