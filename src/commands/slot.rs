//! Redis Cluster hash slots: which of the 16,384 slots a key belongs to.
//!
//! As the Redis Cluster specification defines it ("Keys distribution
//! model"): CRC16 (XMODEM: polynomial 0x1021, initial 0) of the key, modulo
//! 16384; when the key holds a `{...}` with at least one byte between the
//! first `{` and the first `}` after it, only those bytes are hashed (a hash
//! tag), so `{user:1}:name` and `{user:1}:mail` share a slot.
//! `tests/integration/cluster.rs` checks it against `CLUSTER KEYSLOT`.

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The hash slot of `key`, 0 to 16383.
pub fn key_slot(key: &[u8]) -> u16 {
    CRC16.checksum(hash_tag(key)) % SLOTS
}

/// The bytes of `key` that decide its slot: its hash tag if it has one,
/// else all of it.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specifications_examples() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`'s
        // documentation.
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"foo{hash_tag}"), key_slot(b"hash_tag"));
        assert_eq!(key_slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(hash_tag(b"{user1000}.following"), b"user1000");
        assert_eq!(
            hash_tag(b"foo{}{bar}"),
            b"foo{}{bar}",
            "empty first tag: whole key"
        );
        assert_eq!(hash_tag(b"foo{{bar}}zap"), b"{bar", "from the first {{");
        assert_eq!(hash_tag(b"foo{bar}{zap}"), b"bar", "only the first tag");
        assert_eq!(hash_tag(b"{"), b"{");
    }
}
