//! Retention of completed checkpoints and reference counts of their shared
//! (incremental) files. Pure: it decides what to delete, the coordinator
//! deletes it.
//!
//! A shared file is written once and referenced by every later checkpoint
//! that still contains it. Completing a checkpoint adds a reference to each
//! of its shared files; retiring one (beyond `retained`) drops its
//! references, and a file whose count reaches zero is deleted. Files an
//! aborted checkpoint uploaded are never counted here; they are either
//! referenced by a later completed checkpoint or collected by
//! [`SharedRegistry::orphans`] when the job restarts.

use std::collections::{HashMap, HashSet, VecDeque};

/// What to delete after a checkpoint completed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retired {
    /// Checkpoint ids whose directories go.
    pub checkpoints: Vec<u64>,
    /// Shared files no retained checkpoint references any more.
    pub shared: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SharedRegistry {
    retained: usize,
    /// Completed checkpoints, oldest first, with their shared files.
    completed: VecDeque<(u64, Vec<String>)>,
    counts: HashMap<String, u32>,
}

impl SharedRegistry {
    pub fn new(retained: usize) -> Self {
        Self {
            retained: retained.max(1),
            completed: VecDeque::new(),
            counts: HashMap::new(),
        }
    }

    /// Records a completed checkpoint; returns what retention retires.
    pub fn complete(&mut self, id: u64, shared: Vec<String>) -> Retired {
        let shared: Vec<String> = shared
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        for file in &shared {
            *self.counts.entry(file.clone()).or_default() += 1;
        }
        self.completed.push_back((id, shared));
        let mut retired = Retired::default();
        while self.completed.len() > self.retained {
            let Some((old, files)) = self.completed.pop_front() else {
                break;
            };
            retired.checkpoints.push(old);
            for file in files {
                if let Some(count) = self.counts.get_mut(&file) {
                    *count -= 1;
                    if *count == 0 {
                        self.counts.remove(&file);
                        retired.shared.push(file);
                    }
                }
            }
        }
        retired.shared.sort();
        retired
    }

    /// Retained checkpoint ids, oldest first.
    pub fn retained(&self) -> impl Iterator<Item = u64> + '_ {
        self.completed.iter().map(|(id, _)| *id)
    }

    pub fn is_referenced(&self, file: &str) -> bool {
        self.counts.contains_key(file)
    }

    /// Of `present` (the files found under `shared/`), those no retained
    /// checkpoint references: left by aborted checkpoints or a failed
    /// attempt. Only safe to delete while no checkpoint is in flight.
    pub fn orphans<'a>(&self, present: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        present
            .into_iter()
            .filter(|f| !self.is_referenced(f))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_files_shared_with_retained_checkpoints() {
        let mut registry = SharedRegistry::new(2);
        assert_eq!(
            registry.complete(1, vec!["a".into(), "b".into()]),
            Retired::default()
        );
        registry.complete(2, vec!["b".into(), "c".into()]);
        let retired = registry.complete(3, vec!["c".into(), "d".into()]);
        assert_eq!(retired.checkpoints, vec![1]);
        assert_eq!(retired.shared, vec!["a".to_string()], "b is still in 2");
        let retired = registry.complete(4, vec!["d".into()]);
        assert_eq!(retired.checkpoints, vec![2]);
        assert_eq!(retired.shared, vec!["b".to_string()]);
        assert_eq!(registry.retained().collect::<Vec<_>>(), vec![3, 4]);
        assert_eq!(registry.orphans(["c", "d", "x"]), vec!["x".to_string()]);
    }

    /// One step of a simulated RocksDB + coordinator: SST files are created,
    /// live for a while, and die for ever (compaction); every checkpoint
    /// references exactly the files live at its time; some checkpoints abort.
    #[derive(Debug, Clone)]
    enum Step {
        Create,
        Kill(usize),
        Checkpoint { aborted: bool },
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                3 => Just(Step::Create),
                2 => any::<usize>().prop_map(Step::Kill),
                3 => any::<bool>().prop_map(|a| Step::Checkpoint { aborted: a }),
            ],
            1..120,
        )
    }

    proptest! {
        #[test]
        fn retention_never_deletes_a_file_a_retained_checkpoint_uses(
            retained in 1usize..5,
            steps in steps(),
        ) {
            let mut registry = SharedRegistry::new(retained);
            let mut live: Vec<String> = Vec::new();
            let mut next_file = 0;
            let mut next_id = 1;
            let mut deleted: HashSet<String> = HashSet::new();
            let mut completed: Vec<(u64, Vec<String>)> = Vec::new();
            for step in steps {
                match step {
                    Step::Create => {
                        live.push(format!("{next_file:06}.sst"));
                        next_file += 1;
                    }
                    Step::Kill(i) => {
                        if !live.is_empty() {
                            let i = i % live.len();
                            live.remove(i);
                        }
                    }
                    Step::Checkpoint { aborted } => {
                        let id = next_id;
                        next_id += 1;
                        // A checkpoint never references a deleted file.
                        for file in &live {
                            prop_assert!(!deleted.contains(file), "{file} reused after deletion");
                        }
                        if aborted {
                            continue;
                        }
                        completed.push((id, live.clone()));
                        let retired = registry.complete(id, live.clone());
                        deleted.extend(retired.shared.iter().cloned());
                        let kept: Vec<u64> = registry.retained().collect();
                        prop_assert!(kept.len() <= retained);
                        for (cid, files) in &completed {
                            if kept.contains(cid) {
                                for file in files {
                                    prop_assert!(!deleted.contains(file),
                                        "{file} deleted while checkpoint {cid} is retained");
                                }
                            }
                        }
                    }
                }
            }
            // Nothing leaks: every file of a retired checkpoint that no
            // retained one uses has been deleted.
            let kept: HashSet<u64> = registry.retained().collect();
            let in_use: HashSet<&String> = completed
                .iter()
                .filter(|(id, _)| kept.contains(id))
                .flat_map(|(_, files)| files)
                .collect();
            for (_, files) in &completed {
                for file in files {
                    prop_assert_eq!(deleted.contains(file), !in_use.contains(file));
                }
            }
        }
    }
}
