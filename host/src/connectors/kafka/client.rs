//! A small Kafka protocol client over `kafka-protocol`'s codecs: one TCP
//! connection per broker, one request in flight per connection, versions
//! negotiated with ApiVersions. It offers what the connector needs and no
//! more: metadata, offsets, fetch, produce and the transaction requests
//! (FindCoordinator, InitProducerId, AddPartitionsToTxn, EndTxn).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::ResponseError;
use kafka_protocol::messages::{
    ApiVersionsRequest, BrokerId, MetadataRequest, RequestHeader, ResponseHeader, TopicName,
    metadata_request::MetadataRequestTopic,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENT_ID: &str = "weir";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request's answer at most (a fetch waits up to its `max_wait_ms`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A response larger than this is not a Kafka broker talking.
const MAX_RESPONSE: usize = 256 << 20;

/// What went wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// The connection failed or the bytes made no sense (the message
    /// names the address).
    #[error("{message}")]
    Connection { address: String, message: String },
    /// The broker answered with an error code.
    #[error("{context}: {code}")]
    Broker {
        context: String,
        code: ResponseError,
    },
}

impl KafkaError {
    /// The broker's error code, if it answered with one.
    pub fn code(&self) -> Option<ResponseError> {
        match self {
            KafkaError::Broker { code, .. } => Some(*code),
            KafkaError::Connection { .. } => None,
        }
    }

    pub fn broker(context: impl Into<String>, code: i16) -> Self {
        KafkaError::Broker {
            context: context.into(),
            code: ResponseError::try_from_code(code).unwrap_or(ResponseError::Unknown(code)),
        }
    }
}

/// `Err` for a non-zero error code.
pub fn check_code(code: i16, context: impl FnOnce() -> String) -> Result<(), KafkaError> {
    if code == 0 {
        Ok(())
    } else {
        Err(KafkaError::broker(context(), code))
    }
}

/// One connection to one broker.
pub struct Connection {
    address: String,
    stream: TcpStream,
    correlation: i32,
    /// API key → (min, max) version the broker offers.
    versions: HashMap<i16, (i16, i16)>,
}

impl Connection {
    /// Connects to `address` (`host:port`) and asks which versions it speaks.
    pub async fn open(address: &str) -> Result<Self, KafkaError> {
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("weir"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut connection = Self::tcp(address).await?;
        let response = match connection.exchange(&request, 3).await {
            Ok(response) if response.error_code != 35 => response,
            // UNSUPPORTED_VERSION (answered in v0, which v3 may not decode):
            // ask again in v0 on a new connection.
            _ => {
                connection = Self::tcp(address).await?;
                connection.exchange(&request, 0).await?
            }
        };
        check_code(response.error_code, || format!("{address}: ApiVersions"))?;
        connection.versions = response
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(connection)
    }

    async fn tcp(address: &str) -> Result<Self, KafkaError> {
        let failed = |message: String| KafkaError::Connection {
            address: address.to_string(),
            message: format!("cannot connect to {address}: {message}"),
        };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| failed("timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(Self {
            address: address.to_string(),
            stream,
            correlation: 0,
            versions: HashMap::new(),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The version of `R` to use: the highest both sides speak, at most `cap`.
    fn version<R: Request>(&self, cap: i16) -> Result<i16, KafkaError> {
        let name = api_name(R::KEY);
        let Some(&(min, max)) = self.versions.get(&R::KEY) else {
            return Err(KafkaError::Connection {
                address: self.address.clone(),
                message: format!("{}: the broker does not offer {name}", self.address),
            });
        };
        let version = max.min(cap).min(R::VERSIONS.max);
        if version < min.max(R::VERSIONS.min) {
            return Err(KafkaError::Connection {
                address: self.address.clone(),
                message: format!(
                    "{}: the broker speaks {name} v{min}..v{max}, this client v{}..v{}",
                    self.address,
                    R::VERSIONS.min,
                    cap.min(R::VERSIONS.max)
                ),
            });
        }
        Ok(version)
    }

    /// Sends `request` in the highest common version up to `cap`.
    pub async fn send<R: Request>(
        &mut self,
        request: &R,
        cap: i16,
    ) -> Result<R::Response, KafkaError> {
        let version = self.version::<R>(cap)?;
        self.exchange(request, version).await
    }

    async fn exchange<R: Request>(
        &mut self,
        request: &R,
        version: i16,
    ) -> Result<R::Response, KafkaError> {
        let address = self.address.clone();
        let failed = |message: String| KafkaError::Connection {
            address: address.clone(),
            message: format!("{address}: {message}"),
        };
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str(CLIENT_ID)));
        let mut buf = BytesMut::with_capacity(256);
        buf.put_i32(0);
        header
            .encode(&mut buf, R::header_version(version))
            .and_then(|()| request.encode(&mut buf, version))
            .map_err(|e| failed(format!("cannot encode {}: {e}", api_name(R::KEY))))?;
        let length = (buf.len() - 4) as i32;
        buf[..4].copy_from_slice(&length.to_be_bytes());
        let stream = &mut self.stream;
        let body = tokio::time::timeout(REQUEST_TIMEOUT, async {
            stream.write_all(&buf).await?;
            let length = stream.read_i32().await?;
            if length < 0 || length as usize > MAX_RESPONSE {
                return Err(std::io::Error::other(format!(
                    "a response of {length} bytes"
                )));
            }
            let mut body = vec![0; length as usize];
            stream.read_exact(&mut body).await?;
            Ok(body)
        })
        .await
        .map_err(|_| failed(format!("no answer to {} in 30 s", api_name(R::KEY))))?
        .map_err(|e| failed(format!("{}: {e}", api_name(R::KEY))))?;
        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, R::Response::header_version(version))
            .map_err(|e| failed(format!("a bad response header: {e}")))?;
        if header.correlation_id != self.correlation {
            return Err(failed(format!(
                "answered request {} to request {}",
                header.correlation_id, self.correlation
            )));
        }
        R::Response::decode(&mut body, version).map_err(|e| {
            failed(format!(
                "cannot decode {} v{version}: {e}",
                api_name(R::KEY)
            ))
        })
    }
}

/// A partition of a topic as the metadata shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    pub index: i32,
    /// The leader broker's node id (-1: none right now).
    pub leader: i32,
}

/// Per topic asked for: its partitions, or the error code the metadata
/// gave it.
pub type TopicPartitions = Vec<(String, Result<Vec<PartitionInfo>, ResponseError>)>;

/// The brokers of a cluster, reached from its bootstrap list, with a
/// connection to each broker opened on first use.
pub struct Cluster {
    bootstrap: Vec<String>,
    /// Node id → `host:port`.
    brokers: HashMap<i32, String>,
    connections: HashMap<String, Connection>,
}

impl Cluster {
    /// Connects to the first bootstrap broker that answers (`bootstrap` is a
    /// comma-separated list of `host:port`).
    pub async fn connect(bootstrap: &str) -> Result<Self, KafkaError> {
        let mut cluster = Self {
            bootstrap: bootstrap
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            brokers: HashMap::new(),
            connections: HashMap::new(),
        };
        cluster.any().await?;
        Ok(cluster)
    }

    /// A connection to any broker: an open one, else the bootstrap list's.
    async fn any(&mut self) -> Result<String, KafkaError> {
        if let Some(address) = self.connections.keys().next() {
            return Ok(address.clone());
        }
        let mut last = None;
        for address in self.bootstrap.clone() {
            match Connection::open(&address).await {
                Ok(connection) => {
                    self.connections.insert(address.clone(), connection);
                    return Ok(address);
                }
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| KafkaError::Connection {
            address: String::new(),
            message: "no bootstrap broker given".into(),
        }))
    }

    /// The address of broker `node`, as the last metadata said.
    pub fn broker(&self, node: i32) -> Result<String, KafkaError> {
        self.brokers
            .get(&node)
            .cloned()
            .ok_or_else(|| KafkaError::Connection {
                address: self.bootstrap.join(","),
                message: format!(
                    "{}: the metadata names no broker {node}",
                    self.bootstrap.join(",")
                ),
            })
    }

    /// Every broker's address, as the last metadata said.
    pub fn broker_addresses(&self) -> Vec<String> {
        let mut addresses: Vec<String> = self.brokers.values().cloned().collect();
        addresses.sort();
        addresses.dedup();
        addresses
    }

    /// Sends `request` to the broker at `address` (connecting first if
    /// needed); a connection that failed is dropped, so the next request
    /// opens a new one.
    pub async fn send_to<R: Request>(
        &mut self,
        address: &str,
        request: &R,
        cap: i16,
    ) -> Result<R::Response, KafkaError> {
        if !self.connections.contains_key(address) {
            let connection = Connection::open(address).await?;
            self.connections.insert(address.to_string(), connection);
        }
        let connection = self.connections.get_mut(address).expect("connected above");
        let result = connection.send(request, cap).await;
        if matches!(result, Err(KafkaError::Connection { .. })) {
            self.connections.remove(address);
        }
        result
    }

    /// Sends `request` to any broker.
    pub async fn send_any<R: Request>(
        &mut self,
        request: &R,
        cap: i16,
    ) -> Result<R::Response, KafkaError> {
        let address = self.any().await?;
        self.send_to(&address, request, cap).await
    }

    /// The partitions of each of `topics` (an error code for a topic the
    /// cluster does not have), and the brokers, remembered for
    /// [`Cluster::broker`].
    pub async fn topics(&mut self, topics: &[String]) -> Result<TopicPartitions, KafkaError> {
        let request = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let response = self.send_any(&request, 12).await?;
        for broker in &response.brokers {
            self.brokers.insert(
                broker.node_id.0,
                format!("{}:{}", broker.host.as_str(), broker.port),
            );
        }
        Ok(topics
            .iter()
            .map(|name| {
                let found = response.topics.iter().find(|t| {
                    t.name
                        .as_ref()
                        .is_some_and(|n| n.0.as_str() == name.as_str())
                });
                let result = match found {
                    None => Err(ResponseError::UnknownTopicOrPartition),
                    Some(topic) if topic.error_code != 0 => {
                        Err(ResponseError::try_from_code(topic.error_code)
                            .unwrap_or(ResponseError::Unknown(topic.error_code)))
                    }
                    Some(topic) => {
                        let mut partitions: Vec<PartitionInfo> = topic
                            .partitions
                            .iter()
                            .map(|p| PartitionInfo {
                                index: p.partition_index,
                                leader: p.leader_id.0,
                            })
                            .collect();
                        partitions.sort_by_key(|p| p.index);
                        Ok(partitions)
                    }
                };
                (name.clone(), result)
            })
            .collect())
    }
}

/// The consumer's replica id in requests that carry one.
pub const CONSUMER: BrokerId = BrokerId(-1);

/// A name for an API key, for messages.
fn api_name(key: i16) -> String {
    kafka_protocol::messages::ApiKey::try_from(key)
        .map(|k| format!("{k:?}"))
        .unwrap_or_else(|_| format!("API {key}"))
}
