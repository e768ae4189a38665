//! Plain data types shared by every layer: records, record batches, stream
//! events (among them the checkpoint [`Barrier`], which says what it asks
//! of the subtasks it passes), key groups, checkpoint ids and the wall
//! clock.
//!
//! This module is a leaf: it depends on neither wasmtime nor RocksDB, and the
//! dataflow layer speaks only these types.

/// Event time in milliseconds since the Unix epoch.
pub type Timestamp = i64;

/// The watermark before any has been seen.
pub const MIN_WATERMARK: Timestamp = i64::MIN;
/// The watermark a bounded input sends when it ends: fires every event-time timer.
pub const MAX_WATERMARK: Timestamp = i64::MAX;

/// Id of a checkpoint or savepoint, increasing per job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckpointId(pub u64);

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_millis() -> Timestamp {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Timestamp)
        .unwrap_or(0)
}

/// Where checkpoints or savepoints are written, or a restore point is
/// read: a local directory or a place on object storage. Parsed once where
/// the user names it (job file, command line, API request), so nothing
/// below asks whether a path is really a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    Local(std::path::PathBuf),
    S3(S3Url),
}

/// `s3://bucket/prefix` (the prefix may be empty).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`.
    pub prefix: String,
}

/// A location that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text:?} is not a location: {reason}")]
pub struct BadLocation {
    pub text: String,
    pub reason: &'static str,
}

impl S3Url {
    /// The place `relative` below this one.
    pub fn join(&self, relative: &str) -> S3Url {
        let relative = relative.trim_matches('/');
        let prefix = match (self.prefix.is_empty(), relative.is_empty()) {
            (_, true) => self.prefix.clone(),
            (true, false) => relative.to_string(),
            (false, false) => format!("{}/{relative}", self.prefix),
        };
        S3Url {
            bucket: self.bucket.clone(),
            prefix,
        }
    }
}

impl std::fmt::Display for S3Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.is_empty() {
            true => write!(f, "s3://{}", self.bucket),
            false => write!(f, "s3://{}/{}", self.bucket, self.prefix),
        }
    }
}

impl Location {
    /// `s3://bucket[/prefix]` is object storage; another `scheme://` is
    /// refused; anything else is a local path (as given: relative paths
    /// are the caller's to resolve).
    pub fn parse(text: &str) -> Result<Self, BadLocation> {
        let bad = |reason| BadLocation {
            text: text.to_string(),
            reason,
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let rest = rest.trim_end_matches('/');
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// location names a bucket (s3://bucket/prefix)"));
            }
            return Ok(Location::S3(S3Url {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            }));
        }
        if let Some((scheme, _)) = text.split_once("://")
            && !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-' || c == '.')
        {
            return Err(bad(
                "the only object storage is s3:// (a local path has no scheme)",
            ));
        }
        if text.is_empty() {
            return Err(bad("it is empty"));
        }
        Ok(Location::Local(std::path::PathBuf::from(text)))
    }

    /// The local directory, if it is one.
    pub fn local(&self) -> Option<&std::path::Path> {
        match self {
            Location::Local(path) => Some(path),
            Location::S3(_) => None,
        }
    }

    /// The place `relative` below this one.
    pub fn join(&self, relative: &str) -> Location {
        match self {
            Location::Local(path) => Location::Local(path.join(relative)),
            Location::S3(url) => Location::S3(url.join(relative)),
        }
    }
}

impl From<std::path::PathBuf> for Location {
    fn from(path: std::path::PathBuf) -> Self {
        Location::Local(path)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(path) => write!(f, "{}", path.display()),
            Location::S3(url) => url.fmt(f),
        }
    }
}

impl std::str::FromStr for Location {
    type Err = BadLocation;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Location::parse(text)
    }
}

impl<'de> serde::Deserialize<'de> for Location {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Location::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A checkpoint barrier: which checkpoint, and what it asks of every
/// subtask it passes. Barriers travel in-band (a [`StreamEvent`]), so what
/// a barrier means travels with it: no subtask looks it up elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Barrier {
    pub id: CheckpointId,
    pub kind: BarrierKind,
}

impl Barrier {
    /// A periodic checkpoint's barrier.
    pub fn checkpoint(id: CheckpointId, base: BaseRule) -> Self {
        Self {
            id,
            kind: BarrierKind::Checkpoint { base },
        }
    }
}

/// What a barrier asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarrierKind {
    /// A checkpoint, for failure recovery: each operator subtask stores a
    /// delta of its keyed state or a base, as `base` says.
    Checkpoint { base: BaseRule },
    /// A savepoint: each operator subtask writes its state into the
    /// target's directory, in the target's form.
    Savepoint(std::sync::Arc<SavepointTarget>),
    /// The final checkpoint, taken once every source's input ended
    /// (FLIP-147): each operator closes before its snapshot, so the
    /// checkpoint covers the job's whole output.
    Final,
}

/// Whether an operator subtask's checkpoint is a base (its state's files)
/// or a delta (the cells changed since the last one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRule {
    /// As the subtask's chain says: a base when it has none or its deltas
    /// grew long.
    Chain,
    /// A base in every operator subtask (its cache written to its
    /// backend): a checkpoint that prepares a savepoint.
    Forced,
    /// A delta wherever there is a chain to extend: an upgrade's standby
    /// follows the chain's deltas.
    Held,
}

/// Where a savepoint's state goes, and in which form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavepointTarget {
    /// The savepoint directory (local: a savepoint for object storage is
    /// staged here and uploaded once complete), written through its handle.
    pub dir: OutDir,
    pub form: SavepointForm,
    /// Set for a task's part of a cluster savepoint taken without a stop:
    /// the cut's name, the same in every task. Each exchange writer marks
    /// the cut in its exchange after this savepoint's epoch; each exchange
    /// reader sends the barrier only once every writer of its key groups
    /// marked it, having read all they published before and nothing after
    /// (see `connectors::exchange`, "Cuts"), so the tasks' savepoints form
    /// one cut.
    pub cut: Option<std::sync::Arc<str>>,
}

/// A directory the host writes files into by names relative to it,
/// through a cap-std handle opened once: whatever becomes of its path
/// meanwhile (renamed, a parent swapped for a symlink), every file lands in
/// the directory that was opened, and no name in it leads out (`..` and
/// symlinks out of it are refused). `path` names it in messages and
/// metadata. A savepoint directory inside the running host's job roots is
/// one opened through the root's handle (see the checkpoint coordinator).
#[derive(Debug, Clone)]
pub struct OutDir {
    path: std::path::PathBuf,
    handle: std::sync::Arc<cap_std::fs::Dir>,
    /// The directory holding it and its name there, when it was created
    /// through a handle: how it is removed without walking its path again.
    parent: Option<(std::sync::Arc<cap_std::fs::Dir>, std::path::PathBuf)>,
}

impl PartialEq for OutDir {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path
    }
}

impl Eq for OutDir {}

impl OutDir {
    /// The directory at `path` (the host's own: opened as the path says).
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let handle = cap_std::fs::Dir::open_ambient_dir(path, cap_std::ambient_authority())?;
        Ok(Self {
            path: path.to_path_buf(),
            handle: std::sync::Arc::new(handle),
            parent: None,
        })
    }

    /// A new directory `name` (a plain name) made in `parent`, whose path
    /// is `parent_path`; fails if it exists.
    pub fn create_in(
        parent: cap_std::fs::Dir,
        parent_path: &std::path::Path,
        name: &str,
    ) -> std::io::Result<Self> {
        let plain = std::path::Path::new(name);
        if plain.components().count() != 1
            || !matches!(
                plain.components().next(),
                Some(std::path::Component::Normal(_))
            )
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain name"),
            ));
        }
        parent.create_dir(plain)?;
        let handle = parent.open_dir(plain)?;
        Ok(Self {
            path: parent_path.join(plain),
            handle: std::sync::Arc::new(handle),
            parent: Some((std::sync::Arc::new(parent), plain.to_path_buf())),
        })
    }

    /// Its path, for messages and metadata.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// `<path>/<rel>`, for messages.
    pub fn join(&self, rel: impl AsRef<std::path::Path>) -> std::path::PathBuf {
        self.path.join(rel)
    }

    /// Creates (truncating) the file `rel` inside it.
    pub fn create(&self, rel: impl AsRef<std::path::Path>) -> std::io::Result<std::fs::File> {
        Ok(self.handle.create(rel)?.into_std())
    }

    /// Opens the file `rel` inside it for reading.
    pub fn open_file(&self, rel: impl AsRef<std::path::Path>) -> std::io::Result<std::fs::File> {
        Ok(self.handle.open(rel)?.into_std())
    }

    /// Creates the directory `rel` inside it, with its parents.
    pub fn create_dir_all(&self, rel: impl AsRef<std::path::Path>) -> std::io::Result<()> {
        self.handle.create_dir_all(rel)
    }

    /// Renames `from` to `to`, both inside it.
    pub fn rename(
        &self,
        from: impl AsRef<std::path::Path>,
        to: impl AsRef<std::path::Path>,
    ) -> std::io::Result<()> {
        self.handle.rename(from, &self.handle, to)
    }

    /// Hard-links the host's own file `source` (outside it, named by its
    /// path) as `rel` inside it.
    pub fn hard_link_from(
        &self,
        source: &std::path::Path,
        rel: impl AsRef<std::path::Path>,
    ) -> std::io::Result<()> {
        let (Some(parent), Some(name)) = (source.parent(), source.file_name()) else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} names no file", source.display()),
            ));
        };
        let parent = cap_std::fs::Dir::open_ambient_dir(parent, cap_std::ambient_authority())?;
        parent.hard_link(name, &self.handle, rel)
    }

    /// Makes its entries (new names, renames, links) durable.
    pub fn sync(&self) -> std::io::Result<()> {
        let mut options = cap_std::fs::OpenOptions::new();
        options.read(true);
        self.handle.open_with(".", &options)?.sync_all()
    }

    /// Removes it and everything in it: through the directory that holds
    /// it when it was made through a handle, else by its path.
    pub fn remove(&self) -> std::io::Result<()> {
        match &self.parent {
            Some((parent, name)) => parent.remove_dir_all(name),
            None => std::fs::remove_dir_all(&self.path),
        }
    }
}

/// The form a savepoint's keyed state takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SavepointForm {
    /// One canonical `.state` dump per subtask: relocatable, readable at
    /// any parallelism and by any backend.
    #[default]
    Canonical,
    /// The backend's own files of a full base: quick to write and to
    /// reopen file for file where the key-group range is unchanged.
    Native,
    /// The subtask's checkpoint chain (its latest base and the deltas
    /// since, linked in) plus one delta of the changes since its last
    /// checkpoint: the least to write at the barrier, and a restore that
    /// already holds the chain's state (an upgrade's standby) applies only
    /// the new deltas. A subtask without a chain writes
    /// [`SavepointForm::Native`].
    Incremental,
}

/// One record of a batch, as offsets into the batch's `data` buffer.
///
/// Its memory layout is the flat layout of `weir:operator` (`wit/operator.wit`:
/// eight u32 per record), so a batch's entries cross the Wasm boundary as
/// they lie, without encoding ([`BatchEntry::as_words`],
/// [`BatchEntry::from_words`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatchEntry {
    pub key_offset: u32,
    /// `-1` when the record has no key (`u32::MAX` as a flat word).
    pub key_length: i32,
    pub value_offset: u32,
    pub value_length: u32,
    /// Bit 0: the record has a timestamp. Other bits are ignored.
    flags: u32,
    reserved: u32,
    timestamp_low: u32,
    timestamp_high: u32,
}

/// u32 words per [`BatchEntry`].
pub const ENTRY_WORDS: usize = 8;

const _: () = assert!(std::mem::size_of::<BatchEntry>() == ENTRY_WORDS * 4);
const _: () = assert!(std::mem::align_of::<BatchEntry>() == 4);

/// `BatchEntry::flags` bit: the record has a timestamp.
const HAS_TIMESTAMP: u32 = 1;

impl BatchEntry {
    pub fn new(
        key_offset: u32,
        key_length: i32,
        value_offset: u32,
        value_length: u32,
        timestamp: Option<Timestamp>,
    ) -> Self {
        let stamp = timestamp.unwrap_or(0) as u64;
        Self {
            key_offset,
            key_length,
            value_offset,
            value_length,
            flags: u32::from(timestamp.is_some()) * HAS_TIMESTAMP,
            reserved: 0,
            timestamp_low: stamp as u32,
            timestamp_high: (stamp >> 32) as u32,
        }
    }

    pub fn timestamp(&self) -> Option<Timestamp> {
        (self.flags & HAS_TIMESTAMP != 0).then_some(
            (u64::from(self.timestamp_high) << 32 | u64::from(self.timestamp_low)) as i64,
        )
    }

    /// The entries as flat words, in place.
    pub fn as_words(entries: &[BatchEntry]) -> &[u32] {
        // SAFETY: `BatchEntry` is `repr(C)`, eight 4-byte integers with no
        // padding (asserted above), so its memory is `ENTRY_WORDS` u32s.
        unsafe {
            std::slice::from_raw_parts(entries.as_ptr().cast::<u32>(), entries.len() * ENTRY_WORDS)
        }
    }

    /// Entries from flat words (a multiple of [`ENTRY_WORDS`]), in place.
    /// Offsets are checked by [`RecordBatch::from_parts`].
    pub fn from_words(words: &[u32]) -> Result<&[BatchEntry], String> {
        if !words.len().is_multiple_of(ENTRY_WORDS) {
            return Err(format!(
                "{} entry words is not a multiple of {ENTRY_WORDS}",
                words.len()
            ));
        }
        // SAFETY: u32s are 4-aligned, as `BatchEntry` is; any bit pattern
        // is a valid `BatchEntry` (integers only); the length is whole
        // entries.
        Ok(unsafe {
            std::slice::from_raw_parts(
                words.as_ptr().cast::<BatchEntry>(),
                words.len() / ENTRY_WORDS,
            )
        })
    }
}

/// Entries are equal when the records they describe are: unused bits and
/// the timestamp words of a record without one do not count.
impl PartialEq for BatchEntry {
    fn eq(&self, other: &Self) -> bool {
        (
            self.key_offset,
            self.key_length,
            self.value_offset,
            self.value_length,
            self.timestamp(),
        ) == (
            other.key_offset,
            other.key_length,
            other.value_offset,
            other.value_length,
            other.timestamp(),
        )
    }
}

impl Eq for BatchEntry {}

/// A borrowed view of one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    pub timestamp: Option<Timestamp>,
}

/// Many records in one flat buffer: the unit that crosses channels and the
/// Wasm boundary (two allocations per batch, none per record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordBatch {
    data: Vec<u8>,
    entries: Vec<BatchEntry>,
}

impl RecordBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            data: Vec::with_capacity(bytes),
            entries: Vec::with_capacity(records),
        }
    }

    /// Rebuilds a batch from its parts, checking every offset.
    pub fn from_parts(data: Vec<u8>, entries: Vec<BatchEntry>) -> Result<Self, String> {
        for (index, entry) in entries.iter().enumerate() {
            let in_bounds = |offset: u32, length: u32| {
                (offset as usize)
                    .checked_add(length as usize)
                    .is_some_and(|end| end <= data.len())
            };
            if entry.key_length < -1 {
                return Err(format!(
                    "batch entry {index} has key length {}",
                    entry.key_length
                ));
            }
            if (entry.key_length >= 0 && !in_bounds(entry.key_offset, entry.key_length as u32))
                || !in_bounds(entry.value_offset, entry.value_length)
            {
                return Err(format!(
                    "batch entry {index} points outside the batch's {} data bytes",
                    data.len()
                ));
            }
        }
        Ok(Self { data, entries })
    }

    /// The data buffer and the entries (what [`RecordBatch::from_parts`]
    /// takes), e.g. to rewrite values in place.
    pub fn into_parts(self) -> (Vec<u8>, Vec<BatchEntry>) {
        (self.data, self.entries)
    }

    pub fn push(&mut self, key: Option<&[u8]>, value: &[u8], timestamp: Option<Timestamp>) {
        let (key_offset, key_length) = match key {
            Some(key) => {
                let offset = self.data.len() as u32;
                self.data.extend_from_slice(key);
                (offset, key.len() as i32)
            }
            None => (0, -1),
        };
        let value_offset = self.data.len() as u32;
        self.data.extend_from_slice(value);
        self.entries.push(BatchEntry::new(
            key_offset,
            key_length,
            value_offset,
            value.len() as u32,
            timestamp,
        ));
    }

    pub fn push_record(&mut self, record: RecordRef<'_>) {
        self.push(record.key, record.value, record.timestamp);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of key and value data held.
    pub fn data_len(&self) -> usize {
        self.data.len()
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    pub fn entries(&self) -> &[BatchEntry] {
        &self.entries
    }

    pub fn get(&self, index: usize) -> Option<RecordRef<'_>> {
        self.entries.get(index).map(|entry| self.view(entry))
    }

    pub fn key(&self, index: usize) -> Option<&[u8]> {
        self.entries
            .get(index)
            .and_then(|entry| self.entry_key(entry))
    }

    fn entry_key(&self, entry: &BatchEntry) -> Option<&[u8]> {
        (entry.key_length >= 0).then(|| {
            let start = entry.key_offset as usize;
            &self.data[start..start + entry.key_length as usize]
        })
    }

    fn view<'a>(&'a self, entry: &BatchEntry) -> RecordRef<'a> {
        let start = entry.value_offset as usize;
        RecordRef {
            key: self.entry_key(entry),
            value: &self.data[start..start + entry.value_length as usize],
            timestamp: entry.timestamp(),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = RecordRef<'_>> {
        self.entries.iter().map(|entry| self.view(entry))
    }

    /// The largest timestamp in the batch, if any record has one.
    pub fn max_timestamp(&self) -> Option<Timestamp> {
        self.entries.iter().filter_map(BatchEntry::timestamp).max()
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.entries.clear();
    }

    /// Takes the contents, leaving an empty batch with the same capacity hint.
    pub fn take(&mut self) -> RecordBatch {
        let records = self.entries.capacity();
        let bytes = self.data.capacity();
        std::mem::replace(self, RecordBatch::with_capacity(records, bytes))
    }
}

/// What flows on a channel between two subtasks. Barriers and watermarks
/// travel in-band with the records, so their order relative to records is
/// exactly the order they were sent in.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    Records(RecordBatch),
    Watermark(Timestamp),
    Barrier(Barrier),
    EndOfInput,
}

/// Key groups: the unit of keyed-state distribution (Flink's scheme).
pub mod ttl;

pub mod key_group {
    use std::ops::Range;

    /// The largest supported `max_parallelism`.
    pub const MAX_MAX_PARALLELISM: u32 = 32_768;

    /// Stable hash of a key (xxh3, seed 0). Part of the persisted format:
    /// never change it without a savepoint migration.
    pub fn hash(key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(key)
    }

    /// Key group of a key: `hash(key) % max_parallelism`.
    pub fn of_key(key: &[u8], max_parallelism: u32) -> u16 {
        (hash(key) % u64::from(max_parallelism)) as u16
    }

    /// The subtask that owns a key group.
    pub fn subtask_of(key_group: u16, parallelism: u32, max_parallelism: u32) -> u32 {
        (u32::from(key_group) * parallelism) / max_parallelism
    }

    /// The contiguous key-group range a subtask owns.
    pub fn range_of(subtask: u32, parallelism: u32, max_parallelism: u32) -> Range<u32> {
        let start = (subtask * max_parallelism).div_ceil(parallelism);
        let end = ((subtask + 1) * max_parallelism).div_ceil(parallelism);
        start..end
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn ranges_agree_with_assignment(max_p in 1u32..512, p_seed in 1u32..512) {
                let p = 1 + (p_seed - 1) % max_p;
                let mut next = 0;
                for subtask in 0..p {
                    let range = range_of(subtask, p, max_p);
                    prop_assert_eq!(range.start, next);
                    for group in range.clone() {
                        prop_assert_eq!(subtask_of(group as u16, p, max_p), subtask);
                    }
                    next = range.end;
                }
                prop_assert_eq!(next, max_p);
            }
        }

        #[test]
        fn hash_is_stable() {
            // Persisted formats depend on this value never changing.
            assert_eq!(of_key(b"hello", 128), of_key(b"hello", 128));
            assert_eq!(hash(b""), 0x2d06800538d394c2);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn locations_parse_once_into_local_or_s3() {
        use super::{Location, S3Url};
        assert_eq!(
            Location::parse("s3://bucket/a/b/").expect("parses"),
            Location::S3(S3Url {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            })
        );
        let bucket = Location::parse("s3://bucket").expect("parses");
        assert_eq!(bucket.to_string(), "s3://bucket");
        assert_eq!(bucket.join("job/").to_string(), "s3://bucket/job");
        assert_eq!(
            Location::parse("s3://bucket/a")
                .expect("parses")
                .join("b")
                .to_string(),
            "s3://bucket/a/b"
        );
        assert!(Location::parse("s3:///x").is_err(), "no bucket");
        let error = Location::parse("gs://bucket/x").expect_err("another scheme");
        assert!(
            error.to_string().contains("only object storage is s3://"),
            "{error}"
        );
        assert!(Location::parse("").is_err());
        assert_eq!(
            Location::parse("/tmp/s3").expect("a path"),
            Location::Local("/tmp/s3".into())
        );
        assert_eq!(
            Location::parse("weir-data/x").expect("a path").local(),
            Some(std::path::Path::new("weir-data/x"))
        );
    }

    use super::*;

    #[test]
    fn batch_round_trips_records() {
        let mut batch = RecordBatch::new();
        batch.push(Some(b"k1"), b"v1", Some(5));
        batch.push(None, b"", None);
        batch.push(Some(b""), b"value", Some(-3));
        let records: Vec<_> = batch.iter().collect();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0].key, Some(&b"k1"[..]));
        assert_eq!(records[0].value, b"v1");
        assert_eq!(records[1].key, None);
        assert_eq!(records[2].key, Some(&b""[..]));
        assert_eq!(records[2].timestamp, Some(-3));
        assert_eq!(batch.max_timestamp(), Some(5));
        let rebuilt = RecordBatch::from_parts(batch.data().to_vec(), batch.entries().to_vec())
            .expect("valid");
        assert_eq!(rebuilt, batch);
    }

    #[test]
    fn from_parts_rejects_out_of_bounds_entries() {
        let entry = BatchEntry::new(0, 4, 0, 1, None);
        assert!(RecordBatch::from_parts(vec![0; 2], vec![entry]).is_err());
    }
}
