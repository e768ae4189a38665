//! The `generator` source (contract keys `count`, `rate`, `keys`, `seed`):
//! record i carries the word `word(hash(seed, i) % keys)` as key and value.
//! Subtask s of p produces the records i with i % p == s. Its position is
//! the next i.

use super::Pace;
use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{OperatorError, Source, SourceStatus};
use crate::types::RecordBatch;

const SYLLABLES: [&str; 16] = [
    "ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "wu", "xa", "yo", "zi", "bo", "da", "fe",
];

/// The word with index `index`: one syllable per hex digit, so distinct
/// indexes give distinct words.
pub fn word(index: u64) -> String {
    let mut out = String::new();
    let mut rest = index;
    loop {
        out.push_str(SYLLABLES[(rest & 0xf) as usize]);
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    out
}

/// Index of the word record `sequence` carries.
pub fn word_index(sequence: u64, keys: u64, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&sequence.to_le_bytes(), seed) % keys.max(1)
}

pub struct GeneratorSource {
    next: u64,
    step: u64,
    count: Option<u64>,
    keys: u64,
    seed: u64,
    /// This subtask's share of the rate.
    pace: Pace,
    words: Vec<String>,
}

impl GeneratorSource {
    /// Subtask `subtask` of `parallelism`, starting at sequence `next`.
    pub fn new(
        count: Option<u64>,
        rate: Option<f64>,
        keys: u64,
        seed: u64,
        subtask: u32,
        parallelism: u32,
        next: Option<u64>,
    ) -> Self {
        let words = if keys <= 1 << 20 {
            (0..keys).map(word).collect()
        } else {
            Vec::new()
        };
        Self {
            next: next.unwrap_or(u64::from(subtask)),
            step: u64::from(parallelism),
            count,
            keys,
            seed,
            pace: Pace::new(rate.map(|r| r / f64::from(parallelism))),
            words,
        }
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        let max = self.pace.next(max).await;
        for _ in 0..max {
            if self.count.is_some_and(|count| self.next >= count) {
                return Ok(SourceStatus::Ended);
            }
            let index = word_index(self.next, self.keys, self.seed);
            let owned;
            let text: &str = match self.words.get(index as usize) {
                Some(text) => text,
                None => {
                    owned = word(index);
                    &owned
                }
            };
            batch.push(Some(text.as_bytes()), text.as_bytes(), None);
            self.next += self.step;
            self.pace.produced(1);
        }
        if self.count.is_some_and(|count| self.next >= count) {
            return Ok(SourceStatus::Ended);
        }
        Ok(SourceStatus::More)
    }
}

impl Source for GeneratorSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_distinct_and_deterministic() {
        let words: std::collections::HashSet<_> = (0..5000).map(word).collect();
        assert_eq!(words.len(), 5000);
        assert_eq!(word_index(7, 100, 1), word_index(7, 100, 1));
    }

    #[tokio::test]
    async fn subtasks_partition_the_sequence() {
        let mut seen = Vec::new();
        for subtask in 0..3 {
            let mut source = GeneratorSource::new(Some(10), None, 4, 9, subtask, 3, None);
            let mut batch = RecordBatch::new();
            while source.next_batch(&mut batch, 2).await.expect("ok") == SourceStatus::More {}
            seen.push(batch.len());
        }
        assert_eq!(seen, vec![4, 3, 3]);
    }
}
