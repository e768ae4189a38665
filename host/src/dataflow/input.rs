//! The [`InputGate`]: a subtask's input channels read fairly (round-robin),
//! any of which can be blocked (barrier alignment stops reading a channel),
//! with the task's watermark kept as the minimum over its live channels.
//! A chained operator's gate has one channel and no receiver: the chain's
//! task hands it what the operator before it sent.

use std::future::poll_fn;
use std::task::Poll;

use tokio::sync::mpsc::Receiver;

use super::{FailureKind, OperatorError};
use crate::types::{MIN_WATERMARK, StreamEvent, Timestamp};

#[derive(Debug)]
struct Channel {
    input: u32,
    /// `None`: fed by the chain's task, never read here.
    receiver: Option<Receiver<StreamEvent>>,
    blocked: bool,
    ended: bool,
    watermark: Timestamp,
}

/// Every input channel of one subtask.
#[derive(Debug)]
pub struct InputGate {
    channels: Vec<Channel>,
    next: usize,
    watermark: Timestamp,
}

/// An event read from channel `channel`, which belongs to input edge `input`.
#[derive(Debug)]
pub struct Delivery {
    pub channel: usize,
    pub input: u32,
    pub event: StreamEvent,
}

impl InputGate {
    /// `channels` are (input edge index, receiver).
    pub fn new(channels: Vec<(u32, Receiver<StreamEvent>)>) -> Self {
        Self {
            channels: channels
                .into_iter()
                .map(|(input, receiver)| Channel {
                    input,
                    receiver: Some(receiver),
                    blocked: false,
                    ended: false,
                    watermark: MIN_WATERMARK,
                })
                .collect(),
            next: 0,
            watermark: MIN_WATERMARK,
        }
    }

    /// The gate of an operator chained to the one before it: one channel,
    /// of input edge `input`.
    pub fn chained(input: u32) -> Self {
        Self {
            channels: vec![Channel {
                input,
                receiver: None,
                blocked: false,
                ended: false,
                watermark: MIN_WATERMARK,
            }],
            next: 0,
            watermark: MIN_WATERMARK,
        }
    }

    /// The input edge index of `channel`.
    pub fn input_of(&self, channel: usize) -> u32 {
        self.channels[channel].input
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The next event from any unblocked, live channel; `Ok(None)` once
    /// every channel has delivered end of input. A channel whose sender
    /// vanished before end of input is an error of kind
    /// [`FailureKind::Disconnected`]: the task upstream failed or was
    /// aborted, so what came before is not the whole input and must not be
    /// finished (closed, flushed, committed) as if it were.
    pub async fn next(&mut self) -> Result<Option<Delivery>, OperatorError> {
        poll_fn(|cx| {
            let count = self.channels.len();
            let mut live = false;
            for step in 0..count {
                let index = (self.next + step) % count;
                let channel = &mut self.channels[index];
                if channel.ended {
                    continue;
                }
                live = true;
                let Some(receiver) = channel.receiver.as_mut().filter(|_| !channel.blocked) else {
                    continue;
                };
                match receiver.poll_recv(cx) {
                    Poll::Ready(Some(event)) => {
                        self.next = (index + 1) % count;
                        return Poll::Ready(Ok(Some(Delivery {
                            channel: index,
                            input: channel.input,
                            event,
                        })));
                    }
                    Poll::Ready(None) => {
                        channel.ended = true;
                        return Poll::Ready(Err(OperatorError::new(
                            FailureKind::Disconnected,
                            format!(
                                "input channel {index} closed before its end of input (the task upstream failed or was cancelled)"
                            ),
                        )));
                    }
                    Poll::Pending => {}
                }
            }
            if live {
                Poll::Pending
            } else {
                Poll::Ready(Ok(None))
            }
        })
        .await
    }

    /// Stops reading `channel` until [`InputGate::unblock_all`].
    pub fn block(&mut self, channel: usize) {
        self.channels[channel].blocked = true;
    }

    pub fn unblock_all(&mut self) {
        for channel in &mut self.channels {
            channel.blocked = false;
        }
    }

    /// Marks `channel` as having delivered end of input.
    pub fn end(&mut self, channel: usize) {
        self.channels[channel].ended = true;
    }

    pub fn live_channels(&self) -> usize {
        self.channels.iter().filter(|c| !c.ended).count()
    }

    /// Records a watermark from `channel`; returns the task's new watermark
    /// if it advanced (the minimum over channels that have not ended).
    pub fn advance_watermark(&mut self, channel: usize, watermark: Timestamp) -> Option<Timestamp> {
        let entry = &mut self.channels[channel].watermark;
        *entry = (*entry).max(watermark);
        let minimum = self
            .channels
            .iter()
            .filter(|c| !c.ended)
            .map(|c| c.watermark)
            .min()?;
        (minimum > self.watermark).then(|| {
            self.watermark = minimum;
            minimum
        })
    }

    pub fn watermark(&self) -> Timestamp {
        self.watermark
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::RecordBatch;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn watermark_is_the_minimum_over_live_channels() {
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let mut gate = InputGate::new(vec![(0, a_rx), (1, b_rx)]);
        assert_eq!(gate.advance_watermark(0, 10), None);
        assert_eq!(gate.advance_watermark(1, 5), Some(5));
        assert_eq!(gate.advance_watermark(1, 20), Some(10));
        assert_eq!(
            gate.advance_watermark(0, 8),
            None,
            "watermarks never go back"
        );
        gate.end(0);
        assert_eq!(gate.advance_watermark(1, 30), Some(30));
        drop((a_tx, b_tx));
    }

    async fn next(gate: &mut InputGate) -> Delivery {
        gate.next().await.expect("connected").expect("an event")
    }

    #[tokio::test]
    async fn blocked_channels_are_not_read_and_ended_ones_end() {
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let mut gate = InputGate::new(vec![(0, a_rx), (0, b_rx)]);
        a_tx.send(StreamEvent::Records(RecordBatch::new()))
            .await
            .expect("send");
        b_tx.send(StreamEvent::EndOfInput).await.expect("send");
        gate.block(0);
        let delivery = next(&mut gate).await;
        assert_eq!(delivery.channel, 1);
        gate.end(1);
        drop(b_tx);
        gate.unblock_all();
        let delivery = next(&mut gate).await;
        assert_eq!(delivery.channel, 0);
        a_tx.send(StreamEvent::EndOfInput).await.expect("send");
        assert!(matches!(
            next(&mut gate).await.event,
            StreamEvent::EndOfInput
        ));
        gate.end(0);
        drop(a_tx);
        assert!(gate.next().await.expect("connected").is_none());
    }

    /// The hole behind a duplicate once committed under load: a channel
    /// whose upstream task failed closed without end of input, the gate
    /// said "input ended", and the sink committed what no checkpoint
    /// covered while the attempt restarted from its last checkpoint.
    #[tokio::test]
    async fn a_channel_closed_before_end_of_input_is_a_disconnection_not_an_end() {
        let (a_tx, a_rx) = mpsc::channel(4);
        let (b_tx, b_rx) = mpsc::channel(4);
        let mut gate = InputGate::new(vec![(0, a_rx), (0, b_rx)]);
        b_tx.send(StreamEvent::EndOfInput).await.expect("send");
        let delivery = next(&mut gate).await;
        gate.end(delivery.channel);
        drop(b_tx);
        drop(a_tx);
        let error = gate.next().await.expect_err("a disconnection");
        assert_eq!(error.kind, FailureKind::Disconnected);
        assert!(error.message.contains("channel 0"), "{error}");
    }
}
