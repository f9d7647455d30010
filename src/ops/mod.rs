//! The operations of the runbook, one module each; the CLI and playbooks both call these.

pub mod dedup;
pub mod dlq;
pub mod drain;
pub mod estimate;
pub mod exec;
pub mod forward_loop;
pub mod inspect;
pub mod load;
pub mod partition;
pub mod plan;

use crate::error::{Error, Result};

/// Rejects factors of 0 and absurd ones before anything touches a broker.
pub fn validate_factor(factor: usize) -> Result<()> {
    if (1..=drain::MAX_FACTOR).contains(&factor) {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "--factor {factor} is out of range: give 1 to {} (temporary queues, or the partition multiplier)",
            drain::MAX_FACTOR
        )))
    }
}

/// Durations written as text ("5s", "2m 30s") in specs and playbooks.
pub mod duration_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*duration).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text).map_err(|error| {
            format!("'{text}' is not a duration ({error}); write e.g. 30s, 5m or 1h")
        })
    }

    /// The same for optional durations.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use std::time::Duration;

        pub fn serialize<S: Serializer>(
            duration: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match duration {
                Some(duration) => super::serialize(duration, serializer),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            let text = Option::<String>::deserialize(deserializer)?;
            text.map(|text| super::parse(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
