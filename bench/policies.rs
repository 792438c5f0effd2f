//! Reference cache policies, simulated on a bench's operation sequence:
//! the hit rates kiln's L1 is compared with. Keys are dense ranks
//! (`0..keys`); a write drops its key, as a coherent cache does.
//!
//! * `lru`: plain LRU, every miss filled.
//! * `wtinylfu`: W-TinyLFU as Caffeine runs it (Einziger, Friedman, Manes,
//!   "TinyLFU: A Highly Efficient Cache Admission Policy", 2017): a 1%
//!   LRU window before a segmented LRU (20% probation, 80% protected); a
//!   key leaving the window enters the main cache only if a count-min
//!   sketch (4 rows of 4-bit counters, a doorkeeper before it, halved every
//!   10 x capacity accesses) counts it more often than the probation
//!   victim.
//! * `ideal_lfu`: the `capacity` most probable keys always cached, writes
//!   ignored: the bound a frequency-based policy approaches on a fixed
//!   distribution.

/// One operation by key rank: a read, or a write that drops the key.
#[derive(Clone, Copy)]
pub enum Access {
    Read(u32),
    Write(u32),
}

const NONE: u32 = u32::MAX;

/// Doubly linked LRU lists over dense keys: `which[k]` is the list holding
/// `k` (or `NONE`); heads are most recent.
struct Lists {
    prev: Vec<u32>,
    next: Vec<u32>,
    which: Vec<u32>,
    head: Vec<u32>,
    tail: Vec<u32>,
    len: Vec<usize>,
}

impl Lists {
    fn new(keys: usize, lists: usize) -> Lists {
        Lists {
            prev: vec![NONE; keys],
            next: vec![NONE; keys],
            which: vec![NONE; keys],
            head: vec![NONE; lists],
            tail: vec![NONE; lists],
            len: vec![0; lists],
        }
    }

    fn unlink(&mut self, k: u32) {
        let l = self.which[k as usize] as usize;
        let (p, n) = (self.prev[k as usize], self.next[k as usize]);
        if p == NONE {
            self.head[l] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail[l] = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.which[k as usize] = NONE;
        self.len[l] -= 1;
    }

    fn push_front(&mut self, l: usize, k: u32) {
        let h = self.head[l];
        self.prev[k as usize] = NONE;
        self.next[k as usize] = h;
        if h == NONE {
            self.tail[l] = k;
        } else {
            self.prev[h as usize] = k;
        }
        self.head[l] = k;
        self.which[k as usize] = l as u32;
        self.len[l] += 1;
    }

    fn pop_back(&mut self, l: usize) -> Option<u32> {
        let t = self.tail[l];
        (t != NONE).then(|| {
            self.unlink(t);
            t
        })
    }
}

/// Hits over reads of plain LRU with room for `capacity` keys.
pub fn lru(ops: &[Access], keys: usize, capacity: usize) -> f64 {
    let mut l = Lists::new(keys, 1);
    let (mut reads, mut hits) = (0u64, 0u64);
    for op in ops {
        match *op {
            Access::Read(k) => {
                reads += 1;
                if l.which[k as usize] != NONE {
                    hits += 1;
                    l.unlink(k);
                } else if l.len[0] >= capacity {
                    l.pop_back(0);
                }
                l.push_front(0, k);
            }
            Access::Write(k) => {
                if l.which[k as usize] != NONE {
                    l.unlink(k);
                }
            }
        }
    }
    hits as f64 / reads as f64
}

/// A count-min sketch of 4-bit counters with a doorkeeper, halved every
/// `10 x capacity` additions.
struct Sketch {
    rows: [Vec<u8>; 4],
    mask: usize,
    door: Vec<bool>,
    added: usize,
    period: usize,
}

impl Sketch {
    fn new(keys: usize, capacity: usize) -> Sketch {
        let width = capacity.next_power_of_two().max(64);
        Sketch {
            rows: std::array::from_fn(|_| vec![0; width]),
            mask: width - 1,
            door: vec![false; keys],
            added: 0,
            period: 10 * capacity,
        }
    }

    fn index(&self, k: u32, row: usize) -> usize {
        let mut h = u64::from(k).wrapping_add(row as u64) ^ 0x9e37_79b9_7f4a_7c15;
        h = (h ^ (h >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (h ^ (h >> 31)) as usize & self.mask
    }

    fn add(&mut self, k: u32) {
        if !self.door[k as usize] {
            self.door[k as usize] = true;
        } else {
            for r in 0..4 {
                let i = self.index(k, r);
                self.rows[r][i] = (self.rows[r][i] + 1).min(15);
            }
        }
        self.added += 1;
        if self.added >= self.period {
            self.added = 0;
            for row in &mut self.rows {
                row.iter_mut().for_each(|c| *c /= 2);
            }
            self.door.iter_mut().for_each(|d| *d = false);
        }
    }

    fn frequency(&self, k: u32) -> u8 {
        let min = (0..4).map(|r| self.rows[r][self.index(k, r)]).min();
        min.unwrap_or(0) + u8::from(self.door[k as usize])
    }
}

/// Hits over reads of W-TinyLFU with room for `capacity` keys.
pub fn wtinylfu(ops: &[Access], keys: usize, capacity: usize) -> f64 {
    const WINDOW: usize = 0;
    const PROBATION: usize = 1;
    const PROTECTED: usize = 2;
    let window_cap = (capacity / 100).max(1);
    let main_cap = capacity - window_cap;
    let protected_cap = main_cap * 8 / 10;
    let mut l = Lists::new(keys, 3);
    let mut sketch = Sketch::new(keys, capacity);
    let (mut reads, mut hits) = (0u64, 0u64);
    for op in ops {
        match *op {
            Access::Read(k) => {
                reads += 1;
                sketch.add(k);
                match l.which[k as usize] {
                    NONE => {
                        l.push_front(WINDOW, k);
                        if l.len[WINDOW] > window_cap {
                            let candidate = l.pop_back(WINDOW).expect("window");
                            if l.len[PROBATION] + l.len[PROTECTED] < main_cap {
                                l.push_front(PROBATION, candidate);
                            } else {
                                let victim = l.tail[PROBATION];
                                let victim = if victim == NONE {
                                    l.tail[PROTECTED]
                                } else {
                                    victim
                                };
                                if sketch.frequency(candidate) > sketch.frequency(victim) {
                                    l.unlink(victim);
                                    l.push_front(PROBATION, candidate);
                                }
                            }
                        }
                        continue;
                    }
                    w => {
                        hits += 1;
                        let w = w as usize;
                        l.unlink(k);
                        if w == WINDOW {
                            l.push_front(WINDOW, k);
                        } else {
                            l.push_front(PROTECTED, k);
                            if l.len[PROTECTED] > protected_cap {
                                let down = l.pop_back(PROTECTED).expect("protected");
                                l.push_front(PROBATION, down);
                            }
                        }
                    }
                }
            }
            Access::Write(k) => {
                if l.which[k as usize] != NONE {
                    l.unlink(k);
                }
            }
        }
    }
    hits as f64 / reads as f64
}

/// The share of reads of the `capacity` most probable keys under zipf(`s`)
/// over `keys` ranks (rank 1 the most probable).
pub fn ideal_lfu(keys: usize, capacity: usize, s: f64) -> f64 {
    let w = |r: usize| 1.0 / (r as f64).powf(s);
    let top: f64 = (1..=capacity.min(keys)).map(w).sum();
    let all: f64 = (1..=keys).map(w).sum();
    top / all
}
