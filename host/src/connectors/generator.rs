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
    let mut buffer = [0; WORD_MAX];
    String::from_utf8_lossy(word_into(index, &mut buffer)).into_owned()
}

/// The longest word: two bytes per hex digit of a u64.
const WORD_MAX: usize = 32;

/// [`word`] written into `buffer`, without allocating (a source writes
/// one per record; a table of every word would take a moment to build at
/// each start with millions of keys).
fn word_into(index: u64, buffer: &mut [u8; WORD_MAX]) -> &[u8] {
    let mut len = 0;
    let mut rest = index;
    loop {
        let syllable = SYLLABLES[(rest & 0xf) as usize].as_bytes();
        buffer[len..len + 2].copy_from_slice(syllable);
        len += 2;
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    &buffer[..len]
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
        Self {
            next: next.unwrap_or(u64::from(subtask)),
            step: u64::from(parallelism),
            count,
            keys,
            seed,
            pace: Pace::new(rate.map(|r| r / f64::from(parallelism))),
        }
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        let max = self.pace.next(max).await;
        let mut buffer = [0; WORD_MAX];
        for _ in 0..max {
            if self.count.is_some_and(|count| self.next >= count) {
                return Ok(SourceStatus::Ended);
            }
            let index = word_index(self.next, self.keys, self.seed);
            let text = word_into(index, &mut buffer);
            batch.push(Some(text), text, None);
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
