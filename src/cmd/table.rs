//! Which commands write, and which of their arguments are keys. Built at
//! start from upstream `COMMAND` (flags and first/last/step key positions);
//! when that fails, from the built-in list below. A write whose keys cannot
//! be located (movable keys) invalidates every argument: invalidating too
//! much only costs a miss, too little would serve stale data.

use std::collections::HashMap;

use crate::name_index::NameIndex;

use bytes::Bytes;
use redis_protocol::resp2::types::OwnedFrame;

/// Looked up for every forwarded command, so foldhash rather than SipHash:
/// clients only look names up, they never insert, so there is no table to
/// flood.
type Map = HashMap<Vec<u8>, CmdInfo, foldhash::fast::RandomState>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CmdInfo {
    pub write: bool,
    pub blocking: bool,
    pub movable: bool,
    pub first: i32,
    pub last: i32,
    pub step: i32,
    /// A container (`XGROUP`, `OBJECT`): look up `name|sub` instead.
    pub container: bool,
    /// Redis's `admin` flag (CONFIG, SHUTDOWN, DEBUG, ...): admin role only.
    pub admin: bool,
    /// Redis's `allow_busy` flag: runs while a script is busy (SCRIPT KILL,
    /// FUNCTION KILL, SHUTDOWN, ...).
    pub allow_busy: bool,
}

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

pub struct Table {
    map: Map,
    /// The top-level names of `map`, for the lookups every command makes.
    by_name: NameIndex<CmdInfo>,
    pub from_upstream: bool,
    /// Top-level names with an `allow_busy` command or subcommand: checked
    /// first, so other commands pay no second lookup.
    busy_names: Vec<Vec<u8>>,
}

/// Commands whose keys sit behind a count argument, and which may write.
const NUMKEYS_WRITES: &[(&str, usize)] = &[("eval", 2), ("evalsha", 2), ("fcall", 2)];

impl Table {
    /// Parses the reply to `COMMAND` (RESP2).
    pub fn from_command_reply(reply: &[u8]) -> Option<Table> {
        let (frame, _) = redis_protocol::resp2::decode::decode(reply).ok()??;
        let OwnedFrame::Array(cmds) = frame else {
            return None;
        };
        let mut map = Map::with_capacity_and_hasher(cmds.len() * 2, Default::default());
        for c in &cmds {
            add_entry(&mut map, c, None);
        }
        (!map.is_empty()).then(|| Table::with(map, true))
    }

    pub fn builtin() -> Table {
        let mut map = Map::default();
        for (names, info) in BUILTIN {
            for n in names.split_whitespace() {
                map.insert(n.as_bytes().to_vec(), *info);
            }
        }
        Table::with(map, false)
    }

    fn with(map: Map, from_upstream: bool) -> Table {
        let mut busy_names: Vec<Vec<u8>> = map
            .iter()
            .filter(|(_, i)| i.allow_busy)
            .map(|(n, _)| n.split(|&b| b == b'|').next().unwrap_or(n).to_vec())
            .collect();
        busy_names.sort();
        busy_names.dedup();
        let by_name = NameIndex::new(
            map.iter()
                .filter(|(n, _)| !n.contains(&b'|'))
                .map(|(n, i)| (&n[..], *i)),
        );
        Table {
            map,
            by_name,
            from_upstream,
            busy_names,
        }
    }

    /// Whether the command (or subcommand) has Redis's `allow_busy` flag:
    /// upstream runs it even while a script keeps it busy.
    pub fn allows_busy(&self, args: &[Bytes]) -> bool {
        // Most commands differ in length from every busy one: no lowering.
        if !self.busy_names.iter().any(|n| n.len() == args[0].len()) {
            return false;
        }
        let mut buf = [0u8; 64];
        let Some(name) = lower(&args[0], &mut buf) else {
            return false;
        };
        if !self.busy_names.iter().any(|n| n == name) {
            return false;
        }
        self.flag(name, args, |i| i.allow_busy)
    }

    /// A flag of the command named `name` (lowercase), or of its
    /// subcommand for a container.
    fn flag(&self, name: &[u8], args: &[Bytes], f: impl Fn(&CmdInfo) -> bool) -> bool {
        match self.find(name) {
            Some(i) if i.container => args.get(1).and_then(|s| self.sub(name, s)).is_some_and(f),
            Some(i) => f(i),
            None => false,
        }
    }

    /// Looks up a lowercase name: a top-level one in `by_name` only (an
    /// unknown command costs no second lookup), a `name|sub` or a name too
    /// long for the index in the map.
    fn find(&self, lower: &[u8]) -> Option<&CmdInfo> {
        if NameIndex::<CmdInfo>::covers(lower) && !lower.contains(&b'|') {
            self.by_name.get(lower)
        } else {
            self.map.get(lower)
        }
    }

    /// Every lowercase name the table knows.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.map.keys().map(|k| &k[..])
    }

    /// Looks up a lowercase name (`"set"`, `"xgroup|create"`).
    pub fn get(&self, lower: &[u8]) -> Option<&CmdInfo> {
        self.find(lower)
    }

    /// Whether upstream has this command (`sub`: of a container), as its
    /// `COMMAND` table says. With the built-in table (upstream could not
    /// be asked) everything kiln knows is taken to exist. Commands kiln
    /// answers itself check this first, so a client sees upstream's own
    /// "unknown command" or "unknown subcommand" error for what its
    /// version lacks (`CLIENT SETINFO` before Redis 7.2).
    pub fn exists(&self, lower: &[u8], sub: Option<&[u8]>) -> bool {
        if !self.from_upstream {
            return true;
        }
        match (self.find(lower), sub) {
            (None, _) => false,
            (Some(i), Some(sub)) if i.container => self.sub(lower, sub).is_some(),
            (Some(_), _) => true,
        }
    }

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

    /// `name|sub` of a container command.
    fn sub(&self, name: &[u8], sub: &[u8]) -> Option<&CmdInfo> {
        let mut full = Vec::with_capacity(name.len() + 1 + sub.len());
        full.extend_from_slice(name);
        full.push(b'|');
        full.extend(sub.iter().map(|b| b.to_ascii_lowercase()));
        self.map.get(&full)
    }

    /// Whether the command (or subcommand) has Redis's `admin` flag.
    pub fn is_admin(&self, args: &[Bytes]) -> bool {
        let mut buf = [0u8; 64];
        let Some(name) = lower(&args[0], &mut buf) else {
            return false;
        };
        self.flag(name, args, |i| i.admin)
    }

    pub fn is_blocking(&self, args: &[Bytes]) -> bool {
        let mut buf = [0u8; 64];
        let Some(name) = lower(&args[0], &mut buf) else {
            return false;
        };
        match name {
            // Blocking only with a BLOCK argument.
            b"xread" | b"xreadgroup" => args.iter().any(|a| a.eq_ignore_ascii_case(b"block")),
            b"wait" | b"waitaof" => true,
            _ => self.find(name).is_some_and(|i| i.blocking),
        }
    }
}

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

impl crate::upstream::KeyFinder for Table {
    /// Every key of a command, read or write: the command table's
    /// positions, with the movable-key commands Redis Cluster clients
    /// special-case (numkeys, `STREAMS`, `*STORE` destinations) done here.
    fn keys<'a>(&self, args: &'a [Bytes]) -> Vec<&'a Bytes> {
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

/// ASCII-lowercases a command name into `buf`; `None` if it does not fit.
pub fn lower<'a>(name: &[u8], buf: &'a mut [u8; 64]) -> Option<&'a [u8]> {
    let out = buf.get_mut(..name.len())?;
    for (o, c) in out.iter_mut().zip(name) {
        *o = c.to_ascii_lowercase();
    }
    Some(out)
}

fn add_entry(map: &mut Map, c: &OwnedFrame, _parent: Option<&[u8]>) {
    let OwnedFrame::Array(f) = c else { return };
    let text = |i: usize| match f.get(i) {
        Some(OwnedFrame::BulkString(b)) | Some(OwnedFrame::SimpleString(b)) => Some(b.clone()),
        _ => None,
    };
    let int = |i: usize| match f.get(i) {
        Some(OwnedFrame::Integer(n)) => *n as i32,
        _ => 0,
    };
    let Some(name) = text(0) else { return };
    let flags: Vec<Vec<u8>> = match f.get(2) {
        Some(OwnedFrame::Array(a)) => a
            .iter()
            .filter_map(|x| match x {
                OwnedFrame::SimpleString(s) | OwnedFrame::BulkString(s) => Some(s.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let has = |flag: &[u8]| flags.iter().any(|x| x == flag);
    let subs = match f.get(9) {
        Some(OwnedFrame::Array(s)) if !s.is_empty() => Some(s),
        _ => None,
    };
    let info = CmdInfo {
        write: has(b"write"),
        blocking: has(b"blocking"),
        movable: has(b"movablekeys"),
        first: int(3),
        last: int(4),
        step: int(5),
        container: subs.is_some(),
        admin: has(b"admin"),
        allow_busy: has(b"allow_busy"),
    };
    map.insert(name.to_ascii_lowercase(), info);
    for s in subs.into_iter().flatten() {
        add_entry(map, s, Some(&name));
    }
}

const fn w(first: i32, last: i32, step: i32) -> CmdInfo {
    CmdInfo {
        write: true,
        blocking: false,
        movable: false,
        first,
        last,
        step,
        container: false,
        admin: false,
        allow_busy: false,
    }
}
const R: CmdInfo = CmdInfo {
    write: false,
    blocking: false,
    movable: false,
    first: 1,
    last: 1,
    step: 1,
    container: false,
    admin: false,
    allow_busy: false,
};
const B: CmdInfo = CmdInfo {
    write: true,
    blocking: true,
    movable: false,
    first: 1,
    last: -2,
    step: 1,
    container: false,
    admin: false,
    allow_busy: false,
};
const ALL: CmdInfo = CmdInfo {
    write: true,
    blocking: false,
    movable: true,
    first: 0,
    last: 0,
    step: 0,
    container: false,
    admin: false,
    allow_busy: false,
};
const NOKEYS: CmdInfo = w(0, 0, 0);

/// Used only when upstream `COMMAND` fails (an old or restricted server).
const BUILTIN: &[(&str, CmdInfo)] = &[
    (
        "get mget strlen getrange substr exists type ttl pttl expiretime pexpiretime \
         hget hmget hgetall hkeys hvals hlen hexists hstrlen hrandfield hscan \
         lrange llen lindex lpos scard smembers sismember smismember srandmember sscan \
         sinter sunion sdiff sintercard zrange zrangebyscore zrevrange zrevrangebyscore \
         zrangebylex zrevrangebylex zscore zmscore zrank zrevrank zcard zcount zlexcount \
         zrandmember zscan zinter zunion zdiff zintercard xrange xrevrange xlen xinfo xpending \
         xread getbit bitcount bitpos bitfield_ro pfcount geopos geodist geohash georadius_ro \
         georadiusbymember_ro geosearch dump object memory touch keys scan randomkey dbsize \
         lcs sort_ro eval_ro evalsha_ro fcall_ro ping echo info time command config client \
         hello auth select quit reset multi exec discard watch unwatch subscribe psubscribe \
         ssubscribe unsubscribe punsubscribe sunsubscribe publish spublish pubsub monitor \
         wait waitaof script function lastsave role slowlog latency",
        R,
    ),
    (
        "set setnx setex psetex getset getdel getex append incr decr incrby decrby \
         incrbyfloat setrange expire pexpire expireat pexpireat persist \
         hset hsetnx hmset hdel hincrby hincrbyfloat lpush rpush lpushx rpushx lpop rpop \
         lset lrem ltrim linsert sadd srem spop zadd zrem zincrby zpopmin zpopmax \
         zremrangebyrank zremrangebyscore zremrangebylex xadd xdel xtrim xack xclaim \
         xautoclaim xsetid setbit bitfield pfadd geoadd restore",
        w(1, 1, 1),
    ),
    ("mset msetnx", w(1, -1, 2)),
    ("del unlink", w(1, -1, 1)),
    ("rename renamenx smove lmove rpoplpush copy", w(1, 2, 1)),
    ("move", w(1, 1, 1)),
    (
        "sinterstore sunionstore sdiffstore zrangestore pfmerge bitop \
         geosearchstore georadius georadiusbymember",
        w(1, -1, 1),
    ),
    ("flushdb flushall swapdb", NOKEYS),
    (
        "config debug monitor slaveof replicaof bgsave save bgrewriteaof acl \
         module failover slowlog latency",
        CmdInfo { admin: true, ..R },
    ),
    (
        "shutdown",
        CmdInfo {
            admin: true,
            allow_busy: true,
            ..R
        },
    ),
    (
        "script function",
        CmdInfo {
            container: true,
            ..R
        },
    ),
    (
        "script|kill function|kill function|stats",
        CmdInfo {
            allow_busy: true,
            ..R
        },
    ),
    ("blpop brpop bzpopmin bzpopmax", B),
    ("blmove brpoplpush", CmdInfo { last: 2, ..B }),
    ("blmpop bzmpop", CmdInfo { movable: true, ..B }),
    (
        "zunionstore zinterstore zdiffstore lmpop zmpop sort xgroup xreadgroup migrate",
        ALL,
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<Bytes> {
        s.split(' ')
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect()
    }

    fn keys(t: &Table, s: &str) -> Option<Vec<String>> {
        let a = args(s);
        t.write_keys(&a).map(|k| {
            key_args(k, &a)
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect()
        })
    }

    #[test]
    fn builtin_keys() {
        let t = Table::builtin();
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
