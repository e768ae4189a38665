//! Closing a subtask's keyed state: on the running host, in the
//! background at the lowest priority (freeing a large cache and closing
//! RocksDB take a large fraction of a second), waited for by the next
//! attempt and by the removal of the working directory ([`Teardown`]).

use super::*;
use std::sync::{Arc, Condvar, Mutex};

/// Closes keyed state on background threads (freeing a cache of millions
/// of cells and closing RocksDB take a large fraction of a second, which
/// a stop should not wait for), and lets whoever owns the working
/// directory wait until every close is done before it reuses or removes
/// it.
#[derive(Debug, Default)]
pub struct Teardown {
    open: Mutex<usize>,
    closed: Condvar,
}

impl Teardown {
    fn begin(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) += 1;
    }

    fn end(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        *open -= 1;
        if *open == 0 {
            self.closed.notify_all();
        }
    }

    /// Blocks until every state handed to this teardown has closed.
    pub fn wait(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while *open > 0 {
            open = self.closed.wait(open).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// State on its way to closing: closed (then counted as closed) when
/// dropped, on whichever thread that is.
struct Closing {
    state: Option<(Vec<Table>, SharedBackend)>,
    teardown: Arc<Teardown>,
}

impl Drop for Closing {
    fn drop(&mut self) {
        drop(self.state.take());
        self.teardown.end();
    }
}

impl Drop for KeyedState {
    fn drop(&mut self) {
        let Some(teardown) = self.teardown.take() else {
            return;
        };
        teardown.begin();
        // The backend closes with its last handle: the one `Closing` holds.
        let backend = std::mem::replace(
            &mut self.backend,
            Arc::new(Mutex::new(Box::new(memory::MemoryBackend::new(0)))),
        );
        let closing = Closing {
            state: Some((std::mem::take(&mut self.tables), backend)),
            teardown,
        };
        // If no thread can start, the closure (and the state) drops here.
        in_background("weir-state-close", move || drop(closing));
    }
}

/// Runs `work` on a new thread of the lowest CPU priority, so cleanup
/// yields to the runs that start meanwhile. Returns false (and `work` is
/// dropped uncalled) when no thread could start.
pub fn in_background(name: &str, work: impl FnOnce() + Send + 'static) -> bool {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lowest_priority();
            work()
        })
        .is_ok()
}

/// Gives the calling thread the lowest CPU priority (Linux: nice 19, which
/// applies per thread). Elsewhere it does nothing.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: `gettid` takes no arguments and cannot fail; `setpriority`
    // on the calling thread's id only changes that thread's nice value
    // (an error, e.g. not permitted, leaves it as it was).
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

impl KeyedState {
    /// When dropped, this state closes on a background thread, tracked by
    /// `teardown`.
    pub fn close_in_background(&mut self, teardown: Arc<Teardown>) {
        self.teardown = Some(teardown);
    }
}
