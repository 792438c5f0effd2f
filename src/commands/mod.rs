//! Redis command knowledge, at the bottom of the crate: what each command
//! does (`table`: write, blocking, admin, `allow_busy`, key positions, from
//! upstream `COMMAND` or a built-in list), where its keys are (`keys`),
//! which hash slot a key is in (`slot`), and which reads L1 may cache and
//! how their entries are named (`reads`).
//!
//! Everything above reads these facts (cmd, cache, upstream's cluster
//! router, config's validation); nothing here imports another part of kiln
//! but `protocol` and `name_index`.

pub mod keys;
pub mod reads;
pub mod slot;
pub mod table;

pub use keys::{Keys, key_args};
pub use table::{CmdInfo, CommandTable, is_cross_protocol, lower};

/// kiln's own admin commands (SPEC 5), lower case: the names
/// `admin.rate_limits` may limit.
pub const ADMIN: [&[u8]; 6] = [
    b"cache.warmup",
    b"cache.status",
    b"cache.clear",
    b"cache.invalidate",
    b"cache.hotkeys",
    b"cache.reload",
];

/// Whether `name` (any case) is one of kiln's admin commands.
pub fn is_admin_command(name: &[u8]) -> bool {
    ADMIN.iter().any(|a| a.eq_ignore_ascii_case(name))
}
