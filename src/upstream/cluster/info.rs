//! `INFO` in front of a cluster: one reply describing the whole data set
//! as one Redis would, from every primary's (issue 23). Counters and gauges
//! of the `Clients`, `Memory`, `Stats`, `CPU` and `Keyspace` sections are
//! summed (`db0:keys=...,expires=...` too, `avg_ttl` the largest; and
//! `Errorstats`, code by code, every node's codes shown); ratios,
//! human-readable values, limits and settings, and every other section
//! (`Server`, `Replication`, `Persistence`, `Commandstats`, ...) are the
//! first primary's. `blocked_clients` leaves out kiln's own role watchers
//! (one blocked `WAIT` per watched primary, `watch.rs`). docs/cluster.md
//! lists the same.

use bytes::Bytes;

/// The sections whose numbers are summed over the primaries.
const SUMMED: &[&str] = &[
    "clients",
    "memory",
    "stats",
    "cpu",
    "keyspace",
    "errorstats",
];

/// The sections whose lines are one per name, each node showing its own
/// (a database, an error code): every name shown, values summed.
fn by_name(section: &str) -> bool {
    matches!(section, "keyspace" | "errorstats")
}

/// Fields of those sections that are one node's: settings, limits and
/// values that do not add up.
fn one_node(field: &str) -> bool {
    field.ends_with("_ratio")
        || field.ends_with("_human")
        || field.ends_with("_perc")
        || matches!(
            field,
            "maxmemory" | "maxclients" | "number_of_cached_scripts" | "maxmemory_policy"
        )
}

/// Fields whose largest value is the cluster's.
fn largest(field: &str) -> bool {
    field.starts_with("client_recent_max_") || field.ends_with("_peak")
}

/// The text of an `INFO` reply: RESP2 bulk or RESP3 verbatim (`txt:`).
fn text_of(reply: &[u8]) -> Option<(&str, bool)> {
    let verbatim = reply.first() == Some(&b'=');
    if !verbatim && reply.first() != Some(&b'$') {
        return None;
    }
    let nl = reply.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&reply[1..nl - 1]).ok()?.parse().ok()?;
    let body = reply.get(nl + 1..nl + 1 + len)?;
    let body = if verbatim { body.get(4..)? } else { body };
    Some((std::str::from_utf8(body).ok()?, verbatim))
}

/// A number as INFO writes it; a float with its count of decimals
/// (`used_cpu_sys` has 6, `instantaneous_input_kbps` 2).
#[derive(Clone, Copy)]
enum Num {
    Int(i64),
    Float(f64, usize),
}

fn num(v: &str) -> Option<Num> {
    if let Ok(i) = v.parse::<i64>() {
        return Some(Num::Int(i));
    }
    let decimals = v.split_once('.').map_or(0, |(_, d)| d.len());
    v.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(|f| Num::Float(f, decimals))
}

fn show(n: Num) -> String {
    match n {
        Num::Int(i) => i.to_string(),
        Num::Float(f, decimals) => format!("{f:.decimals$}"),
    }
}

fn add(a: Num, b: Num, take_largest: bool) -> Num {
    let decimals = match (a, b) {
        (Num::Float(_, d), _) | (_, Num::Float(_, d)) => d,
        _ => 0,
    };
    match (a, b, take_largest) {
        (Num::Int(x), Num::Int(y), false) => Num::Int(x.saturating_add(y)),
        (Num::Int(x), Num::Int(y), true) => Num::Int(x.max(y)),
        (x, y, false) => Num::Float(as_f64(x) + as_f64(y), decimals),
        (x, y, true) => Num::Float(as_f64(x).max(as_f64(y)), decimals),
    }
}

fn as_f64(n: Num) -> f64 {
    match n {
        Num::Int(i) => i as f64,
        Num::Float(f, _) => f,
    }
}

/// `keys=1,expires=0,avg_ttl=0` merged with another node's.
fn merge_db(a: &str, b: &str) -> String {
    let parse = |s: &str| -> Vec<(String, i64)> {
        s.split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(0)))
            .collect()
    };
    let mut out = parse(a);
    for (k, v) in parse(b) {
        match out.iter_mut().find(|(name, _)| *name == k) {
            Some((_, w)) if k == "avg_ttl" => *w = (*w).max(v),
            Some((_, w)) => *w = w.saturating_add(v),
            None => out.push((k, v)),
        }
    }
    out.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The merged reply, in the first reply's framing; `None` when a reply is
/// not an INFO text (an error: the caller answers that).
pub(super) fn merge(replies: &[Bytes], watchers: usize) -> Option<Bytes> {
    let texts: Vec<(&str, bool)> = replies.iter().map(|r| text_of(r)).collect::<Option<_>>()?;
    let (first, verbatim) = *texts.first()?;
    // Every node's summed fields, by section.
    let mut sums: Vec<(String, String, Num)> = Vec::new();
    // `by_name` sections' lines: (section, name, merged value).
    let mut named: Vec<(String, String, String)> = Vec::new();
    for (i, (text, _)) in texts.iter().enumerate() {
        let mut section = String::new();
        for line in text.lines() {
            if let Some(name) = line.strip_prefix("# ") {
                section = name.trim().to_ascii_lowercase();
                continue;
            }
            let Some((field, value)) = line.split_once(':') else {
                continue;
            };
            if !SUMMED.contains(&section.as_str()) {
                continue;
            }
            if by_name(&section) {
                match named
                    .iter_mut()
                    .find(|(s, f, _)| *s == section && f == field)
                {
                    Some((_, _, v)) => *v = merge_db(v, value),
                    None => named.push((section.clone(), field.to_string(), value.to_string())),
                }
                continue;
            }
            let Some(n) = num(value.trim()).filter(|_| !one_node(field)) else {
                continue;
            };
            match sums
                .iter_mut()
                .find(|(s, f, _)| *s == section && f == field)
            {
                Some((_, _, total)) => *total = add(*total, n, largest(field)),
                None if i == 0 => sums.push((section.clone(), field.to_string(), n)),
                // A field the first node does not show is not shown.
                None => {}
            }
        }
    }
    let mut out = String::with_capacity(first.len() + 64);
    let mut section = String::new();
    for line in first.lines() {
        if let Some(name) = line.strip_prefix("# ") {
            write_named(&mut out, &section, &mut named);
            section = name.trim().to_ascii_lowercase();
            out.push_str(line);
            out.push_str("\r\n");
            continue;
        }
        if line.is_empty() {
            // A section's end: its lines the first node did not show.
            write_named(&mut out, &section, &mut named);
        }
        let merged = line.split_once(':').and_then(|(field, _)| {
            if by_name(&section) {
                return named
                    .iter()
                    .position(|(s, f, _)| *s == section && f == field)
                    .map(|i| {
                        let (_, f, v) = named.remove(i);
                        format!("{f}:{v}")
                    });
            }
            let (_, _, total) = sums.iter().find(|(s, f, _)| *s == section && f == field)?;
            let total = match (field, *total) {
                ("blocked_clients", Num::Int(n)) => Num::Int((n - watchers as i64).max(0)),
                (_, t) => t,
            };
            Some(format!("{field}:{}", show(total)))
        });
        out.push_str(merged.as_deref().unwrap_or(line));
        out.push_str("\r\n");
    }
    write_named(&mut out, &section, &mut named);
    // INFO's text has no trailing line break after its last line's.
    let body = out.trim_end_matches("\r\n");
    let body = if first.ends_with("\r\n") {
        format!("{body}\r\n")
    } else {
        body.to_string()
    };
    let framed = match verbatim {
        true => format!("={}\r\ntxt:{body}\r\n", body.len() + 4),
        false => format!("${}\r\n{body}\r\n", body.len()),
    };
    Some(Bytes::from(framed))
}

/// The keyspace lines no node before the first's order placed, by
/// database number.
/// The lines of `section` that the first node did not show, at its end
/// (databases in number order).
fn write_named(out: &mut String, section: &str, named: &mut Vec<(String, String, String)>) {
    let mut rest: Vec<(String, String)> = Vec::new();
    named.retain(|(s, f, v)| {
        let mine = s == section;
        if mine {
            rest.push((f.clone(), v.clone()));
        }
        !mine
    });
    rest.sort_by_key(|(db, _)| {
        db.trim_start_matches("db")
            .parse::<u32>()
            .unwrap_or(u32::MAX)
    });
    for (f, v) in rest {
        out.push_str(&format!("{f}:{v}\r\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Bytes {
        Bytes::from(format!("${}\r\n{s}\r\n", s.len()))
    }

    #[test]
    fn counters_and_keyspace_add_up_settings_are_one_node_s() {
        let a = bulk(
            "# Server\r\nredis_version:7.0.15\r\ntcp_port:7001\r\n\r\n# CPU\r\nused_cpu_sys:0.123456\r\n\r\n# Clients\r\nconnected_clients:3\r\nblocked_clients:2\r\n\r\n# Memory\r\nused_memory:100\r\nmem_fragmentation_ratio:1.50\r\nmaxmemory:0\r\n\r\n# Keyspace\r\ndb0:keys=2,expires=1,avg_ttl=10\r\n",
        );
        let b = bulk(
            "# Server\r\nredis_version:7.0.15\r\ntcp_port:7002\r\n\r\n# CPU\r\nused_cpu_sys:1.000001\r\n\r\n# Clients\r\nconnected_clients:4\r\nblocked_clients:1\r\n\r\n# Memory\r\nused_memory:50\r\nmem_fragmentation_ratio:2.00\r\nmaxmemory:0\r\n\r\n# Keyspace\r\ndb0:keys=3,expires=0,avg_ttl=30\r\ndb2:keys=1,expires=0,avg_ttl=0\r\n",
        );
        let merged = merge(&[a, b], 2).expect("merged");
        let (text, _) = text_of(&merged).expect("bulk");
        assert!(text.contains("tcp_port:7001\r\n"), "{text}");
        assert!(
            text.contains("used_cpu_sys:1.123457\r\n"),
            "as many decimals: {text}"
        );
        assert!(text.contains("connected_clients:7\r\n"), "{text}");
        assert!(
            text.contains("blocked_clients:1\r\n"),
            "watchers left out: {text}"
        );
        assert!(text.contains("used_memory:150\r\n"), "{text}");
        assert!(text.contains("mem_fragmentation_ratio:1.50\r\n"), "{text}");
        assert!(
            text.contains("db0:keys=5,expires=1,avg_ttl=30\r\ndb2:keys=1,expires=0,avg_ttl=0"),
            "{text}"
        );
    }

    #[test]
    fn error_counts_add_up_by_code() {
        let a = bulk("# Errorstats\r\nerrorstat_ERR:count=2\r\n\r\n# Keyspace\r\n");
        let b = bulk(
            "# Errorstats\r\nerrorstat_ERR:count=1\r\nerrorstat_MY_ERR_CODE:count=1\r\n\r\n# Keyspace\r\n",
        );
        let merged = merge(&[a, b], 0).expect("merged");
        let (text, _) = text_of(&merged).expect("bulk");
        assert!(
            text.contains(
                "# Errorstats\r\nerrorstat_ERR:count=3\r\nerrorstat_MY_ERR_CODE:count=1\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn an_error_is_no_info_text() {
        assert!(
            merge(
                &[
                    bulk("# Clients\r\nconnected_clients:1\r\n"),
                    Bytes::from_static(b"-ERR x\r\n")
                ],
                0
            )
            .is_none()
        );
    }
}
