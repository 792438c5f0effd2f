//! Which read commands L1 may cache (`cache.commands`), and how a read is
//! named inside an entry.
//!
//! A command is cacheable when it reads one key, its reply depends only on
//! that key's value (so a write to the key is the only thing that changes
//! it, and that write invalidates the key), and kiln can give a RESP2
//! client the bytes Redis would give it from a read made in RESP3 (see
//! `protocol::resp3::to_resp2`). Every command here takes its key as the
//! first argument. Anything else in `cache.commands` is a config error
//! that says why (`refusal`).

/// Every cacheable read, by id (an index below 64: the id is a bit in a
/// `u64` mask). The first `DEFAULTS` are cached unless `cache.commands`
/// says otherwise.
pub const COMMANDS: [&str; 37] = [
    // The defaults, in SPEC order.
    "get",
    "mget",
    "hget",
    "hmget",
    "hgetall",
    "hexists",
    "hlen",
    "strlen",
    "getrange",
    "exists",
    "sismember",
    "smismember",
    "scard",
    "smembers",
    "zscore",
    "zmscore",
    "zcard",
    "zrange",
    "zrank",
    "zrevrank",
    "lrange",
    "lindex",
    "llen",
    "type",
    // Also safe, cached only when listed.
    "hkeys",
    "hvals",
    "hstrlen",
    "substr",
    "zcount",
    "zlexcount",
    "zrevrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zrangebylex",
    "zrevrangebylex",
    "getbit",
    "bitcount",
];

/// How many of `COMMANDS` are cached by default.
pub const DEFAULTS: usize = 24;

pub const GET: u8 = 0;
pub const MGET: u8 = 1;

/// The mask of the default commands.
pub const DEFAULT_MASK: u64 = (1 << DEFAULTS) - 1;

/// The id of a cacheable command, from its lowercase name. A `match`, so
/// a forwarded command pays a few length and byte comparisons, not a scan.
pub fn id(lower: &[u8]) -> Option<u8> {
    Some(match lower {
        b"get" => 0,
        b"mget" => 1,
        b"hget" => 2,
        b"hmget" => 3,
        b"hgetall" => 4,
        b"hexists" => 5,
        b"hlen" => 6,
        b"strlen" => 7,
        b"getrange" => 8,
        b"exists" => 9,
        b"sismember" => 10,
        b"smismember" => 11,
        b"scard" => 12,
        b"smembers" => 13,
        b"zscore" => 14,
        b"zmscore" => 15,
        b"zcard" => 16,
        b"zrange" => 17,
        b"zrank" => 18,
        b"zrevrank" => 19,
        b"lrange" => 20,
        b"lindex" => 21,
        b"llen" => 22,
        b"type" => 23,
        b"hkeys" => 24,
        b"hvals" => 25,
        b"hstrlen" => 26,
        b"substr" => 27,
        b"zcount" => 28,
        b"zlexcount" => 29,
        b"zrevrange" => 30,
        b"zrangebyscore" => 31,
        b"zrevrangebyscore" => 32,
        b"zrangebylex" => 33,
        b"zrevrangebylex" => 34,
        b"getbit" => 35,
        b"bitcount" => 36,
        _ => return None,
    })
}

/// The name of a command id, lowercase.
pub fn name(id: u8) -> &'static str {
    COMMANDS.get(id as usize).copied().unwrap_or("?")
}

/// Whether a call of read `id` with `args` (the name first) may be served
/// from L1: `EXISTS` only with one key (several keys count keys, and each
/// would need its own entry).
pub fn cacheable_call(id: u8, args: &[bytes::Bytes]) -> bool {
    match name(id) {
        "exists" => args.len() == 2,
        _ => args.len() >= 2,
    }
}

/// Whether RESP3's `[member, score]` pairs of this call are flat in RESP2
/// (`ZRANGE ... WITHSCORES` and its older forms).
pub fn pairs_in_resp3(id: u8, args: &[bytes::Bytes]) -> bool {
    matches!(
        name(id),
        "zrange" | "zrevrange" | "zrangebyscore" | "zrevrangebyscore"
    ) && args.iter().any(|a| a.eq_ignore_ascii_case(b"withscores"))
}

/// The mask of `names` (any case), or the first that cannot be cached (as
/// written) and why.
pub fn mask(names: &[String]) -> Result<u64, (String, String)> {
    let mut m = 0u64;
    for n in names {
        let lower = n.to_ascii_lowercase();
        match id(lower.as_bytes()) {
            Some(i) => m |= 1 << i,
            None => return Err((n.clone(), refusal(&lower))),
        }
    }
    Ok(m)
}

/// Why `name` (lowercase) is not a cacheable read.
pub fn refusal(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    let why = match name {
        "ttl" | "pttl" | "expiretime" | "pexpiretime" | "object" | "lastsave" | "time"
        | "dbsize" | "memory" => "its reply changes without a write (time or server state)",
        "srandmember" | "hrandfield" | "zrandmember" | "randomkey" => {
            "its reply is random: two calls differ without a write"
        }
        "scan" | "hscan" | "sscan" | "zscan" | "keys" => {
            "it walks with a cursor or over the key space, not one key's value"
        }
        "pfcount" => "it may write (it caches the cardinality in the key)",
        "sinter" | "sunion" | "sdiff" | "sintercard" | "zinter" | "zunion" | "zdiff" | "lcs"
        | "zintercard" => "it reads several keys",
        "dump" | "debug" | "xinfo" | "xpending" | "lpos" | "geopos" | "geodist" | "geohash"
        | "geosearch" | "xrange" | "xrevrange" | "xlen" | "bitpos" | "sort_ro" | "eval_ro"
        | "evalsha_ro" | "fcall_ro" => {
            "kiln does not cache it (not in the list of reads it can reply to byte for byte)"
        }
        _ if super::table::CommandTable::builtin()
            .get(name.as_bytes())
            .is_some_and(|i| i.write) =>
        {
            "it writes"
        }
        _ => "kiln does not cache it (not among the reads it can reply to byte for byte)",
    };
    format!(
        "`{upper}` cannot be cached: {why}; cacheable: {}",
        COMMANDS.join(", ").to_ascii_uppercase()
    )
}

/// The bytes that name a read, as built per request: on the stack for
/// the usual short arguments, so a hit allocates nothing.
pub type ReadKey = smallvec::SmallVec<[u8; 64]>;

/// The bytes that name a read inside its entry: the client's protocol,
/// the command's id, then each argument after the key, length first. The
/// arguments are compared as sent, so `WITHSCORES` and `withscores` are two
/// entries (both correct).
pub fn read_key(proto: crate::protocol::Proto, id: u8, args: &[bytes::Bytes]) -> ReadKey {
    let rest = args.get(2..).unwrap_or_default();
    let mut out = ReadKey::with_capacity(2 + rest.iter().map(|a| a.len() + 4).sum::<usize>());
    out.push(match proto {
        crate::protocol::Proto::Resp2 => 2,
        crate::protocol::Proto::Resp3 => 3,
    });
    out.push(id);
    for a in rest {
        out.extend_from_slice(&(a.len() as u32).to_le_bytes());
        out.extend_from_slice(a);
    }
    out
}

/// The command id of a read key (see `read_key`).
pub fn id_of_read(read: &[u8]) -> Option<u8> {
    read.get(1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fit_a_mask_and_defaults_come_first() {
        assert!(COMMANDS.len() <= 64);
        assert_eq!(id(b"get"), Some(GET));
        assert_eq!(id(b"mget"), Some(MGET));
        assert_eq!(id(b"type"), Some(DEFAULTS as u8 - 1));
        assert_eq!(id(b"ttl"), None);
        for (i, n) in COMMANDS.iter().enumerate() {
            assert_eq!(id(n.as_bytes()), Some(i as u8), "{n}");
        }
        assert_eq!(mask(&["HGETALL".into(), "get".into()]), Ok(0b10001));
    }

    #[test]
    fn refusals_say_why() {
        for (name, why) in [
            ("TTL", "changes without a write"),
            ("SRANDMEMBER", "random"),
            ("HRANDFIELD", "random"),
            ("SCAN", "cursor"),
            ("OBJECT", "server state"),
            ("PFCOUNT", "may write"),
            ("SET", "writes"),
            ("SINTER", "several keys"),
        ] {
            let (_, e) = mask(&[name.into()]).expect_err(name);
            assert!(e.contains(name) && e.contains(why), "{e}");
        }
    }
}
