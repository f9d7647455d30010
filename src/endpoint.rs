//! Where the broker is: parsing `--url`, `--management-url` and `-X`, and redacting secrets for display.

use crate::broker::rabbitmq::amqp::MAX_SHORT_STRING;
use crate::error::{Error, Result};
use percent_encoding::percent_decode_str;
use url::Url;

/// Client settings whose values are never displayed: any key naming a password, secret or token,
/// and every property librdkafka itself treats as sensitive — except `sasl.username`, which
/// errors name so the operator can tell which credentials were refused.
const SECRET_KEY_PARTS: &[&str] = &[
    "password",
    "passphrase",
    "secret",
    "token",
    "jaas",
    "private.key",
    "key.pem",
    "ssl_key",
    "ssl.key.location",
    "ssl.ca.pem",
    "sasl.oauthbearer.config",
];

/// The broker an operation talks to, chosen by the scheme of `--url`.
#[derive(Clone)]
pub enum Target {
    Rabbit(RabbitTarget),
    Kafka(KafkaTarget),
}

impl Target {
    /// A display form with every password replaced by `***`.
    pub fn redacted(&self) -> String {
        match self {
            Target::Rabbit(rabbit) => rabbit.amqp_redacted(),
            Target::Kafka(kafka) => {
                let settings: Vec<String> = kafka
                    .redacted_config()
                    .into_iter()
                    .map(|(key, value)| format!(" -X {key}={value}"))
                    .collect();
                format!("kafka://{}{}", kafka.bootstrap_servers, settings.concat())
            }
        }
    }
}

#[derive(Clone)]
pub struct RabbitTarget {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub vhost: String,
    /// Extra URI query parameters lapin understands (heartbeat, frame_max, ...).
    pub heartbeat: Option<u16>,
    pub management: ManagementEndpoint,
    /// PEM file of extra CA certificates for amqps:// and https:// management.
    pub ca_file: Option<String>,
}

impl RabbitTarget {
    pub fn amqp_redacted(&self) -> String {
        format!(
            "{}://{}:***@{}:{}/{}",
            if self.tls { "amqps" } else { "amqp" },
            self.username,
            self.host,
            self.port,
            percent_encoding::utf8_percent_encode(&self.vhost, percent_encoding::NON_ALPHANUMERIC)
        )
    }
}

#[derive(Clone)]
pub struct ManagementEndpoint {
    /// Base URL ending in `/api`, without credentials.
    pub api_base: String,
    pub username: String,
    pub password: String,
}

#[derive(Clone)]
pub struct KafkaTarget {
    pub bootstrap_servers: String,
    /// librdkafka settings from `-X key=value`, applied to every client.
    pub client_config: Vec<(String, String)>,
}

impl KafkaTarget {
    /// `-X` settings for display, secret values masked.
    pub fn redacted_config(&self) -> Vec<(String, String)> {
        self.client_config
            .iter()
            .map(|(key, value)| {
                let shown = if is_secret_key(key) {
                    "***".to_string()
                } else {
                    value.clone()
                };
                (key.clone(), shown)
            })
            .collect()
    }
}

impl KafkaTarget {
    /// `text` with every secret `-X` value replaced by `***`: librdkafka's own messages may quote
    /// a value it refused.
    pub fn hide_secrets(&self, text: &str) -> String {
        let mut shown = text.to_string();
        for (key, value) in &self.client_config {
            // librdkafka trims the values it quotes.
            for secret in [value.as_str(), value.trim()] {
                if is_secret_key(key) && !secret.is_empty() {
                    shown = shown.replace(secret, "***");
                }
            }
        }
        shown
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_KEY_PARTS.iter().any(|part| key.contains(part))
}

/// Replaces the password of any URL-looking text with `***`, whether or not the text parses as
/// a URL: the texts that fail to parse are the ones echoed in error messages. The credentials are
/// whatever lies between `://` (or the start) and the last `@`; a path that itself holds an `@`
/// hides more than the password, never less.
pub fn redact_url(text: &str) -> String {
    let authority_start = text.find("://").map_or(0, |index| index + 3);
    let rest = &text[authority_start..];
    let Some(at) = rest.rfind('@') else {
        return text.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &text[..authority_start],
            &rest[..colon],
            &rest[at..]
        ),
        // A user name alone is no secret.
        None => text.to_string(),
    }
}

/// Parses the connection options shared by every subcommand.
pub fn parse_target(
    url: &str,
    management_url: Option<&str>,
    client_config: &[String],
    ca_file: Option<&str>,
) -> Result<Target> {
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "amqp" | "amqps" => {
            if !client_config.is_empty() {
                return Err(Error::usage(
                    "-X passes settings to Kafka clients only; for RabbitMQ put connection settings in the amqp:// URL",
                ));
            }
            parse_rabbit(url, management_url, ca_file).map(Target::Rabbit)
        }
        "kafka" => {
            if management_url.is_some() {
                return Err(Error::usage(
                    "--management-url is RabbitMQ's HTTP API; it does not apply to a kafka:// URL",
                ));
            }
            parse_kafka(url, client_config, ca_file).map(Target::Kafka)
        }
        _ => Err(Error::usage(format!(
            "unsupported URL '{}': use amqp:// or amqps:// for RabbitMQ (amqp://user:pass@host:5672/vhost) or kafka://host:port[,host:port] for Kafka",
            redact_url(url)
        ))),
    }
}

fn parse_rabbit(
    url: &str,
    management_url: Option<&str>,
    ca_file: Option<&str>,
) -> Result<RabbitTarget> {
    let parsed = Url::parse(url).map_err(|error| {
        Error::usage(format!("invalid AMQP URL '{}': {error}", redact_url(url)))
    })?;
    if parsed.fragment().is_some() {
        // A '#' in a password cuts the URL short and the rest would pass for host and port.
        return Err(Error::usage(format!(
            "invalid AMQP URL '{}': it contains '#'; percent-encode it as %23 (in a password too)",
            redact_url(url)
        )));
    }
    let tls = parsed.scheme() == "amqps";
    let host = parsed
        .host_str()
        .filter(|host| !host.is_empty())
        .unwrap_or("localhost")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port().unwrap_or(if tls { 5671 } else { 5672 });
    let username = decode(parsed.username(), "user name")?;
    let username = if username.is_empty() {
        "guest".to_string()
    } else {
        username
    };
    let password = match parsed.password() {
        Some(password) => decode(password, "password")?,
        None => "guest".to_string(),
    };
    let vhost = match parsed.path() {
        "" | "/" => "/".to_string(),
        path => decode(&path[1..], "vhost")?,
    };
    if vhost.len() > MAX_SHORT_STRING {
        return Err(Error::usage(format!(
            "the vhost in the URL is {} bytes long; AMQP allows at most {MAX_SHORT_STRING}",
            vhost.len()
        )));
    }
    let mut heartbeat = None;
    for (key, value) in parsed.query_pairs() {
        match key.as_ref() {
            "heartbeat" => {
                heartbeat = Some(value.parse().map_err(|_| {
                    Error::usage(format!(
                    "invalid heartbeat '{value}' in the AMQP URL: give seconds, e.g. ?heartbeat=30"
                ))
                })?)
            }
            other => {
                return Err(Error::usage(format!(
                    "unsupported AMQP URL parameter '{other}': only heartbeat is understood"
                )))
            }
        }
    }
    let management = match management_url {
        Some(management_url) => parse_management(management_url, &username, &password)?,
        None => {
            // Same host and credentials; TLS brokers serve the API over https on 15671 by convention.
            let (scheme, default_port) = if tls {
                ("https", 15671)
            } else {
                ("http", 15672)
            };
            let host_for_url = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            ManagementEndpoint {
                api_base: format!("{scheme}://{host_for_url}:{default_port}/api"),
                username: username.clone(),
                password: password.clone(),
            }
        }
    };
    Ok(RabbitTarget {
        tls,
        host,
        port,
        username,
        password,
        vhost,
        heartbeat,
        management,
        ca_file: ca_file.map(str::to_string),
    })
}

fn parse_management(url: &str, amqp_user: &str, amqp_password: &str) -> Result<ManagementEndpoint> {
    let mut parsed = Url::parse(url).map_err(|error| {
        Error::usage(format!(
            "invalid management URL '{}': {error}; expected e.g. http://host:15672",
            redact_url(url)
        ))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(Error::usage(format!(
            "invalid management URL '{}': use http:// or https://",
            redact_url(url)
        )));
    }
    let (username, password) = if parsed.username().is_empty() {
        (amqp_user.to_string(), amqp_password.to_string())
    } else {
        (
            decode(parsed.username(), "management user name")?,
            decode(parsed.password().unwrap_or(""), "management password")?,
        )
    };
    // Credentials travel as basic auth, never inside the URL we keep (and might print).
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let mut base = parsed.to_string().trim_end_matches('/').to_string();
    if !base.ends_with("/api") {
        base.push_str("/api");
    }
    Ok(ManagementEndpoint {
        api_base: base,
        username,
        password,
    })
}

fn parse_kafka(url: &str, client_config: &[String], ca_file: Option<&str>) -> Result<KafkaTarget> {
    let servers = url.trim_start_matches("kafka://").trim_end_matches('/');
    if servers.is_empty() || servers.contains('@') || servers.contains('/') {
        return Err(Error::usage(format!(
            "invalid Kafka URL '{}': expected kafka://host:port[,host:port]; pass credentials with -X sasl.username=... -X sasl.password=...",
            redact_url(url)
        )));
    }
    for server in servers.split(',') {
        let valid = server
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(Error::usage(format!(
                "invalid Kafka bootstrap server '{server}' in '{}': expected host:port",
                redact_url(url)
            )));
        }
    }
    let mut config = Vec::new();
    for setting in client_config {
        let Some((key, value)) = setting.split_once('=') else {
            return Err(Error::usage(format!(
                "invalid -X '{}': expected key=value, e.g. -X security.protocol=SASL_SSL",
                if is_secret_key(setting) {
                    "***"
                } else {
                    setting
                }
            )));
        };
        config.push((key.trim().to_string(), value.to_string()));
    }
    if let Some(ca_file) = ca_file {
        config.push(("ssl.ca.location".to_string(), ca_file.to_string()));
    }
    Ok(KafkaTarget {
        bootstrap_servers: servers.to_string(),
        client_config: config,
    })
}

fn decode(text: &str, what: &str) -> Result<String> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| {
            Error::usage(format!(
                "the {what} in the URL is not valid percent-encoded UTF-8"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rabbit(url: &str, management: Option<&str>) -> RabbitTarget {
        match parse_target(url, management, &[], None) {
            Ok(Target::Rabbit(target)) => target,
            Ok(Target::Kafka(_)) => panic!("{url} parsed as Kafka"),
            Err(error) => panic!("{url}: {error}"),
        }
    }

    #[test]
    fn amqp_url_with_ip_host_keeps_the_ip() {
        let target = rabbit("amqp://app:s%40cret@10.1.2.3:5673/orders%2Fprod", None);
        assert_eq!(target.host, "10.1.2.3");
        assert_eq!(target.port, 5673);
        assert_eq!(target.username, "app");
        assert_eq!(target.password, "s@cret");
        assert_eq!(target.vhost, "orders/prod");
        assert_eq!(target.management.api_base, "http://10.1.2.3:15672/api");
        assert_eq!(target.management.password, "s@cret");
    }

    #[test]
    fn default_vhost_and_credentials() {
        let target = rabbit("amqp://localhost", None);
        assert_eq!(target.vhost, "/");
        assert_eq!(target.username, "guest");
        let target = rabbit("amqps://host/", None);
        assert!(target.tls);
        assert_eq!(target.port, 5671);
        assert_eq!(target.management.api_base, "https://host:15671/api");
    }

    #[test]
    fn management_url_credentials_override_and_are_stripped() {
        let target = rabbit(
            "amqp://u:p@h/v",
            Some("https://admin:topsecret@mgmt.example:8443/rabbit/"),
        );
        assert_eq!(
            target.management.api_base,
            "https://mgmt.example:8443/rabbit/api"
        );
        assert_eq!(target.management.username, "admin");
        assert_eq!(target.management.password, "topsecret");
        let inherited = rabbit("amqp://u:p@h/v", Some("http://h:15672/api"));
        assert_eq!(inherited.management.api_base, "http://h:15672/api");
        assert_eq!(inherited.management.username, "u");
    }

    #[test]
    fn redacted_forms_hide_passwords() {
        let target = parse_target("amqp://u:hunter2@h/v", None, &[], None).unwrap();
        assert!(!target.redacted().contains("hunter2"));
        assert_eq!(
            redact_url("amqp://u:hunter2@h:5672/"),
            "amqp://u:***@h:5672/"
        );
        let kafka = parse_target(
            "kafka://a:9092,b:9093",
            None,
            &["sasl.password=hunter2".into(), "sasl.username=me".into()],
            None,
        )
        .unwrap();
        let shown = kafka.redacted();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("-X sasl.password=***"), "{shown}");
        let Target::Kafka(kafka) = kafka else {
            panic!("expected Kafka")
        };
        assert_eq!(kafka.bootstrap_servers, "a:9092,b:9093");
        let shown = format!("{:?}", kafka.redacted_config());
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("me"));
    }

    #[test]
    fn redaction_does_not_depend_on_parsing() {
        for (text, shown) in [
            ("user:hunter2@host:5672", "user:***@host:5672"),
            ("amqp://u:hun#ter2@h/", "amqp://u:***@h/"),
            ("amqp://u:hunter2@h:99999", "amqp://u:***@h:99999"),
            ("amqp://u:hun/ter2@h/v", "amqp://u:***@h/v"),
            ("redis://:hunter2@h:6379/0", "redis://:***@h:6379/0"),
            ("amqp://u@h/v", "amqp://u@h/v"),
            ("kafka://h:9092", "kafka://h:9092"),
        ] {
            assert_eq!(redact_url(text), shown, "{text}");
        }
    }

    #[test]
    fn librdkafka_sensitive_properties_are_masked() {
        // librdkafka 2.12's properties flagged _RK_SENSITIVE (rdkafka_conf.c), but sasl.username.
        for key in [
            "ssl.key.location",
            "ssl.key.password",
            "ssl.key.pem",
            "ssl_key",
            "ssl.ca.pem",
            "ssl.keystore.password",
            "sasl.password",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.client.credentials.client.secret",
            "sasl.oauthbearer.assertion.private.key.file",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.assertion.private.key.pem",
            "sasl.jaas.config",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        assert!(!is_secret_key("sasl.username"));
        assert!(!is_secret_key("security.protocol"));
        let Ok(Target::Kafka(kafka)) = parse_target(
            "kafka://h:1",
            None,
            &["sasl.password= hunter2".into(), "client.id=hunter2x".into()],
            None,
        ) else {
            panic!("expected Kafka")
        };
        assert_eq!(
            kafka.hide_secrets("refused \"hunter2\" and \" hunter2\""),
            "refused \"***\" and \"***\""
        );
    }

    #[test]
    fn bad_urls_are_usage_errors_without_secrets() {
        for url in [
            "ops:hunter2@h:5672",
            "amqp://u:hunter2#x@h/",
            "amqp://u:hunter2@h:99999",
            "amqp://u:12#hunter2@h/",
            "amqps://u:hunter2@[::1/",
            "http://u:hunter2@h",
            "kafka://",
            "kafka://user:hunter2@h:9092",
            "kafka://h",
            "mqtt://h",
        ] {
            let error = parse_target(url, None, &[], None).err().unwrap();
            assert_eq!(error.exit_code(), crate::error::exit::USAGE, "{url}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
        for management in [
            "http://a:hunter2@h:99999",
            "ftp://a:hunter2@h",
            "a:hunter2@h",
        ] {
            let error = parse_target("amqp://h/", Some(management), &[], None)
                .err()
                .unwrap();
            assert_eq!(error.exit_code(), crate::error::exit::USAGE, "{management}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
        let error = parse_target("kafka://h:1", None, &["novalue".into()], None)
            .err()
            .unwrap();
        assert!(error.to_string().contains("key=value"));
    }
}
