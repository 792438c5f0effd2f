//! Finding a command's keys: where a write's keys are (`write_keys`, for
//! invalidation) and every key of a command, read or write (`keys`, for
//! cluster routing and sessions), from the command table's positions plus
//! the movable-key commands Redis Cluster clients special-case.

use bytes::Bytes;

use super::table::{CommandTable, lower};

/// Where a write's keys are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keys {
    /// `first..=last` step `step` (last < 0 counts from the end).
    Range { first: i32, last: i32, step: i32 },
    /// `EVAL`-style: the argument at this index says how many keys follow.
    NumKeys(usize),
    /// Unknown positions: every argument after the name.
    AllArgs,
    /// No keys at all (FLUSHDB, SWAPDB, FUNCTION ...): drop the whole L1.
    Everything,
}

/// Commands whose keys sit behind a count argument, and which may write.
const NUMKEYS_WRITES: &[(&str, usize)] = &[("eval", 2), ("evalsha", 2), ("fcall", 2)];

/// Commands whose keys move (COMMAND's `movablekeys`), by where they are:
/// after a count at this index.
const NUMKEYS_AT: &[(&str, usize)] = &[
    ("eval", 2),
    ("evalsha", 2),
    ("eval_ro", 2),
    ("evalsha_ro", 2),
    ("fcall", 2),
    ("fcall_ro", 2),
    ("zunion", 1),
    ("zinter", 1),
    ("zdiff", 1),
    ("zintercard", 1),
    ("sintercard", 1),
    ("lmpop", 1),
    ("zmpop", 1),
    ("blmpop", 2),
    ("bzmpop", 2),
];

impl CommandTable {
    /// Where the keys of a write are, or `None` for a command that does not
    /// write. Unknown commands are treated as writes to all their arguments.
    pub fn write_keys(&self, args: &[Bytes]) -> Option<Keys> {
        let mut buf = [0u8; 64];
        let name = lower(&args[0], &mut buf)?;
        if let Some((_, idx)) = NUMKEYS_WRITES.iter().find(|(n, _)| n.as_bytes() == name) {
            return Some(Keys::NumKeys(*idx));
        }
        let mut info = match self.find(name) {
            Some(i) => *i,
            None => return Some(Keys::AllArgs),
        };
        if info.container {
            // An unknown subcommand: upstream will refuse it.
            info = *self.sub(name, args.get(1)?)?;
        }
        if !info.write {
            return None;
        }
        Some(if info.movable {
            Keys::AllArgs
        } else if info.first == 0 {
            Keys::Everything
        } else {
            Keys::Range {
                first: info.first,
                last: info.last,
                step: info.step.max(1),
            }
        })
    }

    /// Every key of a command, read or write: the command table's
    /// positions, with the movable-key commands Redis Cluster clients
    /// special-case (numkeys, `STREAMS`, `*STORE` destinations) done here.
    pub fn keys<'a>(&self, args: &'a [Bytes]) -> Vec<&'a Bytes> {
        let mut buf = [0u8; 64];
        let Some(name) = lower(&args[0], &mut buf) else {
            return Vec::new();
        };
        if let Some((_, idx)) = NUMKEYS_AT.iter().find(|(n, _)| n.as_bytes() == name) {
            return key_args(Keys::NumKeys(*idx), args).collect();
        }
        match name {
            b"zunionstore" | b"zinterstore" | b"zdiffstore" => {
                let mut k: Vec<&Bytes> = args.get(1).into_iter().collect();
                k.extend(key_args(Keys::NumKeys(2), args));
                return k;
            }
            b"xread" | b"xreadgroup" => {
                let Some(at) = args.iter().position(|a| a.eq_ignore_ascii_case(b"streams")) else {
                    return Vec::new();
                };
                let rest = &args[at + 1..];
                return rest[..rest.len() / 2].iter().collect();
            }
            b"sort" | b"sort_ro" => {
                let mut k: Vec<&Bytes> = args.get(1).into_iter().collect();
                if let Some(at) = args.iter().position(|a| a.eq_ignore_ascii_case(b"store")) {
                    k.extend(args.get(at + 1));
                }
                return k;
            }
            _ => {}
        }
        let mut info = match self.find(name) {
            Some(i) => *i,
            // Not a command upstream has: it refuses it, keys or not.
            None => return Vec::new(),
        };
        if info.container {
            match args.get(1).and_then(|s| self.sub(name, s)) {
                Some(i) => info = *i,
                None => return Vec::new(),
            }
        }
        if info.first == 0 {
            return Vec::new();
        }
        key_args(
            Keys::Range {
                first: info.first,
                last: info.last,
                step: info.step.max(1),
            },
            args,
        )
        .collect()
    }
}

/// Resolves `keys` against the arguments of one command.
pub fn key_args(keys: Keys, args: &[Bytes]) -> impl Iterator<Item = &Bytes> {
    let n = args.len() as i64;
    let (start, end, step) = match keys {
        Keys::Range { first, last, step } => {
            let last = if last < 0 {
                n + last as i64
            } else {
                last as i64
            };
            (first as i64, last.min(n - 1), step as usize)
        }
        Keys::NumKeys(idx) => {
            let count = args
                .get(idx)
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0)
                .max(0);
            let first = idx as i64 + 1;
            (first, (first + count - 1).min(n - 1), 1)
        }
        Keys::AllArgs => (1, n - 1, 1),
        Keys::Everything => (1, 0, 1),
    };
    let keys: &[Bytes] = if start >= 1 && end >= start {
        args.get(start as usize..=end as usize).unwrap_or(&[])
    } else {
        &[]
    };
    keys.iter().step_by(step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn keys(t: &CommandTable, s: &str) -> Option<Vec<String>> {
        let a = args(s);
        t.write_keys(&a).map(|k| {
            key_args(k, &a)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        })
    }

    #[test]
    fn builtin_keys() {
        let t = CommandTable::builtin();
        assert_eq!(keys(&t, "GET a"), None);
        assert_eq!(keys(&t, "SET a 1"), Some(vec!["a".into()]));
        assert_eq!(keys(&t, "MSET a 1 b 2"), Some(vec!["a".into(), "b".into()]));
        assert_eq!(
            keys(&t, "DEL a b c"),
            Some(vec!["a".into(), "b".into(), "c".into()])
        );
        assert_eq!(
            keys(&t, "EVAL s 2 k1 k2 x"),
            Some(vec!["k1".into(), "k2".into()])
        );
        assert_eq!(keys(&t, "FLUSHALL"), Some(vec![]));
        assert_eq!(keys(&t, "NOSUCH x y"), Some(vec!["x".into(), "y".into()]));
        assert!(t.is_blocking(&args("BLPOP a 0")));
        assert!(!t.is_blocking(&args("XREAD STREAMS s 0")));
        assert!(t.is_blocking(&args("XREAD BLOCK 0 STREAMS s 0")));
    }
}
