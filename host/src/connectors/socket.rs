//! The `socket` source: text lines from a TCP server (`nc -lk PORT` on the
//! other end). It cannot replay: after a failure the lines in flight are lost.

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use super::{push_line, strip_line_ending};
use crate::dataflow::operator::SourceFuture;
use crate::dataflow::{FailureKind, OperatorError, Source, SourceStatus};
use crate::job::LineFormat;
use crate::types::RecordBatch;

pub struct SocketSource {
    address: String,
    format: Option<LineFormat>,
    reader: Option<BufReader<TcpStream>>,
    read: u64,
    line: Vec<u8>,
}

impl SocketSource {
    pub fn new(address: String, format: Option<LineFormat>) -> Self {
        Self {
            address,
            format,
            reader: None,
            read: 0,
            line: Vec::new(),
        }
    }

    fn error(&self, error: std::io::Error) -> OperatorError {
        OperatorError::new(
            FailureKind::Connector,
            format!("socket {}: {error}", self.address),
        )
    }

    async fn fill(
        &mut self,
        batch: &mut RecordBatch,
        max: usize,
    ) -> Result<SourceStatus, OperatorError> {
        if self.reader.is_none() {
            let stream = TcpStream::connect(&self.address)
                .await
                .map_err(|e| self.error(e))?;
            self.reader = Some(BufReader::new(stream));
        }
        while batch.len() < max {
            let reader = self.reader.as_mut().expect("connected above");
            // Wait for the first line; take more only while they are buffered.
            if !batch.is_empty() && !reader.buffer().contains(&b'\n') {
                break;
            }
            let read = reader
                .read_until(b'\n', &mut self.line)
                .await
                .map_err(|e| self.error(e))?;
            // An interrupted read leaves its bytes in `self.line`.
            if read == 0 && self.line.is_empty() {
                return Ok(SourceStatus::Ended);
            }
            let line = strip_line_ending(&self.line);
            let address = &self.address;
            push_line(batch, line, self.format.as_ref(), || {
                format!("socket {address}")
            })?;
            self.read += self.line.len() as u64;
            self.line.clear();
        }
        Ok(SourceStatus::More)
    }
}

impl Source for SocketSource {
    fn next_batch<'a>(&'a mut self, batch: &'a mut RecordBatch, max: usize) -> SourceFuture<'a> {
        Box::pin(self.fill(batch, max))
    }

    fn position(&self) -> u64 {
        self.read
    }
}
