//! Duplicate suppression for `forward --dedup`: one Redis key per stable message id, marked in
//! two phases so that a crash never turns into a lost message.
//!
//! Before a message with an id is published, its key is set to `inflight:<owner>#<ticket>/<ms>`
//! (`SET NX PX`, the in-flight TTL); once the target broker confirmed it, the key becomes `done`
//! for `--dedup-ttl` (written, pipelined, per batch of confirmations that showed no
//! unattributable `basic.return`, so `done` never names a message the target did not keep). A message whose key is `done` was delivered before: it is not published
//! again but acknowledged on the source. A key held in flight by another forwarder makes the
//! message wait; once that mark is stale (its owner is gone: the mark is older than the in-flight
//! TTL, or expired) it is taken over atomically and the message is published.
//!
//! The guarantee: a message with a stable id is published exactly once while Redis keeps its key
//! (for `--dedup-ttl` after the first delivery). Duplicates remain possible only if
//! - a forwarder dies (or loses Redis) after the target broker took the message but before the
//!   `done` mark was written (a batch of confirmations being marked), re-published once the
//!   in-flight mark is stale;
//! - a publish takes longer than the in-flight TTL (confirm delays plus retries), so another
//!   forwarder takes the mark over;
//! - Redis loses keys (restart without persistence, eviction under `maxmemory`, failover to a
//!   replica that had not received them) or the copy arrives after `--dedup-ttl`;
//! - `--dedup-optional` switched suppression off because Redis failed.
//!
//! Messages without an id pass through unchecked and are counted. A message that legitimately
//! comes back to the source with the same id (a retry loop through dead-lettering) is taken for a
//! duplicate: do not use `--dedup` on such queues.

use crate::broker::Source;
use crate::endpoint::redact_url;
use crate::error::{Error, Result};
use crate::progress::{Event, Level, Progress};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longer than a publish may take with the loop's retries (Kafka's delivery timeout is 30 s),
/// short enough that a rerun after a crash does not wait long for the dead forwarder's marks.
pub const DEFAULT_INFLIGHT_TTL: Duration = Duration::from_secs(60);

/// Serde defaults of the `dedup_ttl` / `dedup_inflight_ttl` fields of forward and replay specs.
pub fn default_ttl() -> Duration {
    DEFAULT_TTL
}

pub fn default_inflight_ttl() -> Duration {
    DEFAULT_INFLIGHT_TTL
}
/// Connecting to Redis and each request give up after this long: a Redis that hangs must stop
/// (or, with `--dedup-optional`, bypass) the forwarder rather than stall it.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a message whose id another forwarder holds in flight asks again.
pub const BUSY_POLL: Duration = Duration::from_millis(500);
/// Rounds of the claim protocol before giving up on a key that keeps changing under us.
const CLAIM_ROUNDS: usize = 8;
const DONE: &[u8] = b"done";
const INFLIGHT: &str = "inflight:";

/// Key parts that could contain the separator are percent-encoded, so that no two scopes share
/// a key prefix.
const KEY_PART: &AsciiSet = &CONTROLS.add(b':').add(b'%');

/// Sets KEYS[1] to ARGV[2] for ARGV[3] ms only while it still holds ARGV[1]: taking over a stale
/// mark must not race another forwarder doing the same.
const COMPARE_AND_SET: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0";
/// Deletes KEYS[1] only while it holds our own mark ARGV[1].
const COMPARE_AND_DELETE: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// What the store says about a message before it is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not delivered before and now marked in flight by us: publish it.
    Fresh,
    /// Delivered before: acknowledge it without publishing.
    Duplicate,
    /// Another live copy is in flight (another forwarder's, or our own earlier copy): ask again.
    Busy,
}

/// How the forwarding loop identifies messages and, when Redis answers, suppresses duplicates.
#[derive(Clone)]
pub struct Dedup {
    /// The header carrying the id; `None`: the broker's own (message-id, topic-partition-offset).
    pub id_header: Option<String>,
    /// `None` when `--dedup-optional` let the forward go on without Redis.
    pub store: Option<Store>,
    pub optional: bool,
    /// Why there is no store, for the summary.
    pub bypassed: Option<String>,
    /// A header counting how often the message went around on purpose (`x-mqdrain-replays`):
    /// its value is part of the identity, so a message dead-lettered again after its replay is
    /// replayed again, while a second copy of the same replay is suppressed.
    pub generation_header: Option<&'static str>,
}

impl std::fmt::Debug for Dedup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dedup")
            .field("id_header", &self.id_header)
            .field("store", &self.store.as_ref().map(|store| &store.endpoint))
            .field("optional", &self.optional)
            .field("bypassed", &self.bypassed)
            .field("generation_header", &self.generation_header)
            .finish()
    }
}

/// The Redis side: two multiplexed connections, shared by every in-flight message.
#[derive(Clone)]
pub struct Store {
    /// Claims. Their requests queue for room in this connection and hold their place while the
    /// forwarding loop is busy elsewhere; they go out in the order messages arrived.
    connection: MultiplexedConnection,
    /// Done marks and releases, which the loop awaits: on a connection of their own so that they
    /// never wait behind claims the loop is not polling at that moment.
    marking: MultiplexedConnection,
    /// The URL with its password masked, for messages.
    pub endpoint: String,
    /// `mqdrain:dedup:<scope>:`; the id follows.
    prefix: Vec<u8>,
    ttl: Duration,
    inflight_ttl: Duration,
    /// Identifies this forwarder run in its in-flight marks.
    owner: String,
}

/// The duplicate-suppression options of a forward or a DLQ replay (`--dedup` and friends).
#[derive(Debug, Clone)]
pub struct DedupSettings {
    /// `redis://host:port[/db]`; `None`: no suppression.
    pub url: Option<String>,
    pub ttl: Duration,
    pub inflight_ttl: Duration,
    pub id_header: Option<String>,
    pub optional: bool,
}

/// Rejects dedup options that cannot work, before anything touches a broker.
pub fn validate(spec: &DedupSettings) -> Result<()> {
    let Some(url) = &spec.url else {
        if spec.id_header.is_some() || spec.optional {
            return Err(Error::usage(
                "--id-header and --dedup-optional only apply with --dedup redis://host:port[/db]",
            ));
        }
        return Ok(());
    };
    Client::open(url.as_str()).map_err(|error| {
        Error::usage(format!(
            "--dedup '{}' is not a Redis URL ({error}); use redis://host:port[/db]",
            redact_url(url)
        ))
    })?;
    if spec.id_header.as_deref().is_some_and(str::is_empty) {
        return Err(Error::usage("--id-header needs a header name"));
    }
    if spec.inflight_ttl < Duration::from_secs(1) {
        return Err(Error::usage(
            "--dedup-inflight-ttl must be at least 1s: it must outlast a publish and its confirm",
        ));
    }
    if spec.ttl <= spec.inflight_ttl {
        return Err(Error::usage(format!(
            "--dedup-ttl {} must be longer than --dedup-inflight-ttl {}",
            humantime::format_duration(spec.ttl),
            humantime::format_duration(spec.inflight_ttl)
        )));
    }
    Ok(())
}

/// One sentence for a plan: where ids come from, where they are kept, then `detail` (what the
/// caller does with the id); prefixed with "would" for a dry run.
pub fn describe(
    spec: &DedupSettings,
    native_id: &str,
    detail: &str,
    dry_run: bool,
) -> Option<String> {
    let url = spec.url.as_ref()?;
    Some(format!(
        "{}suppress duplicates by {} through Redis at {} (kept {}, in-flight marks {}{}), {detail}",
        if dry_run { "would " } else { "" },
        spec.id_header
            .as_ref()
            .map_or_else(|| native_id.to_string(), |name| format!("header '{name}'")),
        redact_url(url),
        humantime::format_duration(spec.ttl),
        humantime::format_duration(spec.inflight_ttl),
        if spec.optional {
            "; forwards without suppression if Redis fails"
        } else {
            "; stops if Redis fails"
        },
    ))
}

/// `describe`'s detail for `forward`, which stamps the id for consumers downstream.
pub fn stamping() -> String {
    format!("stamping the id into header '{}'", crate::broker::ID_HEADER)
}

impl Dedup {
    /// Connects to Redis for `spec`, or returns `None` without `--dedup`. `scope` names the
    /// source (vhost and queue, or topic and group) so that ids of different sources never meet.
    pub async fn open(
        spec: &DedupSettings,
        scope: &[&str],
        progress: &Progress,
    ) -> Result<Option<Self>> {
        let Some(url) = &spec.url else {
            return Ok(None);
        };
        let endpoint = redact_url(url);
        let (store, bypassed) = match connect(url).await {
            Ok((connection, marking)) => (
                Some(Store {
                    connection,
                    marking,
                    endpoint,
                    prefix: key_prefix(scope),
                    ttl: spec.ttl,
                    inflight_ttl: spec.inflight_ttl,
                    owner: owner(),
                }),
                None,
            ),
            Err(detail) if spec.optional => {
                let reason = format!("cannot reach Redis at {endpoint} ({detail})");
                progress.emit(Event::Notice {
                    level: Level::Warn,
                    message: format!(
                        "{reason}: forwarding WITHOUT duplicate suppression (--dedup-optional); ids are still stamped into '{}'",
                        crate::broker::ID_HEADER
                    ),
                });
                (None, Some(reason))
            }
            Err(detail) => {
                return Err(Error::Unreachable {
                    service: "Redis (--dedup)",
                    endpoint,
                    detail: format!(
                        "{detail}; nothing was forwarded. Start Redis or correct --dedup, or add --dedup-optional to forward without duplicate suppression"
                    ),
                })
            }
        };
        Ok(Some(Dedup {
            id_header: spec.id_header.clone(),
            store,
            optional: spec.optional,
            bypassed,
            generation_header: None,
        }))
    }

    /// Counts the value of `header` (absent: 0) as part of every message's identity.
    pub fn by_generation(mut self, header: &'static str) -> Self {
        self.generation_header = Some(header);
        self
    }

    /// The message's identity for the store; `None`: it has none and passes unchecked.
    pub fn identity<S: Source>(&self, message: &S::Message) -> Option<Vec<u8>> {
        let mut id = S::identity(message, self.id_header.as_deref())?;
        if let Some(header) = self.generation_header {
            let generation = S::identity(message, Some(header)).unwrap_or_else(|| b"0".to_vec());
            id.extend_from_slice(b"@");
            id.extend_from_slice(header.as_bytes());
            id.extend_from_slice(b"=");
            id.extend_from_slice(&generation);
        }
        Some(id)
    }
}

/// The claims' connection and the marking one.
async fn connect(
    url: &str,
) -> std::result::Result<(MultiplexedConnection, MultiplexedConnection), String> {
    Ok((open_connection(url).await?, open_connection(url).await?))
}

async fn open_connection(url: &str) -> std::result::Result<MultiplexedConnection, String> {
    let client = Client::open(url).map_err(|error| error.to_string())?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    let mut connection = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|error| error.to_string())?;
    // Connecting alone does not prove that commands work (authentication, a replica that
    // refuses writes): one harmless write does.
    redis::cmd("SET")
        .arg("mqdrain:dedup:probe")
        .arg(owner())
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut connection)
        .await
        .map_err(|error| error.to_string())?;
    Ok(connection)
}

fn key_prefix(scope: &[&str]) -> Vec<u8> {
    let mut prefix = String::from("mqdrain:dedup:");
    for part in scope {
        prefix.push_str(&utf8_percent_encode(part, KEY_PART).to_string());
        prefix.push(':');
    }
    prefix.into_bytes()
}

/// Host, process and start time: unique per forwarder run, readable in Redis.
fn owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|host| host.trim().to_string())
        .unwrap_or_else(|| "?".to_string());
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis())
        .unwrap_or_default();
    format!("{host}/{}/{started}", std::process::id())
}

/// A parsed in-flight mark: who holds it, for which ticket, set with which TTL.
#[derive(Debug, PartialEq, Eq)]
struct Mark<'v> {
    owner: &'v str,
    ticket: u64,
    ttl_ms: u64,
}

fn parse_mark(value: &[u8]) -> Option<Mark<'_>> {
    let text = std::str::from_utf8(value).ok()?.strip_prefix(INFLIGHT)?;
    let (holder, ttl_ms) = text.rsplit_once('/')?;
    let (owner, ticket) = holder.rsplit_once('#')?;
    Some(Mark {
        owner,
        ticket: ticket.parse().ok()?,
        ttl_ms: ttl_ms.parse().ok()?,
    })
}

/// What to do about a key that another copy holds, given its value and remaining life.
fn judge(
    value: &[u8],
    remaining_ms: i64,
    owner: &str,
    ticket: u64,
    inflight_ttl: Duration,
) -> Verdict {
    if value == DONE {
        return Verdict::Duplicate;
    }
    let Some(mark) = parse_mark(value) else {
        return Verdict::Foreign;
    };
    if mark.owner == owner {
        // Our own mark: this very message again (a retry refreshes it), or another copy of the
        // same id still in our window, which settles the question once it is confirmed.
        return if mark.ticket == ticket {
            Verdict::TakeOver
        } else {
            Verdict::Busy
        };
    }
    // Age from Redis's own clock (the mark's TTL minus what is left), so clocks of different
    // hosts do not matter. A key without expiry (-1) was not written by a forwarder: stale.
    let age_ms = if remaining_ms < 0 {
        u64::MAX
    } else {
        mark.ttl_ms.saturating_sub(remaining_ms.unsigned_abs())
    };
    if u128::from(age_ms) >= inflight_ttl.as_millis() {
        Verdict::TakeOver
    } else {
        Verdict::Busy
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Duplicate,
    Busy,
    /// Ours or stale: replace the mark (atomically) and publish.
    TakeOver,
    /// Not a value mqdrain writes.
    Foreign,
}

impl Store {
    fn key(&self, id: &[u8]) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(id);
        key
    }

    fn mark(&self, ticket: u64) -> String {
        format!(
            "{INFLIGHT}{}#{ticket}/{}",
            self.owner,
            self.inflight_ttl.as_millis()
        )
    }

    fn failed(&self, what: &str, id: &[u8], error: &redis::RedisError) -> Error {
        Error::Unreachable {
            service: "Redis (--dedup)",
            endpoint: self.endpoint.clone(),
            detail: format!(
                "{what} message id '{}' failed: {error}; forwarding stopped and unconfirmed messages stay on the source. Fix Redis and run forward again, or add --dedup-optional to forward without duplicate suppression",
                String::from_utf8_lossy(id)
            ),
        }
    }

    /// Marks `id` in flight for `ticket` (the loop's number for this copy), unless it was
    /// delivered before or another live copy holds it.
    pub async fn claim(&self, id: &[u8], ticket: u64) -> Result<Claim> {
        let key = self.key(id);
        let mark = self.mark(ticket);
        let inflight_ms = self.inflight_ttl.as_millis() as u64;
        let mut connection = self.connection.clone();
        for _ in 0..CLAIM_ROUNDS {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&mark)
                .arg("NX")
                .arg("PX")
                .arg(inflight_ms)
                .query_async(&mut connection)
                .await
                .map_err(|error| self.failed("marking", id, &error))?;
            if set.is_some() {
                return Ok(Claim::Fresh);
            }
            let (value, remaining_ms): (Option<Vec<u8>>, i64) = redis::pipe()
                .cmd("GET")
                .arg(&key)
                .cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .map_err(|error| self.failed("reading", id, &error))?;
            // Gone since the SET: it expired in between; try again.
            let Some(value) = value else { continue };
            match judge(&value, remaining_ms, &self.owner, ticket, self.inflight_ttl) {
                Verdict::Duplicate => return Ok(Claim::Duplicate),
                Verdict::Busy => return Ok(Claim::Busy),
                Verdict::Foreign => {
                    return Err(Error::Broker(format!(
                        "Redis key '{}' at {} holds '{}', which mqdrain does not write: another program uses the mqdrain:dedup: prefix. Use another Redis database (redis://host:port/<db>) for --dedup",
                        String::from_utf8_lossy(&key),
                        self.endpoint,
                        String::from_utf8_lossy(&value)
                    )))
                }
                Verdict::TakeOver => {
                    let swapped: i64 = redis::cmd("EVAL")
                        .arg(COMPARE_AND_SET)
                        .arg(1)
                        .arg(&key)
                        .arg(&value)
                        .arg(&mark)
                        .arg(inflight_ms)
                        .query_async(&mut connection)
                        .await
                        .map_err(|error| self.failed("taking over the stale mark of", id, &error))?;
                    if swapped == 1 {
                        return Ok(Claim::Fresh);
                    }
                }
            }
        }
        Ok(Claim::Busy)
    }

    /// Records that the target confirmed `ids` (one round trip): later copies are duplicates
    /// for the TTL.
    pub async fn done(&self, ids: &[Vec<u8>]) -> Result<()> {
        let mut connection = self.marking.clone();
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("SET")
                .arg(self.key(id))
                .arg(DONE)
                .arg("PX")
                .arg(self.ttl.as_millis() as u64);
        }
        pipe.query_async::<()>(&mut connection)
            .await
            .map_err(|error| {
                let first = ids.first().map(Vec::as_slice).unwrap_or_default();
                self.failed("marking as delivered", first, &error)
            })
    }

    /// Drops our in-flight mark of a message the target refused for good, so that a rerun
    /// need not wait for it to expire.
    pub async fn release(&self, id: &[u8], ticket: u64) -> Result<()> {
        let mut connection = self.marking.clone();
        redis::cmd("EVAL")
            .arg(COMPARE_AND_DELETE)
            .arg(1)
            .arg(self.key(id))
            .arg(self.mark(ticket))
            .query_async::<()>(&mut connection)
            .await
            .map_err(|error| self.failed("releasing", id, &error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    #[test]
    fn marks_round_trip() {
        assert_eq!(
            parse_mark(b"inflight:host/42/1700#7/60000"),
            Some(Mark {
                owner: "host/42/1700",
                ticket: 7,
                ttl_ms: 60000
            })
        );
        assert_eq!(parse_mark(b"inflight:x#y/1"), None);
        assert_eq!(parse_mark(b"done"), None);
    }

    #[test]
    fn done_is_a_duplicate_and_unknown_values_are_refused() {
        assert_eq!(judge(b"done", 100, "me", 1, TTL), Verdict::Duplicate);
        assert_eq!(judge(b"hello", 100, "me", 1, TTL), Verdict::Foreign);
    }

    #[test]
    fn our_own_marks() {
        let mine = b"inflight:me#3/60000";
        assert_eq!(
            judge(mine, 59_000, "me", 3, TTL),
            Verdict::TakeOver,
            "a retry"
        );
        assert_eq!(
            judge(mine, 1_000, "me", 4, TTL),
            Verdict::Busy,
            "another copy in our window waits for the first, however old"
        );
    }

    #[test]
    fn another_owners_mark_is_stale_after_the_inflight_ttl() {
        let theirs = b"inflight:them#3/120000";
        assert_eq!(
            judge(theirs, 100_000, "me", 3, TTL),
            Verdict::Busy,
            "20 s old"
        );
        assert_eq!(
            judge(theirs, 60_000, "me", 3, TTL),
            Verdict::TakeOver,
            "60 s old"
        );
        assert_eq!(
            judge(theirs, -1, "me", 3, TTL),
            Verdict::TakeOver,
            "no expiry"
        );
    }

    #[test]
    fn scopes_cannot_collide() {
        assert_eq!(
            key_prefix(&["/", "orders"]),
            b"mqdrain:dedup:/:orders:".to_vec()
        );
        assert_ne!(key_prefix(&["a:b", "c"]), key_prefix(&["a", "b:c"]));
    }
}
