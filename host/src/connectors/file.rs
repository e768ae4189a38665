//! The `file` source: text lines of one file; its position is the byte
//! offset of the next unread line. With `rate`, lines are paced to that
//! many per second (demos, and tests that stop a job mid-stream). On the
//! running host the file is opened through the job root that holds it
//! ([`crate::roots`]).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncSeekExt, BufReader};

use super::{Pace, push_line, strip_line_ending};
use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Source, SourceStatus};
use crate::job::LineFormat;
use crate::roots::{self, Roots};
use crate::types::RecordBatch;

pub struct FileSource {
    path: PathBuf,
    roots: Option<Arc<Roots>>,
    format: Option<LineFormat>,
    reader: Option<BufReader<tokio::fs::File>>,
    offset: u64,
    line_number: u64,
    line: Vec<u8>,
    /// Lines per second at most.
    pace: Pace,
}

impl FileSource {
    /// Reads `path` (through the root of `roots` that holds it, if any)
    /// from byte `offset` (0 for a fresh start), `rate` lines per second at
    /// most.
    pub fn new(
        path: PathBuf,
        roots: Option<Arc<Roots>>,
        format: Option<LineFormat>,
        offset: u64,
        rate: Option<f64>,
    ) -> Self {
        Self {
            path,
            roots,
            format,
            reader: None,
            offset,
            line_number: 0,
            line: Vec::new(),
            pace: Pace::new(rate),
        }
    }

    fn io_error(&self, error: std::io::Error) -> OperatorError {
        OperatorError::new(
            FailureKind::Connector,
            format!("cannot read {}: {error}", self.path.display()),
        )
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        if self.reader.is_none() {
            let (path, roots) = (self.path.clone(), self.roots.clone());
            let opened =
                tokio::task::spawn_blocking(move || roots::open_file(roots.as_deref(), &path))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|opened| opened);
            let mut file = tokio::fs::File::from_std(opened.map_err(|e| self.io_error(e))?);
            if self.offset > 0 {
                file.seek(std::io::SeekFrom::Start(self.offset))
                    .await
                    .map_err(|e| self.io_error(e))?;
            }
            self.reader = Some(BufReader::with_capacity(256 << 10, file));
        }
        let max = self.pace.next(max).await;
        while batch.len() < max {
            let reader = self.reader.as_mut().expect("reader opened above");
            let read = reader
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| self.io_error(e))?;
            // An interrupted read leaves its bytes in `self.line`: the
            // position counts a line only once it is in the batch.
            if read == 0 && self.line.is_empty() {
                return Ok(SourceStatus::Ended);
            }
            self.line_number += 1;
            let line = strip_line_ending(&self.line);
            let (path, number) = (&self.path, self.line_number);
            push_line(batch, line, self.format.as_ref(), || {
                format!("{} line {number}", path.display())
            })?;
            self.offset += self.line.len() as u64;
            self.pace.produced(1);
            self.line.clear();
        }
        Ok(SourceStatus::More)
    }
}

impl Source for FileSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.offset
    }
}
