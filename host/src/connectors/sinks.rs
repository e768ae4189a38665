//! The `stdout`, `file` and `blackhole` sinks. Each writes a record's value
//! as one line (`file`, `stdout`) or only counts it (`blackhole`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dataflow::{FailureKind, OperatorError, Sink};
use crate::types::RecordBatch;

/// Prints each record's value as a line on stdout.
#[derive(Debug, Default)]
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        for record in batch.iter() {
            out.write_all(record.value)
                .and_then(|()| out.write_all(b"\n"))
                .map_err(|e| OperatorError::new(FailureKind::Connector, format!("stdout: {e}")))?;
        }
        out.flush()
            .map_err(|e| OperatorError::new(FailureKind::Connector, format!("stdout: {e}")))
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// Writes each record's value as a line to `<dir>/part-<subtask>`.
pub struct FileSink {
    path: PathBuf,
    out: BufWriter<File>,
}

impl FileSink {
    pub fn create(dir: &Path, subtask: u32) -> Result<Self, OperatorError> {
        let path = dir.join(format!("part-{subtask}"));
        let error = |e: std::io::Error| {
            OperatorError::new(
                FailureKind::Connector,
                format!("cannot create {}: {e}", path.display()),
            )
        };
        std::fs::create_dir_all(dir).map_err(error)?;
        let file = File::create(&path).map_err(error)?;
        Ok(Self {
            path: path.clone(),
            out: BufWriter::with_capacity(256 << 10, file),
        })
    }

    fn error(&self, error: std::io::Error) -> OperatorError {
        OperatorError::new(
            FailureKind::Connector,
            format!("cannot write {}: {error}", self.path.display()),
        )
    }
}

impl Sink for FileSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        for record in batch.iter() {
            self.out
                .write_all(record.value)
                .and_then(|()| self.out.write_all(b"\n"))
                .map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        self.out.flush().map_err(|e| self.error(e))?;
        self.out.get_ref().sync_all().map_err(|e| self.error(e))
    }
}

/// Discards records, counting them and their bytes.
#[derive(Debug, Default, Clone)]
pub struct BlackholeSink {
    pub records: Arc<AtomicU64>,
    pub bytes: Arc<AtomicU64>,
}

impl Sink for BlackholeSink {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), OperatorError> {
        self.records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.bytes
            .fetch_add(batch.data_len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn finish(&mut self) -> Result<(), OperatorError> {
        Ok(())
    }
}
