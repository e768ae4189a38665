//! The connector settings of a job file's sources and sinks, checked and
//! turned into [`SourceKind`] and [`SinkKind`]: the file paths, the
//! generator's counts and rate, the socket's address, NATS servers,
//! streams and subjects, Kafka brokers, topics and transactional ids.

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
    let nats = source.kind == SourceKindName::Nats;
    let kafka = source.kind == SourceKindName::Kafka;
    let exchange = source.kind == SourceKindName::Exchange;
    if !exchange {
        stray("exchange", source.exchange.is_some());
    }
    if !nats && !exchange {
        stray("url", source.url.is_some());
    }
    if !nats {
        stray("stream", source.stream.is_some());
        stray("subject", source.subject.is_some());
        stray("partitions", source.partitions.is_some());
        stray("key_token", source.key_token.is_some());
    }
    if !nats && !kafka {
        stray("key_header", source.key_header.is_some());
        stray("bounded", source.bounded.is_some());
    }
    if !kafka {
        stray("bootstrap", source.bootstrap.is_some());
        stray("topic", source.topic.is_some());
        stray("topics", source.topics.is_some());
        stray("start", source.start.is_some());
        stray("isolation", source.isolation.is_some());
    }
    match source.kind {
        SourceKindName::Exchange => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            stray("rate", source.rate.is_some());
            stray("format", source.format.is_some());
            exchange_endpoint(
                "source",
                uid,
                &source.url,
                &source.exchange,
                source.replicas,
                problems,
            )
            .map(SourceKind::Exchange)
        }
        SourceKindName::Kafka => {
            stray("path", source.path.is_some());
            stray("address", source.address.is_some());
            stray("count", source.count.is_some());
            stray("keys", source.keys.is_some());
            stray("seed", source.seed.is_some());
            check_rate(uid, source.rate, problems);
            kafka_source(source, problems).map(SourceKind::Kafka)
        }
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
    job_name: &str,
    problems: &mut Vec<String>,
) -> Option<SinkKind> {
    let uid = &sink.uid;
    let mut stray = |key: &str, present: bool| {
        if present {
            problems.push(format!(
                "sink `{uid}`: key `{key}` does not apply to a {:?} sink",
                sink.kind
            ));
        }
    };
    let nats = sink.kind == SinkKindName::Nats;
    let kafka = sink.kind == SinkKindName::Kafka;
    let exchange = sink.kind == SinkKindName::Exchange;
    if !exchange {
        stray("exchange", sink.exchange.is_some());
    }
    if !nats && !exchange {
        stray("url", sink.url.is_some());
    }
    if !nats {
        stray("stream", sink.stream.is_some());
        stray("subject", sink.subject.is_some());
    }
    if !nats && !kafka {
        stray("delivery", sink.delivery.is_some());
    }
    if !kafka {
        stray("bootstrap", sink.bootstrap.is_some());
        stray("topic", sink.topic.is_some());
        stray("partition", sink.partition.is_some());
        stray(
            "transactional_id_prefix",
            sink.transactional_id_prefix.is_some(),
        );
    }
    match sink.kind {
        SinkKindName::Exchange => {
            stray("path", sink.path.is_some());
            exchange_endpoint(
                "sink",
                uid,
                &sink.url,
                &sink.exchange,
                sink.replicas,
                problems,
            )
            .map(SinkKind::Exchange)
        }
        SinkKindName::Kafka => {
            stray("path", sink.path.is_some());
            kafka_sink(sink, job_name, problems).map(SinkKind::Kafka)
        }
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

/// An exchange connector's `url` and `exchange`: both required, the name
/// dot-separated plain tokens (it becomes subjects and a stream name).
fn exchange_endpoint(
    role: &str,
    uid: &str,
    url: &Option<String>,
    name: &Option<String>,
    replicas: Option<usize>,
    problems: &mut Vec<String>,
) -> Option<Exchange> {
    let replicas = match replicas {
        None => Some(1),
        Some(n @ 1..=5) => Some(n),
        Some(n) => {
            problems.push(format!(
                "{role} `{uid}`: replicas = {n}: an exchange's stream keeps 1 to 5 copies"
            ));
            None
        }
    };
    let url = match url {
        Some(url) if !url.is_empty() => Some(url.clone()),
        _ => {
            problems.push(format!(
                "{role} `{uid}`: an exchange {role} needs `url` (its NATS)"
            ));
            None
        }
    };
    let name = match name {
        Some(name) if is_exchange_name(name) => Some(name.clone()),
        Some(name) => {
            problems.push(format!(
                "{role} `{uid}`: exchange {name:?} must be dot-separated tokens of letters, digits, `-` and `_`"
            ));
            None
        }
        None => {
            problems.push(format!(
                "{role} `{uid}`: an exchange {role} needs `exchange` (its name)"
            ));
            None
        }
    };
    Some(Exchange {
        url: url?,
        name: name?,
        replicas: replicas?,
    })
}

/// Dot-separated non-empty tokens of ASCII letters, digits, `-` and `_`.
pub(crate) fn is_exchange_name(name: &str) -> bool {
    name.split('.').all(|token| {
        !token.is_empty()
            && token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
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

/// The 16-bit hash of a Kafka topic name that keys its partitions'
/// positions in a checkpoint (`hash << 16 | partition`).
pub fn kafka_topic_hash(topic: &str) -> u16 {
    (xxhash_rust::xxh3::xxh3_64(topic.as_bytes()) & 0xFFFF) as u16
}

/// A Kafka topic name as the brokers accept it.
fn kafka_topic_ok(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// A kafka connector's `bootstrap`: required, `host:port` entries.
fn kafka_bootstrap(
    role: &str,
    uid: &str,
    bootstrap: &Option<String>,
    problems: &mut Vec<String>,
) -> Option<String> {
    let Some(bootstrap) = bootstrap.as_ref().filter(|b| !b.trim().is_empty()) else {
        problems.push(format!(
            "{role} `{uid}`: a kafka {role} needs `bootstrap` (host:port of a broker)"
        ));
        return None;
    };
    let bad: Vec<&str> = bootstrap
        .split(',')
        .map(str::trim)
        .filter(|entry| {
            entry
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        })
        .collect();
    if !bad.is_empty() {
        problems.push(format!(
            "{role} `{uid}`: bootstrap {bootstrap:?}: each broker is host:port ({} is not)",
            bad.join(", ")
        ));
        return None;
    }
    Some(bootstrap.clone())
}

fn kafka_source(source: &file::SourceSpec, problems: &mut Vec<String>) -> Option<KafkaSource> {
    let uid = &source.uid;
    let bootstrap = kafka_bootstrap("source", uid, &source.bootstrap, problems);
    let topics = match (&source.topic, &source.topics) {
        (Some(_), Some(_)) => {
            problems.push(format!("source `{uid}`: set `topic` or `topics`, not both"));
            None
        }
        (Some(topic), None) => Some(vec![topic.clone()]),
        (None, Some(topics)) if !topics.is_empty() => Some(topics.clone()),
        _ => {
            problems.push(format!(
                "source `{uid}`: a kafka source needs `topic` (or `topics`)"
            ));
            None
        }
    };
    if let Some(topics) = &topics {
        let mut hashes = std::collections::BTreeMap::new();
        for topic in topics {
            if !kafka_topic_ok(topic) {
                problems.push(format!(
                    "source `{uid}`: topic {topic:?} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
                ));
            }
            // Positions are keyed by a 16-bit hash of the topic.
            let hash = kafka_topic_hash(topic);
            if let Some(other) = hashes.insert(hash, topic) {
                if other == topic {
                    problems.push(format!("source `{uid}`: topic `{topic}` is listed twice"));
                } else {
                    problems.push(format!(
                        "source `{uid}`: topics `{other}` and `{topic}` share a position key (a 16-bit hash); read them with two sources"
                    ));
                }
            }
        }
    }
    let start = match &source.start {
        None => KafkaStart::Earliest,
        Some(file::StartSpec::Named(name)) if name == "earliest" => KafkaStart::Earliest,
        Some(file::StartSpec::Named(name)) if name == "latest" => KafkaStart::Latest,
        Some(file::StartSpec::At { timestamp }) => KafkaStart::Timestamp(*timestamp),
        Some(file::StartSpec::Named(name)) => {
            problems.push(format!(
                "source `{uid}`: start = {name:?}: use \"earliest\", \"latest\" or {{ timestamp = <ms since the epoch> }}"
            ));
            KafkaStart::Earliest
        }
    };
    if source.key_header.is_some() && source.format.as_ref().is_some_and(|f| f.key.is_some()) {
        problems.push(format!(
            "source `{uid}`: the key comes from format.key or from key_header, not both"
        ));
    }
    Some(KafkaSource {
        bootstrap: bootstrap?,
        topics: topics?,
        start,
        isolation: source.isolation.unwrap_or(Isolation::ReadCommitted),
        key_header: source.key_header.clone(),
        bounded: source.bounded.unwrap_or(false),
        rate: source.rate,
    })
}

fn kafka_sink(
    sink: &file::SinkSpec,
    job_name: &str,
    problems: &mut Vec<String>,
) -> Option<KafkaSink> {
    let uid = &sink.uid;
    let bootstrap = kafka_bootstrap("sink", uid, &sink.bootstrap, problems);
    let topic = match &sink.topic {
        Some(topic) if kafka_topic_ok(topic) => Some(topic.clone()),
        Some(topic) => {
            problems.push(format!(
                "sink `{uid}`: topic {topic:?} is not a Kafka topic name (letters, digits, '.', '_', '-'; at most 249)"
            ));
            None
        }
        None => {
            problems.push(format!("sink `{uid}`: a kafka sink needs `topic`"));
            None
        }
    };
    if let Some(partition) = sink.partition
        && partition < 0
    {
        problems.push(format!(
            "sink `{uid}`: partition = {partition}: partitions count from 0"
        ));
    }
    let prefix = match &sink.transactional_id_prefix {
        Some(prefix) => {
            if prefix.is_empty()
                || !prefix
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
            {
                problems.push(format!(
                    "sink `{uid}`: transactional_id_prefix {prefix:?}: use letters, digits, '.', '_' or '-'"
                ));
            }
            prefix.clone()
        }
        None => {
            let name: String = job_name
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || "._-".contains(c) {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            format!("weir-{name}-{uid}")
        }
    };
    Some(KafkaSink {
        bootstrap: bootstrap?,
        topic: topic?,
        delivery: sink.delivery.unwrap_or(Delivery::ExactlyOnce),
        partition: sink.partition,
        transactional_id_prefix: prefix,
    })
}
