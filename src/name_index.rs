//! Lowercase command names to values, for lookups on every command (the
//! command table, the per-command counters). Names are bucketed by length
//! and first byte: a lookup is an index and a comparison or two, where
//! hashing the name and probing a map cost ~110 instructions, three to four
//! times per forwarded command.

/// Names of 1 to `MAX_LEN` bytes by length and the first byte's low 5 bits.
const MAX_LEN: usize = 32;
const BUCKETS: usize = MAX_LEN * 32;

/// Lowercase names (1 to `MAX_LEN` bytes) to a `T` each; see the module.
pub struct NameIndex<T> {
    buckets: Vec<Vec<(Box<[u8]>, T)>>,
}

impl<T> NameIndex<T> {
    /// Indexes `items`; names longer than `MAX_LEN` are left out (`get`
    /// finds none of them: callers keep a map for those).
    pub fn new<'a>(items: impl IntoIterator<Item = (&'a [u8], T)>) -> NameIndex<T> {
        let mut buckets: Vec<Vec<(Box<[u8]>, T)>> = (0..BUCKETS).map(|_| Vec::new()).collect();
        for (name, v) in items {
            if let Some(b) = bucket(name) {
                buckets[b].push((name.into(), v));
            }
        }
        NameIndex { buckets }
    }

    /// The value of `lower` (a lowercase name), if indexed.
    #[inline]
    pub fn get(&self, lower: &[u8]) -> Option<&T> {
        self.buckets[bucket(lower)?]
            .iter()
            .find(|(n, _)| **n == *lower)
            .map(|(_, v)| v)
    }

    /// Whether `name` is one the index would hold (`get` answers for it
    /// alone).
    pub fn covers(name: &[u8]) -> bool {
        bucket(name).is_some()
    }

    /// Every indexed name and its value.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &T)> {
        self.buckets.iter().flatten().map(|(n, v)| (&n[..], v))
    }
}

fn bucket(name: &[u8]) -> Option<usize> {
    match (name.len(), name.first()) {
        (1..=MAX_LEN, Some(&c)) => Some((name.len() - 1) * 32 + (c & 31) as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_it_indexed_and_nothing_else() {
        let names: [&[u8]; 5] = [b"get", b"set", b"gex", b"g", b"client|list"];
        let long = [b'x'; MAX_LEN + 1];
        let idx = NameIndex::new(names.iter().copied().chain([&long[..]]).zip(0..));
        for (i, n) in names.iter().enumerate() {
            assert_eq!(idx.get(n), Some(&i), "{n:?}");
        }
        assert_eq!(idx.get(&long), None, "too long to index");
        assert_eq!(idx.get(b"gez"), None);
        assert_eq!(idx.get(b""), None);
        assert_eq!(idx.iter().count(), 5);
    }
}
