//! The forwarding loop, written once against the `Source`/`Sink` traits: bounded in-flight
//! window, acknowledgement only after confirmation (contiguously per lane), bounded retries,
//! rate limiting and graceful stop. A sink may route single messages itself (`Sink::route`):
//! a skipped message is handed back to the source (`Source::skip`) and never tracked here, so
//! the source alone keeps it out of later acknowledgements.

use crate::broker::{KeySource, Position, Refusal, RefusalKind, Route, Sink, Source};
use crate::error::{Error, Result};
use crate::ops::dlq::{DlqReplaySpec, REPLAY_ACK_BATCH};
use crate::ops::drain::ForwardSpec;
use crate::ops::partition::{key_hash_index, RoundRobin};
use crate::progress::{Event, Progress};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long one receive waits before the loop re-checks its stop conditions.
const RECEIVE_POLL: Duration = Duration::from_millis(200);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// After a stop signal, how long to wait for outstanding confirmations.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// A confirmation that has not arrived after this long is treated as lost.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Spread messages evenly over the targets.
    RoundRobin,
    /// Same key, same target: per-key order is kept (Kafka's murmur2 of the key).
    KeyHash,
}

impl Strategy {
    pub fn name(self) -> &'static str {
        match self {
            Strategy::RoundRobin => "round-robin",
            Strategy::KeyHash => "key-hash",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoopSettings {
    /// Most messages published but not yet confirmed.
    pub window: usize,
    /// Confirmed messages acknowledged together (AMQP `multiple`, Kafka commit batching).
    pub ack_batch: usize,
    pub max_messages: Option<u64>,
    pub idle_timeout: Duration,
    pub rate_limit: Option<f64>,
    pub strategy: Strategy,
    pub key: KeySource,
    /// Publish attempts per message before the loop stops with an error.
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    /// After a stop signal, how long to wait for outstanding confirmations.
    pub shutdown_grace: Duration,
    pub confirm_timeout: Duration,
}

impl LoopSettings {
    /// Settings of a DLQ replay: its sink routes every message itself, so strategy and key
    /// are never consulted.
    pub fn for_replay(spec: &DlqReplaySpec) -> Self {
        LoopSettings {
            window: spec.confirm_window,
            ack_batch: REPLAY_ACK_BATCH,
            max_messages: spec.max_messages,
            idle_timeout: spec.idle_timeout,
            rate_limit: spec.rate_limit,
            strategy: Strategy::RoundRobin,
            key: KeySource::RoutingKey,
            max_attempts: spec.max_attempts,
            retry_backoff: RETRY_BACKOFF,
            shutdown_grace: SHUTDOWN_GRACE,
            confirm_timeout: CONFIRM_TIMEOUT,
        }
    }

    pub fn from_spec(spec: &ForwardSpec, key: KeySource) -> Self {
        LoopSettings {
            window: spec.confirm_window,
            ack_batch: spec.ack_batch,
            max_messages: spec.max_messages,
            idle_timeout: spec.idle_timeout.unwrap_or(Duration::MAX),
            rate_limit: spec.rate_limit,
            strategy: spec.strategy,
            key,
            max_attempts: spec.max_attempts,
            retry_backoff: RETRY_BACKOFF,
            shutdown_grace: SHUTDOWN_GRACE,
            confirm_timeout: CONFIRM_TIMEOUT,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    MaxMessages,
    Idle,
    Signal,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopOutcome {
    /// Confirmed by the target and acknowledged on the source.
    pub forwarded: u64,
    pub per_target: BTreeMap<String, u64>,
    pub retries: u64,
    /// Under key-hash, messages without the key (sent round-robin instead).
    pub unkeyed: u64,
    /// Received but not confirmed before the stop; they return to the source.
    pub returned_to_source: u64,
    /// Left on the source because the sink's `route` said so (always 0 for the drain).
    pub skipped: u64,
    pub elapsed_secs: f64,
    pub rate: f64,
    pub stopped_by: StopReason,
}

struct InFlight<M> {
    position: Position,
    target: usize,
    message: M,
    attempts: u32,
}

type Pending = Pin<Box<dyn Future<Output = (u64, std::result::Result<(), Refusal>)> + Send>>;

/// Tags a confirmation with its in-flight id and bounds how long it may take.
fn pending(id: u64, confirmation: crate::broker::Confirmation, timeout: Duration) -> Pending {
    Box::pin(async move {
        let outcome = match tokio::time::timeout(timeout, confirmation).await {
            Ok(outcome) => outcome,
            // The publish may still have arrived: it stays unacknowledged and is redelivered.
            Err(_) => Err(Refusal::unattributable(format!(
                "no confirmation arrived within {}",
                humantime::format_duration(timeout)
            ))),
        };
        (id, outcome)
    })
}

/// Per lane, the positions received and whether each is confirmed, oldest first; only the
/// confirmed prefix may be acknowledged.
#[derive(Default)]
struct AckTracker {
    lanes: HashMap<u32, VecDeque<(u64, bool)>>,
    releasable: BTreeMap<u32, (u64, usize)>,
}

impl AckTracker {
    fn received(&mut self, position: Position) {
        self.lanes
            .entry(position.lane)
            .or_default()
            .push_back((position.seq, false));
    }

    /// Marks one position confirmed; returns how many messages of its lane became releasable.
    fn confirmed(&mut self, position: Position) -> usize {
        let Some(lane) = self.lanes.get_mut(&position.lane) else {
            return 0;
        };
        if let Ok(index) = lane.binary_search_by_key(&position.seq, |(seq, _)| *seq) {
            lane[index].1 = true;
        }
        let mut released = 0;
        while let Some(&(seq, true)) = lane.front() {
            lane.pop_front();
            released += 1;
            let entry = self.releasable.entry(position.lane).or_insert((seq, 0));
            entry.0 = seq;
            entry.1 += 1;
        }
        released
    }

    fn ready_to_ack(&self, batch: usize, flush: bool) -> Vec<Position> {
        self.releasable
            .iter()
            .filter(|(_, (_, count))| flush || *count >= batch)
            .map(|(&lane, &(seq, _))| Position { lane, seq })
            .collect()
    }

    fn acked(&mut self, position: Position) {
        self.releasable.remove(&position.lane);
    }
}

pub async fn run<S, K>(
    mut source: S,
    mut sink: K,
    settings: &LoopSettings,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<LoopOutcome>
where
    S: Source,
    K: Sink<Message = S::Message>,
{
    let started = Instant::now();
    let fanout = sink.fanout();
    let mut round_robin = RoundRobin::default();
    let mut tracker = AckTracker::default();
    let mut in_flight: HashMap<u64, InFlight<S::Message>> = HashMap::new();
    let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
    // Once set, nothing more is acknowledged: everything not yet acked returns to the source.
    let mut acks_frozen = false;
    let mut next_id: u64 = 0;
    let mut received: u64 = 0;
    let mut forwarded: u64 = 0;
    let mut retries: u64 = 0;
    let mut unkeyed: u64 = 0;
    let mut skipped: u64 = 0;
    let mut per_target: BTreeMap<String, u64> = BTreeMap::new();
    let mut last_message_at = Instant::now();
    let mut stop: Option<StopReason> = None;
    let mut failure: Option<Error> = None;
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);

    let result: Result<()> = async {
        loop {
            if stop.is_none()
                && failure.is_none()
                && settings.max_messages.is_some_and(|max| received >= max)
            {
                stop = Some(StopReason::MaxMessages);
            }
            let stopping = stop.is_some() || failure.is_some();
            if stopping && in_flight.is_empty() {
                break;
            }
            let pace_until = settings.rate_limit.and_then(|rate| {
                let due = started + Duration::from_secs_f64(received as f64 / rate);
                (due > Instant::now()).then(|| tokio::time::Instant::from_std(due))
            });
            let can_receive = !stopping && in_flight.len() < settings.window;
            tokio::select! {
                biased;
                _ = cancel.cancelled(), if stop.is_none() => {
                    stop = Some(StopReason::Signal);
                    grace_deadline = Some(tokio::time::Instant::now() + settings.shutdown_grace);
                }
                _ = sleep_until_opt(grace_deadline), if grace_deadline.is_some() => {
                    // Unconfirmed messages stay unacknowledged and return to the source.
                    break;
                }
                Some(first) = pending.next(), if !pending.is_empty() => {
                    // Take every confirmation already resolved, refusals first: lapin resolves a
                    // coalesced ack's tags in ascending order and hands a return to the first of
                    // them, so a misattributed return is visible no later than the confirmation
                    // of the message it belongs to, and must be seen before anything is acked.
                    let mut batch = vec![first];
                    while let Some(Some(next)) = pending.next().now_or_never() {
                        batch.push(next);
                    }
                    batch.sort_by_key(|(_, outcome)| outcome.is_ok());
                    if let Some((_, Err(refusal))) = batch.iter().find(|(_, outcome)| {
                        matches!(outcome, Err(refusal) if refusal.kind == RefusalKind::Unattributable)
                    }) {
                        acks_frozen = true;
                        failure.get_or_insert_with(|| Error::Broker(format!(
                            "{}; mqdrain cannot tell which message that was, so it stopped acknowledging: every message not yet acknowledged goes back to the source. Recreate the temporary queues (mqdrain expand) and run forward again",
                            refusal.reason
                        )));
                    }
                    for (id, outcome) in batch {
                        let Some(mut entry) = in_flight.remove(&id) else { continue };
                        match outcome {
                            Ok(()) => {
                                forwarded += 1;
                                *per_target
                                    .entry(sink.target_name(entry.position.lane, entry.target))
                                    .or_default() += 1;
                                tracker.confirmed(entry.position);
                            }
                            Err(refusal) => {
                                entry.attempts += 1;
                                let target = sink.target_name(entry.position.lane, entry.target);
                                if refusal.kind != RefusalKind::Retry || entry.attempts >= settings.max_attempts {
                                    failure.get_or_insert_with(|| Error::Broker(format!(
                                        "{target} refused a message {} time(s), last because {}; it stays on the source and nothing unconfirmed was acknowledged. Check that {target} exists and accepts messages (length limit, permissions), then run forward again",
                                        entry.attempts, refusal.reason
                                    )));
                                    continue;
                                }
                                retries += 1;
                                tokio::time::sleep(settings.retry_backoff * entry.attempts).await;
                                let confirmation = sink
                                    .send(entry.position.lane, entry.target, &entry.message)
                                    .await?;
                                pending.push(self::pending(id, confirmation, settings.confirm_timeout));
                                in_flight.insert(id, entry);
                            }
                        }
                    }
                    if !acks_frozen {
                        let flush = in_flight.is_empty();
                        for position in tracker.ready_to_ack(settings.ack_batch, flush) {
                            source.acknowledge(position).await?;
                            tracker.acked(position);
                        }
                    }
                }
                _ = sleep_until_opt(pace_until), if can_receive && pace_until.is_some() => {}
                message = source.receive(RECEIVE_POLL), if can_receive && pace_until.is_none() => {
                    match message? {
                        Some(message) => {
                            received += 1;
                            last_message_at = Instant::now();
                            let position = S::position(&message);
                            let target = match sink.route(position.lane, &message) {
                                Route::Skip => {
                                    // Not tracked: the source keeps it out of later acks.
                                    skipped += 1;
                                    source.skip(&message).await?;
                                    continue;
                                }
                                Route::Target(index) => index,
                                Route::Strategy => match settings.strategy {
                                    Strategy::RoundRobin => round_robin.pick(position.lane, fanout),
                                    Strategy::KeyHash => match S::key(&message, &settings.key) {
                                        Some(key) => key_hash_index(key, fanout),
                                        None => {
                                            unkeyed += 1;
                                            round_robin.pick(position.lane, fanout)
                                        }
                                    },
                                },
                            };
                            let confirmation = sink.send(position.lane, target, &message).await?;
                            tracker.received(position);
                            let id = next_id;
                            next_id += 1;
                            in_flight.insert(id, InFlight { position, target, message, attempts: 0 });
                            pending.push(self::pending(id, confirmation, settings.confirm_timeout));
                        }
                        None => {
                            if in_flight.is_empty() && last_message_at.elapsed() >= settings.idle_timeout {
                                stop = Some(StopReason::Idle);
                            }
                        }
                    }
                }
                _ = progress_tick.tick() => {
                    progress.emit(Event::Forwarded {
                        forwarded,
                        in_flight: in_flight.len() as u64,
                        retries,
                        rate: rate(forwarded, started.elapsed()),
                    });
                }
            }
        }
        if !acks_frozen {
            for position in tracker.ready_to_ack(settings.ack_batch, true) {
                source.acknowledge(position).await?;
                tracker.acked(position);
            }
        }
        Ok(())
    }
    .await;

    let returned_to_source = received - forwarded - skipped;
    let closed = source.close().await;
    let flushed = sink.close().await;
    progress.emit(Event::Forwarded {
        forwarded,
        in_flight: 0,
        retries,
        rate: rate(forwarded, started.elapsed()),
    });
    result?;
    closed?;
    flushed?;
    if let Some(failure) = failure {
        return Err(Error::Broker(format!(
            "{failure} (forwarded {forwarded} before stopping)"
        )));
    }
    Ok(LoopOutcome {
        forwarded,
        per_target,
        retries,
        unkeyed,
        returned_to_source,
        skipped,
        elapsed_secs: started.elapsed().as_secs_f64(),
        rate: rate(forwarded, started.elapsed()),
        stopped_by: stop.unwrap_or(StopReason::Signal),
    })
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        count as f64 / secs
    } else {
        0.0
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lane: u32, seq: u64) -> Position {
        Position { lane, seq }
    }

    #[test]
    fn only_the_confirmed_prefix_is_released() {
        let mut tracker = AckTracker::default();
        for seq in 1..=5 {
            tracker.received(at(0, seq));
        }
        assert_eq!(tracker.confirmed(at(0, 2)), 0);
        assert_eq!(tracker.confirmed(at(0, 3)), 0);
        assert!(tracker.ready_to_ack(1, true).is_empty());
        assert_eq!(tracker.confirmed(at(0, 1)), 3);
        assert_eq!(tracker.ready_to_ack(1, false), vec![at(0, 3)]);
        assert!(tracker.ready_to_ack(4, false).is_empty(), "batch not full");
        tracker.acked(at(0, 3));
        assert_eq!(tracker.confirmed(at(0, 5)), 0);
        assert_eq!(tracker.confirmed(at(0, 4)), 2);
        assert_eq!(tracker.ready_to_ack(100, true), vec![at(0, 5)]);
    }

    #[test]
    fn lanes_are_independent_and_gaps_in_positions_are_fine() {
        let mut tracker = AckTracker::default();
        tracker.received(at(0, 10));
        tracker.received(at(1, 7));
        tracker.received(at(0, 15));
        tracker.confirmed(at(0, 15));
        tracker.confirmed(at(1, 7));
        assert_eq!(tracker.ready_to_ack(1, true), vec![at(1, 7)]);
        tracker.confirmed(at(0, 10));
        assert_eq!(tracker.ready_to_ack(1, true), vec![at(0, 15), at(1, 7)]);
    }

    /// A source of `count` messages on lane 0 (positions 1..=count) that records what the
    /// loop acknowledged and skipped.
    struct ListSource {
        next: u64,
        count: u64,
        log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl Source for ListSource {
        type Message = u64;

        async fn receive(&mut self, _wait: Duration) -> Result<Option<u64>> {
            if self.next > self.count {
                return Ok(None);
            }
            self.next += 1;
            Ok(Some(self.next - 1))
        }

        fn position(message: &u64) -> Position {
            at(0, *message)
        }

        fn key<'m>(_message: &'m u64, _key: &KeySource) -> Option<&'m [u8]> {
            None
        }

        async fn acknowledge(&mut self, position: Position) -> Result<()> {
            self.log
                .lock()
                .unwrap()
                .push(format!("ack {}", position.seq));
            Ok(())
        }

        async fn skip(&mut self, message: &u64) -> Result<()> {
            self.log.lock().unwrap().push(format!("skip {message}"));
            Ok(())
        }

        async fn close(self) -> Result<()> {
            Ok(())
        }
    }

    /// Confirms at once; even messages are skipped, multiples of 3 go to target 1.
    struct EvenSkipper;

    impl Sink for EvenSkipper {
        type Message = u64;

        fn fanout(&self) -> usize {
            2
        }

        fn target_name(&self, _lane: u32, index: usize) -> String {
            format!("t{index}")
        }

        fn route(&self, _lane: u32, message: &u64) -> Route {
            match message {
                m if m % 2 == 0 => Route::Skip,
                m if m % 3 == 0 => Route::Target(1),
                _ => Route::Target(0),
            }
        }

        async fn send(
            &mut self,
            _lane: u32,
            _index: usize,
            _message: &u64,
        ) -> Result<Confirmation> {
            Ok(Box::pin(async { Ok(()) }))
        }

        async fn close(self) -> Result<()> {
            Ok(())
        }
    }

    fn settings() -> LoopSettings {
        LoopSettings {
            window: 10,
            ack_batch: 1,
            max_messages: None,
            idle_timeout: Duration::from_millis(50),
            rate_limit: None,
            strategy: Strategy::RoundRobin,
            key: KeySource::RoutingKey,
            max_attempts: 1,
            retry_backoff: Duration::from_millis(1),
            shutdown_grace: Duration::from_secs(1),
            confirm_timeout: Duration::from_secs(1),
        }
    }

    use crate::broker::Confirmation;

    #[tokio::test]
    async fn skipped_messages_go_back_to_the_source_and_routes_pick_targets() {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let source = ListSource {
            next: 1,
            count: 7,
            log: log.clone(),
        };
        let outcome = run(
            source,
            EvenSkipper,
            &settings(),
            &crate::progress::silent(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(outcome.forwarded, 4);
        assert_eq!(outcome.skipped, 3);
        assert_eq!(outcome.returned_to_source, 0);
        assert_eq!(outcome.per_target.get("t0"), Some(&3), "1, 5, 7");
        assert_eq!(outcome.per_target.get("t1"), Some(&1), "3");
        let log = log.lock().unwrap().clone();
        for skipped in [2, 4, 6] {
            assert!(log.contains(&format!("skip {skipped}")), "{log:?}");
        }
        // Skipped positions are not tracked: acknowledgements pass them, and the source is
        // responsible for keeping them (RabbitMQ acks one by one past a held delivery).
        assert!(log.contains(&"ack 7".to_string()), "{log:?}");
        assert!(!log
            .iter()
            .any(|line| line == "ack 2" || line == "ack 4" || line == "ack 6"));
    }
}
