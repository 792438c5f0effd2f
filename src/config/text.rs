//! How values are written in the file and found again: sizes (`"256MiB"`),
//! durations (`"30s"`), secrets (read as strings, printed as
//! `REDACTED`), and the line a key sits on, for errors that name it.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Secrets are printed (check-config, Debug) as this, never as themselves.
pub const REDACTED: &str = "<redacted>";

/// A password: read from the config like a string, but printed, serialized
/// or debug-formatted only as `REDACTED`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A TOML error quotes the offending line of the file: when that line may
/// hold a secret (a password, a URL with credentials), its value is
/// replaced, so a typo next to a password does not print the password to
/// the log or to the client that asked for the reload.
pub fn redact_snippet(msg: &str) -> String {
    msg.lines()
        .map(|line| {
            // Only the quoted file lines (`12 | key = value`), not the
            // message, which may list `requirepass` among expected keys.
            let quoted =
                line.trim_start().starts_with(|c: char| c.is_ascii_digit()) && line.contains(" | ");
            let lower = line.to_ascii_lowercase();
            let secret = quoted && (lower.contains("password") || lower.contains("requirepass"));
            let url = quoted && line.contains("://") && line.contains('@');
            match line.split_once('=') {
                Some((key, _)) if secret || url => format!("{key}= {REDACTED}"),
                None if secret || url => REDACTED.to_string(),
                _ => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub const KIB: u64 = 1024;

pub const MIB: u64 = 1024 * KIB;

pub const GIB: u64 = 1024 * MIB;

/// The line (1-based) where `section.key` is set, by a plain scan of the file:
/// enough for the flat tables this config uses.
pub fn line_of(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = dotted.rsplit_once('.')?;
    let mut current = String::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(h) = line.strip_prefix('[') {
            current = h.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        if current == section {
            if let Some((k, _)) = line.split_once('=') {
                if k.trim() == key {
                    return Some(i + 1);
                }
            }
        }
    }
    None
}

/// The line to name in an error about `dotted`: where it is set
/// (`line_of`), else the `[dotted]` header of a table written out, else
/// where its parent is set (an inline table: `hotkeys = { sample = 0 }`
/// under `[warmup]` for `warmup.hotkeys.sample`), up to a key of a
/// top-level table. `None` when the file does not set it at all.
pub fn error_line(text: &str, dotted: &str) -> Option<usize> {
    line_of(text, dotted)
        .or_else(|| {
            let header = format!("[{dotted}]");
            text.lines().position(|l| l.trim() == header).map(|i| i + 1)
        })
        .or_else(|| {
            let (parent, _) = dotted.rsplit_once('.')?;
            parent.contains('.').then(|| error_line(text, parent))?
        })
}

/// The first line at or after `from` (1-based) that mentions `needle`, in
/// quotes or as a key: where an element of a multi-line array, or a key of
/// an array-of-tables entry, is written.
pub(super) fn element_line(text: &str, from: Option<usize>, needle: &str) -> Option<usize> {
    let from = from?;
    text.lines()
        .enumerate()
        .skip(from - 1)
        .find(|(_, l)| {
            l.contains(&format!("\"{needle}\""))
                || l.split('=').next().is_some_and(|k| k.trim() == needle)
        })
        .map(|(n, _)| n + 1)
}

/// The line of the `i`th `[[name]]` header.
pub(super) fn nth_table_line(text: &str, name: &str, i: usize) -> Option<usize> {
    let header = format!("[[{name}]]");
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.trim() == header)
        .nth(i)
        .map(|(n, _)| n + 1)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Int(u64),
    Text(String),
}

pub(super) fn de_size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match SizeValue::deserialize(d)? {
        SizeValue::Int(n) => Ok(n),
        SizeValue::Text(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// `"256MiB"`, `"64KiB"`, `"100"`, `"1GB"` (decimal units are 1000-based).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as \"256MiB\""))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub(super) fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("`{s}` is not a duration such as \"30s\": {e}"))
    })
}

pub(super) fn ser_duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

/// An optional duration (`"30s"` or absent), for `#[serde(with =
/// "opt_duration")]` with `default` and `skip_serializing_if =
/// "Option::is_none"`.
pub(super) mod opt_duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => ser_duration(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        de_duration(d).map(Some)
    }
}
