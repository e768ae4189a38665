//! The connector settings of a job file's sources and sinks, checked and
//! turned into [`SourceKind`] and [`SinkKind`]: the file paths, the
//! generator's counts and rate, the socket's address, NATS servers,
//! streams and subjects.

use super::file::{SinkKindName, SourceKindName};
use super::validate::check_rate;
use super::*;
use std::path::Path;

pub(super) fn source_kind(
    source: &file::SourceSpec,
    base: &Path,
    problems: &mut Vec<String>,
) -> Option<SourceKind> {
    let uid = &source.uid;
    let mut stray = |key: &str, present: bool| {
        if present {
            problems.push(format!(
                "source `{uid}`: key `{key}` does not apply to a {:?} source",
                source.kind
            ));
        }
    };
    if source.kind != SourceKindName::Nats {
        stray("url", source.url.is_some());
        stray("stream", source.stream.is_some());
        stray("subject", source.subject.is_some());
        stray("partitions", source.partitions.is_some());
        stray("key_token", source.key_token.is_some());
        stray("key_header", source.key_header.is_some());
        stray("bounded", source.bounded.is_some());
    }
    match source.kind {
        SourceKindName::Nats => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            check_rate(uid, source.rate, problems);
            let endpoint = nats_endpoint(
                "source",
                uid,
                [&source.url, &source.stream, &source.subject],
                problems,
            );
            let partitions = source.partitions.unwrap_or(1);
            if partitions == 0 {
                problems.push(format!("source `{uid}`: partitions must be at least 1"));
            }
            let key = match (&source.key_token, &source.key_header) {
                (Some(_), Some(_)) => {
                    problems.push(format!(
                        "source `{uid}`: set key_token or key_header, not both"
                    ));
                    NatsKey::None
                }
                (Some(token), None) => NatsKey::Token(*token),
                (None, Some(header)) => NatsKey::Header(header.clone()),
                (None, None) => NatsKey::None,
            };
            if key != NatsKey::None && source.format.as_ref().is_some_and(|f| f.key.is_some()) {
                problems.push(format!(
                    "source `{uid}`: the key comes from format.key or from key_token/key_header, not both"
                ));
            }
            let (url, stream, subject) = endpoint?;
            Some(SourceKind::Nats(NatsSource {
                url,
                stream,
                subject,
                partitions,
                key,
                bounded: source.bounded.unwrap_or(false),
                rate: source.rate,
            }))
        }
        SourceKindName::File => {
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            check_rate(uid, source.rate, problems);
            match &source.path {
                Some(path) => Some(SourceKind::File {
                    path: base.join(path),
                    rate: source.rate,
                }),
                None => {
                    problems.push(format!("source `{uid}`: a file source needs `path`"));
                    None
                }
            }
        }
        SourceKindName::Socket => {
            stray("path", source.path.is_some());
            stray("count", source.count.is_some());
            stray("rate", source.rate.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            match &source.address {
                Some(address) => Some(SourceKind::Socket {
                    address: address.clone(),
                }),
                None => {
                    problems.push(format!(
                        "source `{uid}`: a socket source needs `address` (host:port)"
                    ));
                    None
                }
            }
        }
        SourceKindName::Generator => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            let keys = source.keys.unwrap_or(1000);
            if keys == 0 {
                problems.push(format!("source `{uid}`: keys must be at least 1"));
            }
            check_rate(uid, source.rate, problems);
            Some(SourceKind::Generator {
                count: source.count,
                rate: source.rate,
                keys,
                seed: source.seed.unwrap_or(0),
            })
        }
    }
}

pub(super) fn sink_kind(
    sink: &file::SinkSpec,
    base: &Path,
    problems: &mut Vec<String>,
) -> Option<SinkKind> {
    let uid = &sink.uid;
    if sink.kind != SinkKindName::Nats {
        for (key, present) in [
            ("url", sink.url.is_some()),
            ("stream", sink.stream.is_some()),
            ("subject", sink.subject.is_some()),
            ("delivery", sink.delivery.is_some()),
        ] {
            if present {
                problems.push(format!(
                    "sink `{uid}`: key `{key}` does not apply to a {:?} sink",
                    sink.kind
                ));
            }
        }
    }
    match sink.kind {
        SinkKindName::Nats => {
            if sink.path.is_some() {
                problems.push(format!(
                    "sink `{uid}`: key `path` does not apply to a Nats sink"
                ));
            }
            let endpoint = nats_endpoint(
                "sink",
                uid,
                [&sink.url, &sink.stream, &sink.subject],
                problems,
            );
            let (url, stream, subject) = endpoint?;
            Some(SinkKind::Nats(NatsSink {
                url,
                stream,
                subject,
                delivery: sink.delivery.unwrap_or(Delivery::ExactlyOnce),
            }))
        }
        SinkKindName::Stdout | SinkKindName::Blackhole => {
            if sink.path.is_some() {
                problems.push(format!(
                    "sink `{}`: key `path` does not apply to a {:?} sink",
                    sink.uid, sink.kind
                ));
            }
            Some(if sink.kind == SinkKindName::Stdout {
                SinkKind::Stdout
            } else {
                SinkKind::Blackhole
            })
        }
        SinkKindName::File => match &sink.path {
            Some(path) => Some(SinkKind::File {
                path: base.join(path),
            }),
            None => {
                problems.push(format!("sink `{}`: a file sink needs `path`", sink.uid));
                None
            }
        },
    }
}

/// A nats connector's `url`, `stream` and `subject`: each required, the
/// subject literal. `role` is `source` or `sink`.
pub(super) fn nats_endpoint(
    role: &str,
    uid: &str,
    [url, stream, subject]: [&Option<String>; 3],
    problems: &mut Vec<String>,
) -> Option<(String, String, String)> {
    let mut need = |key: &str, value: &Option<String>| match value {
        Some(v) if !v.is_empty() => Some(v.clone()),
        _ => {
            problems.push(format!("{role} `{uid}`: a nats {role} needs `{key}`"));
            None
        }
    };
    let (url, stream, subject) = (
        need("url", url),
        need("stream", stream),
        need("subject", subject),
    );
    if let Some(subject) = &subject
        && !nats_subject_ok(subject)
    {
        problems.push(format!(
            "{role} `{uid}`: subject {subject:?} must be dot-separated tokens without wildcards or spaces"
        ));
    }
    Some((url?, stream?, subject?))
}

/// A literal NATS subject: non-empty tokens, no wildcards or whitespace.
pub(super) fn nats_subject_ok(subject: &str) -> bool {
    subject.split('.').all(|token| {
        !token.is_empty()
            && !token
                .chars()
                .any(|c| c == '*' || c == '>' || c.is_whitespace())
    })
}
