//! Bridges an [`Operator`] to the generated WIT export traits. Used only
//! through [`export_operator!`](crate::export_operator).

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;

use crate::batch::{WORDS, decode_entry, decode_flat};
use crate::bindings::exports::weir::operator::{flat_operator, metadata, operator};
use crate::bindings::weir::operator::output;
use crate::bindings::weir::operator::types::{self as wit, PluginInfo};
use crate::{Config, Context, Error, Operator, Record, TimeDomain, Timer};
use crate::{batch_state, cursor};

/// The instance's operator (downcast to the exported type) and its context.
struct Slot {
    operator: Option<Box<dyn Any>>,
    ctx: Context,
}

thread_local! {
    static SLOT: RefCell<Slot> = const {
        RefCell::new(Slot { operator: None, ctx: Context::new() })
    };
}

/// Runs `f` on the open operator of type `O`. On success the buffered main
/// output is flushed; on error it is dropped and the message returned.
fn with_operator<O: Operator>(
    f: impl FnOnce(&mut O, &mut Context) -> Result<(), Error>,
) -> Result<(), String> {
    SLOT.with(|slot| {
        let mut slot = slot
            .try_borrow_mut()
            .map_err(|_| "weir-sdk: operator re-entered".to_owned())?;
        let Slot { operator, ctx } = &mut *slot;
        let op = operator
            .as_mut()
            .ok_or_else(|| "weir-sdk: operator called before `open` (or after `close`)".to_owned())?
            .downcast_mut::<O>()
            .ok_or_else(|| "weir-sdk: operator instance has an unexpected type".to_owned())?;
        match f(op, ctx) {
            Ok(()) => {
                ctx.flush();
                Ok(())
            }
            Err(err) => {
                ctx.discard();
                Err(err.into())
            }
        }
    })
}

/// Implements the generated export traits for any [`Operator`].
#[doc(hidden)]
pub struct Adapter<O>(PhantomData<O>);

impl<O: Operator> operator::Guest for Adapter<O> {
    fn open(config: String) -> Result<(), String> {
        let config = Config::from_json(&config)?;
        let op = O::open(&config)?;
        let names = O::metadata().state_names();
        batch_state::declare(names);
        SLOT.with(|slot| {
            let mut slot = slot
                .try_borrow_mut()
                .map_err(|_| "weir-sdk: operator re-entered".to_owned())?;
            slot.ctx.discard();
            slot.operator = Some(Box::new(op));
            Ok(())
        })
    }

    fn process(input: u32, record: wit::Record) -> Result<(), String> {
        with_operator::<O>(|op, ctx| {
            let record = Record::new(record.key.as_deref(), &record.value, record.timestamp);
            ctx.set_default_timestamp(record.timestamp());
            op.process(ctx, input, record)
        })
    }

    fn process_batch(input: u32, batch: wit::RecordBatch) -> Result<(), String> {
        process_records::<O>(input, batch.entries.len(), |i| {
            decode_entry(&batch.data, &batch.entries[i], i)
        })
    }

    fn on_timer(timer: wit::Timer) -> Result<(), String> {
        let domain = match timer.domain {
            wit::TimeDomain::EventTime => TimeDomain::EventTime,
            wit::TimeDomain::ProcessingTime => TimeDomain::ProcessingTime,
        };
        with_operator::<O>(|op, ctx| {
            // Records emitted from an event-time timer default to its time;
            // a processing-time timer's time is wall-clock, not event time.
            ctx.set_default_timestamp((domain == TimeDomain::EventTime).then_some(timer.timestamp));
            let timer = Timer {
                domain,
                timestamp: timer.timestamp,
                key: timer.key,
            };
            op.on_timer(ctx, timer)
        })
    }

    fn close() -> Result<(), String> {
        let opened = SLOT.with(|slot| slot.try_borrow().is_ok_and(|s| s.operator.is_some()));
        if !opened {
            // Nothing to close (e.g. `open` failed).
            return Ok(());
        }
        let result = with_operator::<O>(|op, ctx| {
            ctx.set_default_timestamp(None);
            op.close(ctx)
        });
        SLOT.with(|slot| {
            if let Ok(mut slot) = slot.try_borrow_mut() {
                slot.operator = None;
            }
        });
        result
    }
}

impl<O: Operator> flat_operator::Guest for Adapter<O> {
    fn process_flat(input: u32, data: Vec<u8>, entries: Vec<u32>) -> Result<(), String> {
        if !entries.len().is_multiple_of(WORDS) {
            return Err(format!(
                "malformed record batch: {} entry words is not a multiple of {WORDS}",
                entries.len()
            ));
        }
        let mut data = data;
        let mut in_place = false;
        with_operator::<O>(|op, _| match op.map_batch_in_place(&mut data, &entries) {
            Some(result) => {
                in_place = true;
                result
            }
            None => Ok(()),
        })?;
        if in_place {
            // The same records, their values rewritten where they lie.
            if !entries.is_empty() {
                output::emit_flat(&data, &entries);
            }
            return Ok(());
        }
        let records = entries.len() / WORDS;
        batch_state::begin(records);
        let result = process_records::<O>(input, records, |i| {
            decode_flat(&data, &entries[i * WORDS..(i + 1) * WORDS], i)
        });
        batch_state::end(result.is_ok());
        result
    }
}

/// Runs `process` for records `0..count` of a batch in order, each made
/// the record keyed calls are scoped to before it is processed.
fn process_records<'a, O: Operator>(
    input: u32,
    count: usize,
    record: impl Fn(usize) -> Result<Record<'a>, Error>,
) -> Result<(), String> {
    cursor::begin_batch();
    let result = with_operator::<O>(|op, ctx| {
        for i in 0..count {
            let record = record(i)?;
            let index = u32::try_from(i).map_err(|_| Error::msg("batch too large"))?;
            cursor::want(index);
            ctx.set_default_timestamp(record.timestamp());
            op.process(ctx, input, record)?;
        }
        Ok(())
    });
    cursor::end_batch();
    result
}

impl<O: Operator> metadata::Guest for Adapter<O> {
    fn describe() -> PluginInfo {
        let metadata = O::metadata();
        metadata.declare_ttls();
        metadata.into_plugin_info()
    }
}

impl<O: Operator + crate::Migrate>
    crate::migration_bindings::exports::weir::operator::migration::Guest for Adapter<O>
{
    fn migrate(state: String, from_version: u32, value: Vec<u8>) -> Result<Vec<u8>, String> {
        O::migrate(&state, from_version, &value).map_err(String::from)
    }
}
