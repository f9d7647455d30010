//! Choosing a target for each message: round-robin, or a stable key hash (Kafka's murmur2).

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), so key-hash picks the partition a Java
/// producer would pick for the same key and partition count.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for chunk in chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= u32::from(tail[2]) << 16;
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// `Utils.toPositive(murmur2(key)) % n`, the Java default partitioner's choice among `n`.
pub fn key_hash_index(key: &[u8], n: usize) -> usize {
    ((murmur2(key) & 0x7fff_ffff) as usize) % n.max(1)
}

/// Round-robin per lane, so each source partition spreads evenly over its own block.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: Vec<usize>,
}

impl RoundRobin {
    pub fn pick(&mut self, lane: u32, n: usize) -> usize {
        let lane = lane as usize;
        if self.next.len() <= lane {
            self.next.resize(lane + 1, 0);
        }
        let index = self.next[lane] % n.max(1);
        self.next[lane] = index + 1;
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from Kafka's own `UtilsTest.testMurmur2`, plus "" and "a" as the Java client computes them.
    #[test]
    fn murmur2_matches_kafka_java() {
        let cases: [(&[u8], i32); 8] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            (b"abc", 479_470_107),
            (b"", 275_646_681),
            (b"a", -1_563_381_124),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key), expected, "{:?}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn key_hash_is_stable_and_in_range() {
        for n in 1..20 {
            let index = key_hash_index(b"customer-42", n);
            assert!(index < n);
            assert_eq!(index, key_hash_index(b"customer-42", n));
        }
        assert_eq!(
            key_hash_index(b"21", 4),
            (-973_932_308_i32 & 0x7fff_ffff) as usize % 4
        );
    }

    #[test]
    fn round_robin_cycles_per_lane() {
        let mut rr = RoundRobin::default();
        let lane0: Vec<usize> = (0..5).map(|_| rr.pick(0, 3)).collect();
        assert_eq!(lane0, vec![0, 1, 2, 0, 1]);
        assert_eq!(rr.pick(2, 3), 0);
        assert_eq!(rr.pick(0, 3), 2);
    }
}
