//! Host side of `weir:operator/timers`: timers of the current key, the
//! task's watermark and the host's processing time.

use super::HostState;
use crate::dataflow::TimeDomain;
use crate::dataflow::timers::now_millis;
use crate::plugin::bindings::weir::operator::timers::Host;

impl HostState {
    fn change_timer(
        &mut self,
        domain: TimeDomain,
        timestamp: i64,
        register: bool,
    ) -> wasmtime::Result<()> {
        let key = self.current_key("a timer")?.to_vec();
        if register {
            self.task.timers.register(domain, timestamp, &key);
        } else {
            self.task.timers.delete(domain, timestamp, &key);
        }
        Ok(())
    }
}

impl Host for HostState {
    fn register_event_time_timer(&mut self, timestamp: i64) -> wasmtime::Result<()> {
        self.change_timer(TimeDomain::EventTime, timestamp, true)
    }

    fn delete_event_time_timer(&mut self, timestamp: i64) -> wasmtime::Result<()> {
        self.change_timer(TimeDomain::EventTime, timestamp, false)
    }

    fn register_processing_time_timer(&mut self, timestamp: i64) -> wasmtime::Result<()> {
        self.change_timer(TimeDomain::ProcessingTime, timestamp, true)
    }

    fn delete_processing_time_timer(&mut self, timestamp: i64) -> wasmtime::Result<()> {
        self.change_timer(TimeDomain::ProcessingTime, timestamp, false)
    }

    fn current_watermark(&mut self) -> wasmtime::Result<i64> {
        Ok(self.task.watermark)
    }

    fn current_processing_time(&mut self) -> wasmtime::Result<i64> {
        Ok(now_millis())
    }
}
