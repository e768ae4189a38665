//! Barrier alignment, as a pure state machine (no tokio, no channels): the
//! [`Aligner`] is told which channel delivered which barrier (or ended) and
//! answers which channels to block and when a checkpoint is aligned.
//!
//! Exactly-once: a channel that delivered barrier n is blocked (not read)
//! until barrier n arrived on every live channel; then the task snapshots,
//! forwards barrier n once, and every channel is unblocked. At-least-once:
//! nothing is blocked; the checkpoint is aligned when the last barrier
//! arrives. A channel that ended counts as having delivered every barrier.
//! A barrier newer than the one being aligned aborts the older checkpoint
//! (it can never complete) and starts aligning the newer one; a barrier older
//! than the newest seen is stale and ignored. The aligner keeps the barrier
//! being aligned, so the task forwards it (and what it asks for) as it came.

use crate::job::file::CheckpointMode;
use crate::types::{Barrier, CheckpointId};

/// What the task must do after telling the aligner about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alignment {
    /// Keep going (reading from channels that are not blocked).
    Continue,
    /// Stop reading this channel until the checkpoint is aligned.
    Block(usize),
    /// Every live channel delivered the barrier: snapshot, forward the
    /// barrier once, and unblock every channel. `aborted` is an older
    /// checkpoint abandoned on the way, if any.
    Aligned {
        barrier: Barrier,
        aborted: Option<CheckpointId>,
    },
    /// A newer barrier abandoned the checkpoint being aligned; its blocked
    /// channels are unblocked, and the newer one's first channel is blocked
    /// (`block`).
    Aborted {
        checkpoint: CheckpointId,
        block: Option<usize>,
    },
}

#[derive(Debug)]
pub struct Aligner {
    mode: CheckpointMode,
    ended: Vec<bool>,
    /// Channels that delivered the barrier being aligned.
    arrived: Vec<bool>,
    current: Option<Barrier>,
    /// The newest checkpoint seen (aligned, aborted or in progress).
    newest: Option<CheckpointId>,
}

impl Aligner {
    pub fn new(channels: usize, mode: CheckpointMode) -> Self {
        Self {
            mode,
            ended: vec![false; channels],
            arrived: vec![false; channels],
            current: None,
            newest: None,
        }
    }

    /// The checkpoint being aligned, if any.
    pub fn aligning(&self) -> Option<CheckpointId> {
        self.current.as_ref().map(|b| b.id)
    }

    /// Whether `channel` must not be read now.
    pub fn is_blocked(&self, channel: usize) -> bool {
        self.mode == CheckpointMode::ExactlyOnce && self.current.is_some() && self.arrived[channel]
    }

    fn all_arrived(&self) -> bool {
        self.arrived
            .iter()
            .zip(&self.ended)
            .all(|(arrived, ended)| *arrived || *ended)
    }

    fn finish(&mut self, aborted: Option<CheckpointId>) -> Alignment {
        let barrier = self
            .current
            .take()
            .expect("finish is called while aligning");
        self.arrived.iter_mut().for_each(|a| *a = false);
        Alignment::Aligned { barrier, aborted }
    }

    fn block(&self, channel: usize) -> Alignment {
        if self.mode == CheckpointMode::ExactlyOnce {
            Alignment::Block(channel)
        } else {
            Alignment::Continue
        }
    }

    /// `channel` delivered `barrier`.
    pub fn on_barrier(&mut self, channel: usize, barrier: &Barrier) -> Alignment {
        let checkpoint = barrier.id;
        if self.newest.is_some_and(|newest| checkpoint < newest)
            || (self.current.is_none() && self.newest == Some(checkpoint))
        {
            return Alignment::Continue; // stale: aborted or already aligned
        }
        let mut aborted = None;
        if let Some(current) = self.aligning()
            && checkpoint > current
        {
            aborted = Some(current);
            self.current = None;
            self.arrived.iter_mut().for_each(|a| *a = false);
        }
        self.newest = Some(checkpoint);
        if self.current.is_none() {
            self.current = Some(barrier.clone());
        }
        self.arrived[channel] = true;
        if self.all_arrived() {
            return self.finish(aborted);
        }
        match aborted {
            Some(old) => Alignment::Aborted {
                checkpoint: old,
                block: (self.mode == CheckpointMode::ExactlyOnce).then_some(channel),
            },
            None => self.block(channel),
        }
    }

    /// `channel` delivered end of input: it no longer holds up alignment.
    pub fn on_end_of_input(&mut self, channel: usize) -> Alignment {
        self.ended[channel] = true;
        if self.current.is_some() && self.all_arrived() {
            self.finish(None)
        } else {
            Alignment::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::BaseRule;
    use proptest::prelude::*;

    fn barrier(id: u64) -> Barrier {
        Barrier::checkpoint(CheckpointId(id), BaseRule::Chain)
    }

    fn aligned(id: u64) -> Alignment {
        Alignment::Aligned {
            barrier: barrier(id),
            aborted: None,
        }
    }

    #[test]
    fn exactly_once_blocks_until_every_channel_delivered() {
        let mut aligner = Aligner::new(3, CheckpointMode::ExactlyOnce);
        assert_eq!(aligner.on_barrier(1, &barrier(1)), Alignment::Block(1));
        assert!(aligner.is_blocked(1) && !aligner.is_blocked(0));
        assert_eq!(aligner.on_barrier(0, &barrier(1)), Alignment::Block(0));
        assert_eq!(aligner.on_end_of_input(2), aligned(1));
        assert!(!aligner.is_blocked(0) && !aligner.is_blocked(1));
        assert_eq!(
            aligner.on_barrier(0, &barrier(1)),
            Alignment::Continue,
            "stale barrier"
        );
    }

    #[test]
    fn at_least_once_never_blocks() {
        let mut aligner = Aligner::new(2, CheckpointMode::AtLeastOnce);
        assert_eq!(aligner.on_barrier(0, &barrier(1)), Alignment::Continue);
        assert!(!aligner.is_blocked(0));
        assert_eq!(aligner.on_barrier(1, &barrier(1)), aligned(1));
    }

    #[test]
    fn a_newer_barrier_aborts_the_older_checkpoint() {
        let mut aligner = Aligner::new(2, CheckpointMode::ExactlyOnce);
        assert_eq!(aligner.on_barrier(0, &barrier(1)), Alignment::Block(0));
        assert_eq!(
            aligner.on_barrier(1, &barrier(2)),
            Alignment::Aborted {
                checkpoint: CheckpointId(1),
                block: Some(1)
            }
        );
        assert!(!aligner.is_blocked(0) && aligner.is_blocked(1));
        assert_eq!(
            aligner.on_barrier(0, &barrier(1)),
            Alignment::Continue,
            "the aborted one is stale"
        );
        assert_eq!(aligner.on_barrier(0, &barrier(2)), aligned(2));
    }

    #[test]
    fn a_single_channel_aligns_at_once() {
        let mut aligner = Aligner::new(1, CheckpointMode::ExactlyOnce);
        assert_eq!(aligner.on_barrier(0, &barrier(1)), aligned(1));
    }

    /// One channel's stream: records numbered by channel, with barrier 1 after
    /// `before` of them.
    #[derive(Debug, Clone)]
    struct Channel {
        before: usize,
        after: usize,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Event {
        Record { channel: usize, index: usize },
        Barrier,
        End,
    }

    fn stream(channel: usize, spec: &Channel) -> Vec<Event> {
        let mut events: Vec<Event> = (0..spec.before)
            .map(|index| Event::Record { channel, index })
            .collect();
        events.push(Event::Barrier);
        events.extend(
            (spec.before..spec.before + spec.after).map(|index| Event::Record { channel, index }),
        );
        events.push(Event::End);
        events
    }

    /// Drives an aligner like the task does: repeatedly read the next event
    /// of an unblocked channel chosen by `choices`. Returns the records
    /// processed before the snapshot, and all records processed.
    fn drive(
        mode: CheckpointMode,
        channels: &[Channel],
        choices: &[usize],
    ) -> (Vec<Event>, Vec<Event>) {
        let streams: Vec<Vec<Event>> = channels
            .iter()
            .enumerate()
            .map(|(c, s)| stream(c, s))
            .collect();
        let mut positions = vec![0; channels.len()];
        let mut aligner = Aligner::new(channels.len(), mode);
        let mut processed = Vec::new();
        let mut snapshot = None;
        let mut choice = choices.iter().cycle();
        loop {
            let readable: Vec<usize> = (0..channels.len())
                .filter(|&c| positions[c] < streams[c].len() && !aligner.is_blocked(c))
                .collect();
            if readable.is_empty() {
                break;
            }
            let channel = readable[choice.next().copied().unwrap_or(0) % readable.len()];
            let event = streams[channel][positions[channel]];
            positions[channel] += 1;
            let outcome = match event {
                Event::Record { .. } => {
                    processed.push(event);
                    Alignment::Continue
                }
                Event::Barrier => aligner.on_barrier(channel, &barrier(1)),
                Event::End => aligner.on_end_of_input(channel),
            };
            if let Alignment::Aligned {
                barrier: aligned, ..
            } = outcome
            {
                assert_eq!(aligned, barrier(1));
                assert!(snapshot.is_none(), "aligned twice");
                snapshot = Some(processed.clone());
            }
        }
        assert!(
            positions.iter().zip(&streams).all(|(p, s)| *p == s.len()),
            "every channel drained"
        );
        (snapshot.expect("the checkpoint aligned"), processed)
    }

    fn channels() -> impl Strategy<Value = Vec<Channel>> {
        proptest::collection::vec(
            (0usize..6, 0usize..6).prop_map(|(before, after)| Channel { before, after }),
            2..=4,
        )
    }

    fn pre_barrier(channels: &[Channel]) -> Vec<Event> {
        let mut records: Vec<Event> = channels
            .iter()
            .enumerate()
            .flat_map(|(channel, spec)| {
                (0..spec.before).map(move |index| Event::Record { channel, index })
            })
            .collect();
        records.sort_by_key(|e| format!("{e:?}"));
        records
    }

    proptest! {
        #[test]
        fn exactly_once_snapshots_exactly_the_pre_barrier_records(
            channels in channels(),
            choices in proptest::collection::vec(0usize..4, 1..64),
        ) {
            let (mut snapshot, processed) = drive(CheckpointMode::ExactlyOnce, &channels, &choices);
            snapshot.sort_by_key(|e| format!("{e:?}"));
            prop_assert_eq!(snapshot, pre_barrier(&channels));
            let total: usize = channels.iter().map(|c| c.before + c.after).sum();
            prop_assert_eq!(processed.len(), total);
        }

        #[test]
        fn at_least_once_snapshots_every_pre_barrier_record(
            channels in channels(),
            choices in proptest::collection::vec(0usize..4, 1..64),
        ) {
            let (snapshot, _) = drive(CheckpointMode::AtLeastOnce, &channels, &choices);
            for record in pre_barrier(&channels) {
                prop_assert!(snapshot.contains(&record), "missing {:?}", record);
            }
        }
    }
}
