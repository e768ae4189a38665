//! `faults-plugin`: a test plugin written directly against the WIT (no SDK),
//! in the per-record form. It passes records through unchanged until a
//! record's value equals config `on` (any record if `on` is absent), then
//! misbehaves as config `fault` says: `loop` (never returns), `alloc`
//! (allocates until memory runs out), `trap` (wasm `unreachable`), `error`
//! (returns `err`), `panic` (a Rust panic: its message goes to WASI stderr),
//! `none`, or the sandbox probes `clock` (emits the WASI wall clock in ms) and
//! `fs` (emits what reading the file named by the record's value gave).
//! Config `closing`: a value emitted (unkeyed) when the operator closes.
//! Every keyed record also writes value state
//! `seen`, so per-record state calls are exercised.

use std::cell::RefCell;
use std::hint::black_box;

wit_bindgen::generate!({
    path: "../../../wit",
    world: "operator-plugin",
});

use exports::weir::operator::{metadata, operator};
use weir::operator::types::{PluginInfo, Record, RecordBatch, StateDescriptor, StateKind, Timer};
use weir::operator::{output, state};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    Loop,
    Alloc,
    Trap,
    Error,
    Panic,
    Clock,
    Fs,
}

struct Settings {
    fault: Fault,
    /// Only records with this value trigger the fault; `None`: every record.
    on: Option<Vec<u8>>,
    /// Emitted by `close`.
    closing: Option<Vec<u8>>,
}

thread_local! {
    static SETTINGS: RefCell<Option<Settings>> = const { RefCell::new(None) };
}

fn parse_config(config: &str) -> Result<Settings, String> {
    let config = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    let value: serde_json::Value =
        serde_json::from_str(config).map_err(|e| format!("faults plugin: bad config: {e}"))?;
    let fault = match value
        .get("fault")
        .and_then(|f| f.as_str())
        .unwrap_or("none")
    {
        "none" => Fault::None,
        "loop" => Fault::Loop,
        "alloc" => Fault::Alloc,
        "trap" => Fault::Trap,
        "error" => Fault::Error,
        "panic" => Fault::Panic,
        "clock" => Fault::Clock,
        "fs" => Fault::Fs,
        other => return Err(format!("faults plugin: unknown config `fault` {other:?}")),
    };
    let on = value
        .get("on")
        .and_then(|on| on.as_str())
        .map(|on| on.as_bytes().to_vec());
    let closing = value
        .get("closing")
        .and_then(|c| c.as_str())
        .map(|c| c.as_bytes().to_vec());
    Ok(Settings { fault, on, closing })
}

fn spin_forever() -> ! {
    let mut i = 0u64;
    loop {
        i = black_box(i.wrapping_add(1));
    }
}

fn allocate_forever() -> ! {
    const CHUNK: usize = 1 << 20;
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        for page in chunk.iter_mut().step_by(4096) {
            *page = 1;
        }
        kept.push(black_box(chunk));
        black_box(&kept);
    }
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("faults plugin: trap");
}

struct Faults;

impl operator::Guest for Faults {
    fn open(config: String) -> Result<(), String> {
        let settings = parse_config(&config)?;
        SETTINGS.with(|s| *s.borrow_mut() = Some(settings));
        Ok(())
    }

    fn process(_input: u32, record: Record) -> Result<(), String> {
        let (fault, triggered) = SETTINGS.with(|s| match &*s.borrow() {
            Some(settings) => Ok((
                settings.fault,
                settings.on.as_deref().is_none_or(|on| on == record.value),
            )),
            None => Err("faults plugin: process called before open".to_owned()),
        })?;
        if record.key.is_some() {
            state::value_set("seen", &record.value);
        }
        if triggered {
            match fault {
                Fault::None => {}
                Fault::Loop => spin_forever(),
                Fault::Alloc => allocate_forever(),
                Fault::Trap => trap(),
                Fault::Panic => panic!("faults plugin: panicking on purpose"),
                Fault::Clock => {
                    let millis = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0);
                    output::emit(&Record {
                        key: record.key.clone(),
                        value: millis.to_string().into_bytes(),
                        timestamp: record.timestamp,
                    });
                    return Ok(());
                }
                Fault::Fs => {
                    let path = String::from_utf8_lossy(&record.value).into_owned();
                    let outcome = match std::fs::read(&path) {
                        Ok(bytes) => format!("read {} bytes", bytes.len()),
                        Err(error) => format!("denied: {error}"),
                    };
                    output::emit(&Record {
                        key: record.key.clone(),
                        value: outcome.into_bytes(),
                        timestamp: record.timestamp,
                    });
                    return Ok(());
                }
                Fault::Error => {
                    return Err(format!(
                        "faults plugin: failing on purpose on record {}",
                        String::from_utf8_lossy(&record.value)
                    ));
                }
            }
        }
        output::emit(&record);
        Ok(())
    }

    fn process_batch(_input: u32, _batch: RecordBatch) -> Result<(), String> {
        Err("faults plugin uses the per-record form".to_owned())
    }

    fn on_timer(_timer: Timer) -> Result<(), String> {
        Ok(())
    }

    fn close() -> Result<(), String> {
        let closing = SETTINGS.with(|s| s.borrow().as_ref().and_then(|s| s.closing.clone()));
        if let Some(value) = closing {
            output::emit(&Record {
                key: None,
                value,
                timestamp: None,
            });
        }
        Ok(())
    }
}

impl metadata::Guest for Faults {
    fn describe() -> PluginInfo {
        PluginInfo {
            name: "faults".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            states: vec![StateDescriptor {
                name: "seen".to_owned(),
                kind: StateKind::Value,
                schema_version: 1,
            }],
            batch_input: false,
        }
    }
}

export!(Faults);
