//! The forwarding loop, written once against the `Source`/`Sink` traits: bounded in-flight
//! window, acknowledgement only after confirmation (contiguously per lane), bounded retries,
//! rate limiting and graceful stop. A sink may route single messages itself (`Sink::route`):
//! a skipped message is handed back to the source (`Source::skip`) and never tracked here, so
//! the source alone keeps it out of later acknowledgements. With a `Dedup`, a message with an
//! id is claimed in Redis before it is published and marked done once confirmed (see
//! `ops::dedup` for the protocol and what it guarantees).

use crate::broker::{KeySource, Position, Refusal, RefusalKind, Route, Sink, Source};
use crate::error::{Error, Result};
use crate::ops::dedup::{Claim, Dedup, Store, BUSY_POLL};
use crate::ops::dlq::{DlqReplaySpec, REPLAY_ACK_BATCH};
use crate::ops::drain::ForwardSpec;
use crate::ops::partition::{key_hash_index, RoundRobin};
use crate::progress::{Event, Level, Progress};
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
    /// Duplicate suppression (`--dedup`); `None` publishes every message.
    pub dedup: Option<Dedup>,
}

impl LoopSettings {
    /// Settings of a DLQ replay: its sink routes every message itself, so strategy and key
    /// are never consulted.
    pub fn for_replay(spec: &DlqReplaySpec, dedup: Option<Dedup>) -> Self {
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
            dedup,
        }
    }

    pub fn from_spec(spec: &ForwardSpec, key: KeySource, dedup: Option<Dedup>) -> Self {
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
            dedup,
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
    /// With `--dedup`: messages delivered before (their id was done), acknowledged on the
    /// source without publishing.
    pub duplicates_suppressed: u64,
    /// With `--dedup`: messages without an id, forwarded without the duplicate check.
    pub without_id: u64,
    /// With `--dedup-optional`: why duplicate suppression was off for (part of) the run.
    pub dedup_bypassed: Option<String>,
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
    /// The stable id, when the forward deduplicates and the message has one.
    id: Option<Vec<u8>>,
}

/// What an in-flight message waited for.
enum Step {
    /// The dedup store's verdict before publishing.
    Claimed(Result<Claim>),
    /// The target's answer.
    Confirmed(std::result::Result<(), Refusal>),
}

impl Step {
    /// Refusals sort before everything else in a batch of resolved steps.
    fn is_refusal(&self) -> bool {
        matches!(self, Step::Confirmed(Err(_)))
    }
}

/// Resolves to the in-flight message's ticket and what happened to it.
type Pending = Pin<Box<dyn Future<Output = (u64, Step)> + Send>>;

/// A published message waiting for the target's verdict.
struct Confirming {
    ticket: u64,
    /// Past this, the confirmation counts as lost.
    deadline: Instant,
    confirmation: crate::broker::Confirmation,
}

/// What the loop waits for: claims (any order) and confirmations (in publish order: lapin
/// resolves a channel's confirms in ascending order and librdkafka a partition's delivery
/// reports, so only the oldest is polled — one waker instead of one per message in flight; a
/// later one that is already resolved is taken right after it).
struct Steps {
    claims: FuturesUnordered<Pending>,
    confirmations: VecDeque<Confirming>,
    /// How long a confirmation may take before it counts as lost.
    confirm_timeout: Duration,
}

impl Steps {
    fn new(confirm_timeout: Duration) -> Self {
        Steps {
            claims: FuturesUnordered::new(),
            confirmations: VecDeque::new(),
            confirm_timeout,
        }
    }

    fn is_empty(&self) -> bool {
        self.claims.is_empty() && self.confirmations.is_empty()
    }

    fn push_claim(&mut self, claim: Pending) {
        self.claims.push(claim);
    }

    fn push_confirmation(&mut self, ticket: u64, confirmation: crate::broker::Confirmation) {
        self.confirmations.push_back(Confirming {
            ticket,
            deadline: Instant::now() + self.confirm_timeout,
            confirmation,
        });
    }

    /// The next resolved step. Cancel-safe: nothing is taken out until it resolved.
    async fn next(&mut self) -> (u64, Step) {
        let Steps {
            claims,
            confirmations,
            ..
        } = self;
        let oldest = async {
            match confirmations.front_mut() {
                Some(front) => (front.ticket, (&mut front.confirmation).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            (ticket, outcome) = oldest => {
                confirmations.pop_front();
                (ticket, Step::Confirmed(outcome))
            }
            Some(step) = claims.next(), if !claims.is_empty() => step,
        }
    }

    /// A step that has already resolved, without waiting.
    fn ready(&mut self) -> Option<(u64, Step)> {
        if let Some(front) = self.confirmations.front_mut() {
            if let Some(outcome) = (&mut front.confirmation).now_or_never() {
                let ticket = front.ticket;
                self.confirmations.pop_front();
                return Some((ticket, Step::Confirmed(outcome)));
            }
        }
        self.claims.next().now_or_never().flatten()
    }

    /// Confirmations older than their deadline resolve as lost. Deadlines grow in publish
    /// order, so only the oldest ones need a look.
    fn expire(&mut self, now: Instant) {
        let timeout = self.confirm_timeout;
        while self
            .confirmations
            .front()
            .is_some_and(|front| front.deadline <= now)
        {
            let Some(front) = self.confirmations.pop_front() else {
                break;
            };
            let ticket = front.ticket;
            // The publish may still have arrived: it stays unacknowledged and is redelivered.
            self.claims.push(Box::pin(async move {
                (
                    ticket,
                    Step::Confirmed(Err(Refusal::unattributable(format!(
                        "no confirmation arrived within {}",
                        humantime::format_duration(timeout)
                    )))),
                )
            }));
        }
    }
}

/// Asks the store about `id` after `delay`. Claims are polled in the order they were pushed, so
/// their requests reach Redis in the order messages arrived: of two copies of one id, the first
/// received holds the mark.
fn claim(store: Store, id: Vec<u8>, ticket: u64, delay: Duration) -> Pending {
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        (ticket, Step::Claimed(store.claim(&id, ticket).await))
    })
}

/// Publishes `entry`, stamping its id when it has one; its confirmation joins `steps`.
async fn publish<K: Sink>(
    sink: &mut K,
    entry: &InFlight<K::Message>,
    ticket: u64,
    steps: &mut Steps,
) -> Result<()> {
    let lane = entry.position.lane;
    let confirmation = match &entry.id {
        Some(id) => {
            sink.send_identified(lane, entry.target, &entry.message, id)
                .await?
        }
        None => sink.send(lane, entry.target, &entry.message).await?,
    };
    steps.push_confirmation(ticket, confirmation);
    Ok(())
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

/// With dedup, claims resolve in any order; per lane, messages wait here in reception order and
/// are published only once every earlier message of the lane was published or settled, so that
/// deduplication does not reorder what key-hash keeps in order.
#[derive(Default)]
struct PublishOrder {
    /// Per lane: ticket, and whether it may be published (claimed, or needs no claim).
    lanes: HashMap<u32, VecDeque<(u64, bool)>>,
}

impl PublishOrder {
    fn enqueue(&mut self, lane: u32, ticket: u64, ready: bool) {
        self.lanes
            .entry(lane)
            .or_default()
            .push_back((ticket, ready));
    }

    /// Marks a queued ticket publishable; false when it is not queued (a retry's re-claim).
    fn mark_ready(&mut self, lane: u32, ticket: u64) -> bool {
        let found = self
            .lanes
            .get_mut(&lane)
            .and_then(|queue| queue.iter_mut().find(|(queued, _)| *queued == ticket));
        match found {
            Some(slot) => {
                slot.1 = true;
                true
            }
            None => false,
        }
    }

    /// Forgets a ticket that will not be published (a duplicate, or left on the source).
    fn remove(&mut self, lane: u32, ticket: u64) {
        if let Some(queue) = self.lanes.get_mut(&lane) {
            queue.retain(|(queued, _)| *queued != ticket);
        }
    }

    /// The lane's next ticket to publish, if it is publishable.
    fn pop_ready(&mut self, lane: u32) -> Option<u64> {
        let queue = self.lanes.get_mut(&lane)?;
        match queue.front() {
            Some(&(ticket, true)) => {
                queue.pop_front();
                Some(ticket)
            }
            _ => None,
        }
    }
}

/// Publishes the lane's publishable head of line.
async fn publish_ready<K: Sink>(
    order: &mut PublishOrder,
    lane: u32,
    sink: &mut K,
    in_flight: &HashMap<u64, InFlight<K::Message>>,
    steps: &mut Steps,
) -> Result<()> {
    while let Some(ticket) = order.pop_ready(lane) {
        if let Some(entry) = in_flight.get(&ticket) {
            publish(sink, entry, ticket, steps).await?;
        }
    }
    Ok(())
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
    let mut steps = Steps::new(settings.confirm_timeout);
    let mut order = PublishOrder::default();
    // Once set, nothing more is acknowledged: everything not yet acked returns to the source.
    let mut acks_frozen = false;
    // The last receive found nothing waiting.
    let mut source_dry = false;
    let mut next_ticket: u64 = 0;
    let mut received: u64 = 0;
    let mut forwarded: u64 = 0;
    let mut suppressed: u64 = 0;
    let mut without_id: u64 = 0;
    let mut retries: u64 = 0;
    let mut unkeyed: u64 = 0;
    let mut skipped: u64 = 0;
    // Counted by (lane, target index) and named once at the end: naming allocates.
    let mut per_target: HashMap<(u32, usize), u64> = HashMap::new();
    let mut last_message_at = Instant::now();
    let mut stop: Option<StopReason> = None;
    let mut failure: Option<Error> = None;
    let mut grace_deadline: Option<tokio::time::Instant> = None;
    let mut progress_tick = tokio::time::interval(PROGRESS_EVERY);
    let dedup = settings.dedup.as_ref();
    let mut marks = Marks::new(dedup);

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
                first = steps.next(), if !steps.is_empty() => {
                    // Take every step already resolved, refusals first: lapin resolves a
                    // coalesced ack's tags in ascending order and hands a return to the first of
                    // them, so a misattributed return is visible no later than the confirmation
                    // of the message it belongs to, and must be seen before anything is acked.
                    let mut batch = vec![first];
                    while let Some(next) = steps.ready() {
                        batch.push(next);
                    }
                    batch.sort_by_key(|(_, step)| !step.is_refusal());
                    if let Some((_, Step::Confirmed(Err(refusal)))) = batch.iter().find(|(_, step)| {
                        matches!(step, Step::Confirmed(Err(refusal)) if refusal.kind == RefusalKind::Unattributable)
                    }) {
                        acks_frozen = true;
                        failure.get_or_insert_with(|| Error::Broker(format!(
                            "{}; mqdrain cannot tell which message that was, so it stopped acknowledging: every message not yet acknowledged goes back to the source. Recreate the temporary queues (mqdrain expand) and run forward again",
                            refusal.reason
                        )));
                    }
                    // Ids confirmed in this batch, marked done together once the batch is through.
                    let mut delivered_ids: Vec<Vec<u8>> = Vec::new();
                    for (ticket, step) in batch {
                        let Some(mut entry) = in_flight.remove(&ticket) else { continue };
                        let lane = entry.position.lane;
                        match step {
                            Step::Claimed(verdict) => {
                                let stopping = stop.is_some() || failure.is_some();
                                match verdict {
                                    Ok(Claim::Duplicate) => {
                                        // Delivered before: acknowledging it is all that is left.
                                        suppressed += 1;
                                        order.remove(lane, ticket);
                                        tracker.confirmed(entry.position);
                                    }
                                    Ok(Claim::Busy) if stopping => {
                                        // Another copy is in flight and we are stopping: this
                                        // one stays on the source, unacknowledged.
                                        order.remove(lane, ticket);
                                    }
                                    Ok(Claim::Busy) if marks.store.is_some() => {
                                        if let (Some(active), Some(id)) = (&marks.store, &entry.id) {
                                            steps.push_claim(claim(active.clone(), id.clone(), ticket, BUSY_POLL));
                                        }
                                        in_flight.insert(ticket, entry);
                                    }
                                    Err(error) if !marks.optional => {
                                        // Not published: it stays on the source.
                                        order.remove(lane, ticket);
                                        failure.get_or_insert(error);
                                    }
                                    // Claimed; or Busy/failed after --dedup-optional bypassed Redis.
                                    other => {
                                        if let Err(error) = &other {
                                            marks.bypass(error, progress);
                                        }
                                        if !order.mark_ready(lane, ticket) {
                                            // A retry's re-claim: it was in order once already.
                                            publish(&mut sink, &entry, ticket, &mut steps).await?;
                                        }
                                        in_flight.insert(ticket, entry);
                                    }
                                }
                                publish_ready(&mut order, lane, &mut sink, &in_flight, &mut steps).await?;
                            }
                            Step::Confirmed(Ok(())) => {
                                forwarded += 1;
                                *per_target.entry((lane, entry.target)).or_default() += 1;
                                delivered_ids.extend(entry.id);
                                tracker.confirmed(entry.position);
                            }
                            Step::Confirmed(Err(refusal)) => {
                                entry.attempts += 1;
                                let target = sink.target_name(lane, entry.target);
                                if refusal.kind != RefusalKind::Retry || entry.attempts >= settings.max_attempts {
                                    if let (Some(active), Some(id)) = (&marks.store, &entry.id) {
                                        // Best effort: a mark left behind only delays a rerun.
                                        let _ = active.release(id, ticket).await;
                                    }
                                    failure.get_or_insert_with(|| Error::Broker(format!(
                                        "{target} refused a message {} time(s), last because {}; it stays on the source and nothing unconfirmed was acknowledged. Check that {target} exists and accepts messages (length limit, permissions), then run forward again",
                                        entry.attempts, refusal.reason
                                    )));
                                    continue;
                                }
                                retries += 1;
                                tokio::time::sleep(settings.retry_backoff * entry.attempts).await;
                                match (&marks.store, &entry.id) {
                                    // Claiming again refreshes our in-flight mark for the retry.
                                    (Some(active), Some(id)) => steps.push_claim(claim(
                                        active.clone(),
                                        id.clone(),
                                        ticket,
                                        Duration::ZERO,
                                    )),
                                    _ => publish(&mut sink, &entry, ticket, &mut steps).await?,
                                }
                                in_flight.insert(ticket, entry);
                            }
                        }
                    }
                    if !acks_frozen {
                        // No unattributable return in this batch or before it: these ids are
                        // certainly in the target, so later copies are duplicates.
                        if let Err(error) = marks.done(&delivered_ids, progress).await {
                            // Delivered but not remembered: still acknowledged, since a
                            // redelivery would certainly be a duplicate; the forward stops.
                            failure.get_or_insert(error);
                        }
                        // A partial batch waits while messages keep coming; once the source ran
                        // dry, everything confirmed is acknowledged at once.
                        let flush = in_flight.is_empty() && source_dry;
                        acknowledge_ready(&mut source, &mut tracker, settings.ack_batch, flush).await?;
                    }
                }
                _ = sleep_until_opt(pace_until), if can_receive && pace_until.is_some() => {}
                message = source.receive(RECEIVE_POLL), if can_receive && pace_until.is_none() => {
                    match message? {
                        Some(message) => {
                            received += 1;
                            source_dry = false;
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
                            let id = dedup.and_then(|dedup| dedup.identity::<S>(&message));
                            if dedup.is_some() && id.is_none() {
                                without_id += 1;
                            }
                            let ticket = next_ticket;
                            next_ticket += 1;
                            let entry = InFlight { position, target, message, attempts: 0, id };
                            tracker.received(position);
                            if dedup.is_some() {
                                let needs_claim = marks.store.is_some() && entry.id.is_some();
                                order.enqueue(position.lane, ticket, !needs_claim);
                                if let (true, Some(active), Some(id)) = (needs_claim, &marks.store, &entry.id) {
                                    steps.push_claim(claim(active.clone(), id.clone(), ticket, Duration::ZERO));
                                }
                                in_flight.insert(ticket, entry);
                                publish_ready(&mut order, position.lane, &mut sink, &in_flight, &mut steps).await?;
                            } else {
                                publish(&mut sink, &entry, ticket, &mut steps).await?;
                                in_flight.insert(ticket, entry);
                            }
                        }
                        None => {
                            source_dry = true;
                            if !acks_frozen && in_flight.is_empty() {
                                acknowledge_ready(&mut source, &mut tracker, settings.ack_batch, true).await?;
                            }
                            if in_flight.is_empty() && last_message_at.elapsed() >= settings.idle_timeout {
                                stop = Some(StopReason::Idle);
                            }
                        }
                    }
                }
                _ = progress_tick.tick() => {
                    steps.expire(Instant::now());
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
            acknowledge_ready(&mut source, &mut tracker, settings.ack_batch, true).await?;
        }
        Ok(())
    }
    .await;

    let returned_to_source = received - forwarded - skipped - suppressed;
    let mut per_target_named: BTreeMap<String, u64> = BTreeMap::new();
    for ((lane, index), count) in per_target {
        *per_target_named
            .entry(sink.target_name(lane, index))
            .or_default() += count;
    }
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
        per_target: per_target_named,
        retries,
        unkeyed,
        duplicates_suppressed: suppressed,
        without_id,
        dedup_bypassed: marks.bypassed,
        returned_to_source,
        skipped,
        elapsed_secs: started.elapsed().as_secs_f64(),
        rate: rate(forwarded, started.elapsed()),
        stopped_by: stop.unwrap_or(StopReason::Signal),
    })
}

/// The loop's side of duplicate suppression: the store while Redis answers. Ids are marked done
/// per batch of resolved confirmations once the batch showed no unattributable return, so an id
/// is never `done` for a message the target did not keep.
struct Marks {
    /// Taken away when `--dedup-optional` bypasses a failing Redis for the rest of the run.
    store: Option<Store>,
    optional: bool,
    bypassed: Option<String>,
}

impl Marks {
    fn new(dedup: Option<&Dedup>) -> Self {
        Marks {
            store: dedup.and_then(|dedup| dedup.store.clone()),
            optional: dedup.is_some_and(|dedup| dedup.optional),
            bypassed: dedup.and_then(|dedup| dedup.bypassed.clone()),
        }
    }

    /// Marks `ids` done. A Redis failure is returned, unless `--dedup-optional` turns it into a
    /// bypass.
    async fn done(&mut self, ids: &[Vec<u8>], progress: &Progress) -> Result<()> {
        let Some(store) = self.store.as_ref().filter(|_| !ids.is_empty()) else {
            return Ok(());
        };
        match store.done(ids).await {
            Ok(()) => Ok(()),
            Err(error) if self.optional => {
                self.bypass(&error, progress);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    /// `--dedup-optional` and Redis failed: forward the rest of the run without suppression, and
    /// say so once.
    fn bypass(&mut self, error: &Error, progress: &Progress) {
        if self.store.take().is_some() {
            let reason = error.to_string();
            progress.emit(Event::Notice {
                level: Level::Warn,
                message: format!(
                    "duplicate suppression is OFF for the rest of this forward (--dedup-optional): {reason}"
                ),
            });
            self.bypassed = Some(reason);
        }
    }
}

/// Acknowledges on the source what became releasable: every `batch` messages of a lane, or
/// everything with `flush`.
async fn acknowledge_ready<S: Source>(
    source: &mut S,
    tracker: &mut AckTracker,
    batch: usize,
    flush: bool,
) -> Result<()> {
    for position in tracker.ready_to_ack(batch, flush) {
        source.acknowledge(position).await?;
        tracker.acked(position);
    }
    Ok(())
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
    fn publish_order_is_reception_order_per_lane() {
        let mut order = PublishOrder::default();
        order.enqueue(0, 1, false);
        order.enqueue(0, 2, true);
        order.enqueue(1, 3, true);
        order.enqueue(0, 4, false);
        assert_eq!(order.pop_ready(0), None, "2 waits for 1's claim");
        assert_eq!(
            order.pop_ready(1),
            Some(3),
            "lanes do not wait for each other"
        );
        assert!(order.mark_ready(0, 1));
        assert_eq!(order.pop_ready(0), Some(1));
        assert_eq!(order.pop_ready(0), Some(2));
        assert_eq!(order.pop_ready(0), None);
        order.remove(0, 4);
        assert_eq!(order.pop_ready(0), None);
        assert!(
            !order.mark_ready(0, 2),
            "published already: a retry's re-claim"
        );
    }

    #[tokio::test]
    async fn confirmations_are_taken_oldest_first_and_lost_ones_expire() {
        let (first_sender, first) = tokio::sync::oneshot::channel::<()>();
        let mut steps = Steps::new(Duration::from_secs(60));
        steps.push_confirmation(
            1,
            Box::pin(async move {
                let _ = first.await;
                Ok(())
            }),
        );
        steps.push_confirmation(2, Box::pin(async { Ok(()) }));
        assert!(steps.ready().is_none(), "2 is resolved but waits for 1");
        let _ = first_sender.send(());
        assert!(matches!(steps.ready(), Some((1, Step::Confirmed(Ok(()))))));
        assert!(matches!(steps.ready(), Some((2, Step::Confirmed(Ok(()))))));
        assert!(steps.is_empty());

        steps.confirm_timeout = Duration::ZERO;
        steps.push_confirmation(3, Box::pin(std::future::pending()));
        steps.expire(Instant::now() + Duration::from_millis(1));
        match steps.next().await {
            (3, Step::Confirmed(Err(refusal))) => {
                assert_eq!(refusal.kind, RefusalKind::Unattributable)
            }
            (ticket, _) => panic!("ticket {ticket} resolved instead of the lost 3"),
        }
        assert!(steps.is_empty());
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
            dedup: None,
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
