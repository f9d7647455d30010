//! RabbitMQ's management HTTP API: queue statistics, consumers and connections.
//!
//! Connections are listed and closed through `rabbitmq_http_client`, the RabbitMQ team's client.
//! Queue statistics and consumers are read with small tolerant requests of our own: that crate
//! decodes a missing `messages` as 0 (a queue seconds old, or one without traffic, omits it, and
//! unknown must not read as empty), has no `messages_ready`, `message_stats` rates or
//! `consumer_details`, and its consumer list fails to decode on brokers before 3.12 (it requires
//! `consumer_timeout`). Every field here is optional so that 3.10 through 4.x all decode.

use crate::endpoint::ManagementEndpoint;
use crate::error::{Error, Result};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use rabbitmq_http_client::api::{Client as ApiClient, HttpClientError};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::time::Duration;

const SERVICE: &str = "RabbitMQ management API";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub struct Management {
    api: ApiClient<String, String, String>,
    http: reqwest::Client,
    endpoint: ManagementEndpoint,
}

#[derive(Debug, Clone, Deserialize)]
pub struct QueueDetail {
    pub name: String,
    #[serde(rename = "type")]
    pub queue_type: Option<String>,
    pub durable: Option<bool>,
    pub auto_delete: Option<bool>,
    pub exclusive: Option<bool>,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    pub policy: Option<String>,
    pub operator_policy: Option<String>,
    /// An object, or `[]` on brokers that have no policy for the queue.
    pub effective_policy_definition: Option<Value>,
    pub messages: Option<u64>,
    pub messages_ready: Option<u64>,
    pub messages_unacknowledged: Option<u64>,
    pub message_bytes: Option<u64>,
    pub consumers: Option<u64>,
    pub message_stats: Option<MessageStats>,
    #[serde(default)]
    pub consumer_details: Vec<ConsumerDetail>,
    /// Milliseconds since the epoch of the head message's `timestamp` property, when it has one.
    pub head_message_timestamp: Option<Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessageStats {
    pub publish_details: Option<RateDetail>,
    pub ack_details: Option<RateDetail>,
    pub deliver_no_ack_details: Option<RateDetail>,
    pub get_no_ack_details: Option<RateDetail>,
    pub deliver_get_details: Option<RateDetail>,
    pub redeliver_details: Option<RateDetail>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RateDetail {
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ConsumerDetail {
    pub consumer_tag: Option<String>,
    pub prefetch_count: Option<u64>,
    pub ack_required: Option<bool>,
    /// An object, or `[]` while the consumer's channel is closing (seen on 3.10).
    #[serde(default, deserialize_with = "object_or_default")]
    pub channel_details: ChannelDetails,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChannelDetails {
    /// The broker's connection name ("peer:port -> host:port"), the key for closing it.
    pub connection_name: Option<String>,
    pub peer_host: Option<String>,
    pub peer_port: Option<u64>,
    pub user: Option<String>,
}

/// A client connection as the API lists it, reduced to what the tool uses.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub name: String,
    /// The name the client gave itself (`connection_name` client property), if any.
    pub client_name: Option<String>,
    pub user: String,
    pub peer_host: Option<String>,
}

impl Management {
    pub fn new(endpoint: &ManagementEndpoint, ca_file: Option<&str>) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(5));
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file).map_err(|error| {
                Error::usage(format!("cannot read CA file '{ca_file}': {error}"))
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem).map_err(|error| {
                Error::usage(format!(
                    "CA file '{ca_file}' is not a PEM certificate: {error}"
                ))
            })?;
            builder = builder.add_root_certificate(certificate);
        }
        let http = builder
            .build()
            .map_err(|error| Error::Broker(format!("cannot set up the HTTP client: {error}")))?;
        let api = rabbitmq_http_client::api::ClientBuilder::new()
            .with_endpoint(endpoint.api_base.clone())
            .with_basic_auth_credentials(endpoint.username.clone(), endpoint.password.clone())
            .with_client(http.clone())
            .build()
            .map_err(|error| Error::usage(format!("invalid management URL: {error}")))?;
        Ok(Management {
            api,
            http,
            endpoint: endpoint.clone(),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint.api_base
    }

    /// The queue's statistics, or `None` when the broker has no such queue.
    pub async fn queue(&self, vhost: &str, name: &str) -> Result<Option<QueueDetail>> {
        self.get_optional(&["queues", vhost, name]).await
    }

    /// The definition of an operator policy, or `None` when there is no such policy.
    pub async fn operator_policy_definition(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<Map<String, Value>>> {
        #[derive(Deserialize)]
        struct Policy {
            #[serde(default)]
            definition: Map<String, Value>,
        }
        let policy: Option<Policy> = self
            .get_optional(&["operator-policies", vhost, name])
            .await?;
        Ok(policy.map(|policy| policy.definition))
    }

    /// Names of every queue in the vhost.
    pub async fn queue_names(&self, vhost: &str) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let queues: Option<Vec<Named>> = self
            .get_optional_query(&["queues", vhost], "columns=name")
            .await?;
        Ok(queues
            .unwrap_or_default()
            .into_iter()
            .map(|queue| queue.name)
            .collect())
    }

    /// Closes a client connection; `reason` reaches the client in the close frame.
    pub async fn close_connection(&self, name: &str, reason: &str) -> Result<()> {
        self.api
            .close_connection(name, Some(reason), true)
            .await
            .map_err(|error| self.api_error(error))
    }

    /// Every client connection, with the name each client gave itself.
    pub async fn connections(&self) -> Result<Vec<ConnectionInfo>> {
        let connections = self
            .api
            .list_connections()
            .await
            .map_err(|error| self.api_error(error))?;
        Ok(connections
            .into_iter()
            .map(|connection| ConnectionInfo {
                client_name: Some(connection.client_properties.connection_name)
                    .filter(|name| !name.is_empty()),
                name: connection.name,
                user: connection.username.to_string(),
                peer_host: connection.client_hostname,
            })
            .collect())
    }

    async fn get_optional<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<Option<T>> {
        self.get_optional_query(segments, "").await
    }

    async fn get_optional_query<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &str,
    ) -> Result<Option<T>> {
        let path: Vec<String> = segments
            .iter()
            .map(|segment| utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string())
            .collect();
        let mut url = format!("{}/{}", self.endpoint.api_base, path.join("/"));
        if !query.is_empty() {
            url.push('?');
            url.push_str(query);
        }
        let response = self
            .http
            .get(&url)
            .basic_auth(&self.endpoint.username, Some(&self.endpoint.password))
            .send()
            .await
            .map_err(|error| self.transport_error(&error))?;
        match response.status().as_u16() {
            200..=299 => {}
            404 => return Ok(None),
            status => return Err(self.status_error(status)),
        }
        let body = response
            .text()
            .await
            .map_err(|error| self.transport_error(&error))?;
        serde_json::from_str(&body).map(Some).map_err(|error| {
            Error::Broker(format!(
                "the {SERVICE} at {} answered with JSON this tool cannot read ({error}); please report the broker version",
                self.endpoint.api_base
            ))
        })
    }

    fn transport_error(&self, error: &reqwest::Error) -> Error {
        let detail = if error.is_timeout() {
            "no answer in time".to_string()
        } else if error.is_connect() {
            "connection refused or host unreachable (is the management plugin enabled?)".to_string()
        } else {
            // reqwest's message can include the URL, which never carries credentials here.
            error.to_string()
        };
        Error::Unreachable {
            service: SERVICE,
            endpoint: self.endpoint.api_base.clone(),
            detail,
        }
    }

    fn status_error(&self, status: u16) -> Error {
        match status {
            401 => Error::AccessRefused {
                service: SERVICE,
                endpoint: self.endpoint.api_base.clone(),
                user: self.endpoint.username.clone(),
            },
            403 => Error::Broker(format!(
                "the {SERVICE} denied user '{}' (HTTP 403): the user needs the 'monitoring' or 'administrator' tag",
                self.endpoint.username
            )),
            status => Error::Broker(format!(
                "the {SERVICE} at {} answered HTTP {status}",
                self.endpoint.api_base
            )),
        }
    }

    fn api_error(&self, error: HttpClientError) -> Error {
        match error {
            HttpClientError::ClientErrorResponse { status_code, .. }
            | HttpClientError::ServerErrorResponse { status_code, .. } => {
                self.status_error(status_code.as_u16())
            }
            HttpClientError::RequestError { error, .. } => self.transport_error(&error),
            other => Error::Broker(format!("{SERVICE}: {other}")),
        }
    }
}

impl MessageStats {
    /// The API lists only the counters that ever moved: once it reports any rate for the queue,
    /// a missing one is zero; without any, rates are unknown (not collected, or no traffic yet).
    fn rates_collected(&self) -> bool {
        [
            &self.publish_details,
            &self.ack_details,
            &self.deliver_no_ack_details,
            &self.get_no_ack_details,
            &self.deliver_get_details,
            &self.redeliver_details,
        ]
        .iter()
        .any(|detail| rate(detail).is_some())
    }

    /// Messages arriving per second.
    pub fn inflow(&self) -> Option<f64> {
        rate(&self.publish_details).or(self.rates_collected().then_some(0.0))
    }

    /// Messages leaving for good per second: acked, or delivered without acks.
    pub fn outflow(&self) -> Option<f64> {
        let parts = [
            rate(&self.ack_details),
            rate(&self.deliver_no_ack_details),
            rate(&self.get_no_ack_details),
        ];
        if parts.iter().all(Option::is_none) {
            self.rates_collected().then_some(0.0)
        } else {
            Some(parts.iter().flatten().sum())
        }
    }
}

/// Reads an object as `T`, and anything else (the API's `[]` for "nothing") as `T::default()`.
fn object_or_default<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    let value = Value::deserialize(deserializer)?;
    if value.is_object() {
        serde_json::from_value(value).map_err(serde::de::Error::custom)
    } else {
        Ok(T::default())
    }
}

fn rate(detail: &Option<RateDetail>) -> Option<f64> {
    detail.as_ref().and_then(|detail| detail.rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closing_consumer_with_empty_channel_details_still_decodes() {
        let detail: QueueDetail = serde_json::from_str(
            r#"{"name":"q","consumer_details":[{"consumer_tag":"a","channel_details":[]},
                {"consumer_tag":"b","channel_details":{"connection_name":"c","user":"u"}}],
                "effective_policy_definition":[]}"#,
        )
        .expect("tolerant decoding");
        assert_eq!(detail.consumer_details.len(), 2);
        assert!(detail.consumer_details[0]
            .channel_details
            .connection_name
            .is_none());
        assert_eq!(
            detail.consumer_details[1]
                .channel_details
                .connection_name
                .as_deref(),
            Some("c")
        );
        assert!(detail.messages.is_none(), "missing counts stay unknown");
    }

    #[test]
    fn a_rate_the_api_leaves_out_is_zero_only_when_it_reports_others() {
        let published_only: MessageStats =
            serde_json::from_str(r#"{"publish_details":{"rate":12.5}}"#).expect("stats");
        assert_eq!(published_only.inflow(), Some(12.5));
        assert_eq!(
            published_only.outflow(),
            Some(0.0),
            "nothing was ever acked"
        );
        let none = MessageStats::default();
        assert_eq!(none.inflow(), None);
        assert_eq!(none.outflow(), None);
    }
}
