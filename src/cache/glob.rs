//! Redis `MATCH` glob syntax (`stringmatchlen` in `util.c`): `*`, `?`,
//! `[abc]`, `[^a]`, `[a-z]` and `\` escapes. Case-sensitive, as in Redis.

pub fn matches(pattern: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    while p < pattern.len() {
        match pattern[p] {
            b'*' => {
                while p + 1 < pattern.len() && pattern[p + 1] == b'*' {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                return (i..=s.len()).any(|j| matches(&pattern[p + 1..], &s[j..]));
            }
            b'?' => {
                if i >= s.len() {
                    return false;
                }
                i += 1;
            }
            b'[' => {
                if i >= s.len() {
                    return false;
                }
                p += 1;
                let not = pattern.get(p) == Some(&b'^');
                if not {
                    p += 1;
                }
                let mut hit = false;
                loop {
                    if p >= pattern.len() {
                        // Unterminated class: Redis treats the end as `]`.
                        p -= 1;
                        break;
                    }
                    match pattern[p] {
                        b'\\' if p + 1 < pattern.len() => {
                            p += 1;
                            hit |= pattern[p] == s[i];
                        }
                        b']' => break,
                        lo if p + 2 < pattern.len() && pattern[p + 1] == b'-' => {
                            let hi = pattern[p + 2];
                            let (lo, hi) = if lo > hi { (hi, lo) } else { (lo, hi) };
                            hit |= (lo..=hi).contains(&s[i]);
                            p += 2;
                        }
                        c => hit |= c == s[i],
                    }
                    p += 1;
                }
                if hit == not {
                    return false;
                }
                i += 1;
            }
            b'\\' if p + 1 < pattern.len() => {
                p += 1;
                if i >= s.len() || pattern[p] != s[i] {
                    return false;
                }
                i += 1;
            }
            c => {
                if i >= s.len() || c != s[i] {
                    return false;
                }
                i += 1;
            }
        }
        p += 1;
    }
    i == s.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        let m = |p: &str, s: &str| matches(p.as_bytes(), s.as_bytes());
        assert!(m("session:*", "session:42"));
        assert!(!m("session:*", "sessions:42"));
        assert!(m("*", ""));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo") && !m("h[^e]llo", "hello"));
        assert!(m("h[a-c]llo", "hbllo") && !m("h[a-c]llo", "hdllo"));
        assert!(m("a\\*b", "a*b") && !m("a\\*b", "axb"));
        assert!(m("*:coa:*", "finance:coa:1"));
    }
}
