//! The settings that decide a backlog's fate, resolved from queue arguments and policies.
//!
//! RabbitMQ's own rule: for the numeric limits (TTL, max-length, max-length-bytes, delivery-limit,
//! expires) the smaller of argument and policy wins; for overflow and dead-lettering the queue
//! argument wins over the policy. `effective_policy_definition` already merges the policy with any
//! operator policy, so it is read as one source; the operator policy's own definition then tells
//! which of its values came from the operator policy.

use serde::Serialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Effective<T> {
    pub value: T,
    /// "argument", "policy" or "operator-policy": where the value that applies comes from.
    pub source: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueueSettings {
    pub message_ttl_ms: Option<Effective<u64>>,
    pub max_length: Option<Effective<u64>>,
    pub max_length_bytes: Option<Effective<u64>>,
    pub overflow: Option<Effective<String>>,
    pub dead_letter_exchange: Option<Effective<String>>,
    pub dead_letter_routing_key: Option<Effective<String>>,
    pub delivery_limit: Option<Effective<u64>>,
    pub expires_ms: Option<Effective<u64>>,
}

impl QueueSettings {
    /// Re-labels the policy values that the operator policy `definition` imposes (the merged
    /// policy value equals the operator policy's: for the numeric limits the smaller wins).
    pub fn attribute_operator_policy(&mut self, definition: &Map<String, Value>) {
        fn numeric(
            setting: &mut Option<Effective<u64>>,
            definition: &Map<String, Value>,
            key: &str,
        ) {
            if let Some(setting) = setting {
                if setting.source == "policy"
                    && definition.get(key).and_then(number) == Some(setting.value)
                {
                    setting.source = "operator-policy";
                }
            }
        }
        fn text(
            setting: &mut Option<Effective<String>>,
            definition: &Map<String, Value>,
            key: &str,
        ) {
            if let Some(setting) = setting {
                if setting.source == "policy"
                    && definition.get(key).and_then(Value::as_str) == Some(setting.value.as_str())
                {
                    setting.source = "operator-policy";
                }
            }
        }
        numeric(&mut self.message_ttl_ms, definition, "message-ttl");
        numeric(&mut self.max_length, definition, "max-length");
        numeric(&mut self.max_length_bytes, definition, "max-length-bytes");
        numeric(&mut self.delivery_limit, definition, "delivery-limit");
        numeric(&mut self.expires_ms, definition, "expires");
        text(&mut self.overflow, definition, "overflow");
        text(
            &mut self.dead_letter_exchange,
            definition,
            "dead-letter-exchange",
        );
        text(
            &mut self.dead_letter_routing_key,
            definition,
            "dead-letter-routing-key",
        );
    }

    /// `drop-head` is RabbitMQ's default when no overflow behaviour is set.
    pub fn overflow_behaviour(&self) -> &str {
        self.overflow
            .as_ref()
            .map_or("drop-head", |overflow| overflow.value.as_str())
    }
}

/// Resolves the effective settings; `policy` is `effective_policy_definition` (an object, or
/// `[]`/absent when no policy applies).
pub fn resolve(arguments: &Map<String, Value>, policy: Option<&Value>) -> QueueSettings {
    let empty = Map::new();
    let policy = policy.and_then(Value::as_object).unwrap_or(&empty);
    QueueSettings {
        message_ttl_ms: smaller(arguments, "x-message-ttl", policy, "message-ttl"),
        max_length: smaller(arguments, "x-max-length", policy, "max-length"),
        max_length_bytes: smaller(arguments, "x-max-length-bytes", policy, "max-length-bytes"),
        overflow: argument_first(arguments, "x-overflow", policy, "overflow"),
        dead_letter_exchange: argument_first(
            arguments,
            "x-dead-letter-exchange",
            policy,
            "dead-letter-exchange",
        ),
        dead_letter_routing_key: argument_first(
            arguments,
            "x-dead-letter-routing-key",
            policy,
            "dead-letter-routing-key",
        ),
        delivery_limit: smaller(arguments, "x-delivery-limit", policy, "delivery-limit"),
        expires_ms: smaller(arguments, "x-expires", policy, "expires"),
    }
}

fn number(value: &Value) -> Option<u64> {
    match value {
        Value::Number(number) => number.as_u64(),
        // Policies set from some tools arrive as strings.
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn smaller(
    arguments: &Map<String, Value>,
    argument_key: &str,
    policy: &Map<String, Value>,
    policy_key: &str,
) -> Option<Effective<u64>> {
    let from_argument = arguments.get(argument_key).and_then(number);
    let from_policy = policy.get(policy_key).and_then(number);
    match (from_argument, from_policy) {
        (Some(argument), Some(policy)) if policy < argument => Some(Effective {
            value: policy,
            source: "policy",
        }),
        (Some(argument), _) => Some(Effective {
            value: argument,
            source: "argument",
        }),
        (None, Some(policy)) => Some(Effective {
            value: policy,
            source: "policy",
        }),
        (None, None) => None,
    }
}

fn argument_first(
    arguments: &Map<String, Value>,
    argument_key: &str,
    policy: &Map<String, Value>,
    policy_key: &str,
) -> Option<Effective<String>> {
    let text = |value: &Value| value.as_str().map(str::to_string);
    if let Some(value) = arguments.get(argument_key).and_then(text) {
        return Some(Effective {
            value,
            source: "argument",
        });
    }
    policy
        .get(policy_key)
        .and_then(text)
        .map(|value| Effective {
            value,
            source: "policy",
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn smaller_limit_wins_and_says_where_from() {
        let arguments = object(json!({"x-message-ttl": 60000, "x-max-length": 10}));
        let policy = json!({"message-ttl": 1000, "max-length": 50, "max-length-bytes": "4096"});
        let settings = resolve(&arguments, Some(&policy));
        assert_eq!(
            settings.message_ttl_ms,
            Some(Effective {
                value: 1000,
                source: "policy"
            })
        );
        assert_eq!(
            settings.max_length,
            Some(Effective {
                value: 10,
                source: "argument"
            })
        );
        assert_eq!(
            settings.max_length_bytes.map(|limit| limit.value),
            Some(4096)
        );
    }

    #[test]
    fn argument_wins_for_dead_lettering_and_overflow() {
        let arguments = object(json!({"x-dead-letter-exchange": "dlx-arg"}));
        let policy = json!({"dead-letter-exchange": "dlx-policy", "overflow": "reject-publish"});
        let settings = resolve(&arguments, Some(&policy));
        assert_eq!(
            settings
                .dead_letter_exchange
                .as_ref()
                .map(|dlx| dlx.value.as_str()),
            Some("dlx-arg")
        );
        assert_eq!(settings.overflow_behaviour(), "reject-publish");
    }

    #[test]
    fn operator_policy_limits_say_so() {
        let arguments = object(json!({"x-max-length": 100}));
        // The API's merge of a policy (max-length 70, ttl 5000) and an operator policy (50).
        let merged = json!({"max-length": 50, "message-ttl": 5000});
        let mut settings = resolve(&arguments, Some(&merged));
        settings.attribute_operator_policy(&object(json!({"max-length": 50})));
        assert_eq!(
            settings.max_length,
            Some(Effective {
                value: 50,
                source: "operator-policy"
            })
        );
        assert_eq!(
            settings.message_ttl_ms.map(|ttl| ttl.source),
            Some("policy")
        );
        // An operator limit above the queue's argument does not apply.
        let mut argument_wins = resolve(&object(json!({"x-max-length": 10})), Some(&merged));
        argument_wins.attribute_operator_policy(&object(json!({"max-length": 50})));
        assert_eq!(
            argument_wins.max_length.map(|limit| limit.source),
            Some("argument")
        );
    }

    #[test]
    fn empty_list_policy_and_no_arguments_mean_defaults() {
        let settings = resolve(&Map::new(), Some(&json!([])));
        assert_eq!(settings, QueueSettings::default());
        assert_eq!(settings.overflow_behaviour(), "drop-head");
    }
}
