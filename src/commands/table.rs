//! Which commands write, block, need admin or run while a script is busy,
//! and where their keys are (positions; `keys.rs` resolves them). Built at
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

pub struct CommandTable {
    map: Map,
    /// The top-level names of `map`, for the lookups every command makes.
    by_name: NameIndex<CmdInfo>,
    pub from_upstream: bool,
    /// Top-level names with an `allow_busy` command or subcommand: checked
    /// first, so other commands pay no second lookup.
    busy_names: Vec<Vec<u8>>,
}

impl CommandTable {
    /// Parses the reply to `COMMAND` (RESP2).
    pub fn from_command_reply(reply: &[u8]) -> Option<CommandTable> {
        let (frame, _) = redis_protocol::resp2::decode::decode(reply).ok()??;
        let OwnedFrame::Array(cmds) = frame else {
            return None;
        };
        let mut map = Map::with_capacity_and_hasher(cmds.len() * 2, Default::default());
        for c in &cmds {
            add_entry(&mut map, c, None);
        }
        (!map.is_empty()).then(|| CommandTable::with(map, true))
    }

    pub fn builtin() -> CommandTable {
        let mut map = Map::default();
        for (names, info) in BUILTIN {
            for n in names.split_whitespace() {
                map.insert(n.as_bytes().to_vec(), *info);
            }
        }
        CommandTable::with(map, false)
    }

    fn with(map: Map, from_upstream: bool) -> CommandTable {
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
        CommandTable {
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
    pub(super) fn flag(&self, name: &[u8], args: &[Bytes], f: impl Fn(&CmdInfo) -> bool) -> bool {
        match self.find(name) {
            Some(i) if i.container => args.get(1).and_then(|s| self.sub(name, s)).is_some_and(f),
            Some(i) => f(i),
            None => false,
        }
    }

    /// Looks up a lowercase name: a top-level one in `by_name` only (an
    /// unknown command costs no second lookup), a `name|sub` or a name too
    /// long for the index in the map.
    pub(super) fn find(&self, lower: &[u8]) -> Option<&CmdInfo> {
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

    /// `name|sub` of a container command.
    pub(super) fn sub(&self, name: &[u8], sub: &[u8]) -> Option<&CmdInfo> {
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

/// Whether a (lowercase) command name is the first word of an HTTP
/// request line (`POST`) or header (`Host:`): Redis takes it for a
/// cross-protocol scripting attack and closes the client's connection
/// with no reply (`processCommand` -> `securityWarningCommand`), whatever
/// state the client is in.
pub fn is_cross_protocol(lower: &[u8]) -> bool {
    matches!(lower, b"post" | b"host:")
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
