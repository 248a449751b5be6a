//! A small deterministic mutator, for the corpus replay on the stable toolchain.
//!
//! libFuzzer only runs on nightly. The replay in `cargo xtask test` still wants more than the kept inputs
//! themselves: a few thousand variations of them, the same on every run and every machine, so that a
//! failure reproduces. The operations are libFuzzer's simplest ones (bit flips, interesting values,
//! insertions, deletions, duplications, splices, the target's tokens); coverage guidance is what the
//! long nightly runs add.

/// `SplitMix64`: tiny, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator seeded with a name (FNV-1a), so each target has its own sequence.
    pub fn for_name(name: &str) -> Self {
        Self::new(name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        usize::try_from(self.next_u64() % n as u64).expect("below a usize")
    }

    /// A random byte.
    pub fn byte(&mut self) -> u8 {
        self.next_u64().to_le_bytes()[0]
    }
}

/// Values that sit on the edges of integer fields, little-endian.
const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0xff, 0xff],
    &[0, 0x80],
    &[0xff, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0, 0, 0, 0x80],
    &[0xff; 8],
];

/// Applies one to four random mutations to a copy of `input`; `other` is spliced from, `tokens` inserted.
pub fn mutate(rng: &mut Rng, input: &[u8], other: &[u8], tokens: &[&[u8]], max_len: usize) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(4) {
        step(rng, &mut out, other, tokens);
    }
    out.truncate(max_len);
    out
}

fn step(rng: &mut Rng, out: &mut Vec<u8>, other: &[u8], tokens: &[&[u8]]) {
    let len = out.len();
    match rng.below(9) {
        0 if len > 0 => {
            let at = rng.below(len);
            out[at] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let at = rng.below(len);
            out[at] = rng.byte();
        }
        2 => {
            let value = INTERESTING[rng.below(INTERESTING.len())];
            let at = rng.below(len + 1);
            let end = (at + value.len()).min(len);
            out.splice(at..end, value.iter().copied());
        }
        3 => {
            let at = rng.below(len + 1);
            let count = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..count).map(|_| rng.byte()).collect();
            out.splice(at..at, bytes);
        }
        4 if len > 0 => {
            let at = rng.below(len);
            let count = 1 + rng.below((len - at).min(32));
            out.drain(at..at + count);
        }
        5 if len > 0 => {
            let at = rng.below(len);
            let count = 1 + rng.below((len - at).min(64));
            let copy = out[at..at + count].to_vec();
            let to = rng.below(len + 1);
            out.splice(to..to, copy);
        }
        6 if !other.is_empty() => {
            let from = rng.below(other.len());
            let count = 1 + rng.below((other.len() - from).min(256));
            let at = rng.below(len + 1);
            let end = (at + count).min(len);
            out.splice(at..end, other[from..from + count].iter().copied());
        }
        7 if !tokens.is_empty() => {
            let token = tokens[rng.below(tokens.len())];
            let at = rng.below(len + 1);
            out.splice(at..at, token.iter().copied());
        }
        _ if len > 1 => out.truncate(rng.below(len)),
        _ => out.push(rng.byte()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutations() {
        let run = || {
            let mut rng = Rng::for_name("x");
            (0..100).map(|_| mutate(&mut rng, b"hello world", b"other", &[b"tok"], 64)).collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        assert!(first.iter().any(|m| m.as_slice() != b"hello world"));
        assert!(first.iter().all(|m| m.len() <= 64));
    }

    #[test]
    fn names_give_different_sequences() {
        assert_ne!(Rng::for_name("a").next_u64(), Rng::for_name("b").next_u64());
    }
}
