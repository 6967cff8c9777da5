//! The Kafka connector: at-least-once, offsets committed only past messages
//! that were delivered or dead-lettered.
//!
//! Each function has its own consumer group (`ebb-{namespace}-{function}`,
//! or its `consumer-group` setting) subscribed to its topics, so two
//! functions on one topic each get every message. Messages are taken only
//! while the function has free delivery slots (backpressure) and delivered
//! in the order `kafka-ordering` asks for: one at a time per partition (the
//! default), one at a time per key, or as many at once as the slots allow.
//! Whatever the order of completion, a partition's committed offset only
//! moves past a message once it and every earlier one are finished
//! ([`Offsets`]), so a crash or a rebalance repeats messages, never skips
//! them. Dead letters are produced to the function's `dead-letter` topic
//! with `acks=all`, and only then count as finished. Retries wait in the
//! connector.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use ebb_model::{FunctionSpec, KafkaOrdering};
use ebb_runtime::Retrying;
use futures::future::BoxFuture;
use http::HeaderMap;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::Error;
use crate::engine::{DeadLetterSink, Delivery};
use crate::event::Event;
use crate::supervisor::{Consumer, ConsumerTask, Finish, Settings, Slots, Source, accepts_names};

/// Where a group with no committed offset starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// New messages only (as a new JetStream consumer).
    #[default]
    Latest,
    /// Everything still in the topic.
    Earliest,
}

/// Settings of the Kafka connector.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `host:port[,host:port]`.
    pub brokers: String,
    pub offset_reset: OffsetReset,
    /// Deliveries in flight across all functions.
    pub max_inflight_total: usize,
    /// How long in-flight calls may take to finish on shutdown.
    pub drain_timeout: Duration,
    /// How often finished offsets are committed.
    pub commit_interval: Duration,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            offset_reset: OffsetReset::Latest,
            max_inflight_total: 1024,
            drain_timeout: Duration::from_secs(30),
            commit_interval: Duration::from_millis(500),
        }
    }
}

/// Why a name is not a Kafka topic, if it is not: 1–249 characters of
/// `[A-Za-z0-9._-]`, not `.` or `..` (Kafka has no wildcards: a topic is a
/// name).
pub fn validate_topic(t: &str) -> Result<(), String> {
    if t.is_empty() || t.len() > 249 {
        return Err(format!(
            "Kafka topic `{t}` must be 1 to 249 characters long"
        ));
    }
    if t == "." || t == ".." {
        return Err(format!("`{t}` is not a Kafka topic name"));
    }
    if let Some(c) = t
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "Kafka topic `{t}` contains `{c}`; topics are plain names of letters, digits, `.`, `_` and `-` (no wildcards)"
        ));
    }
    Ok(())
}

/// The finished messages of each partition, and how far its offset can be
/// committed: past every message up to the first one still unfinished.
#[derive(Debug, Default)]
pub struct Offsets {
    parts: HashMap<(String, i32), Part>,
}

#[derive(Debug, Default)]
struct Part {
    /// Taken and not finished.
    pending: BTreeSet<i64>,
    /// One past the highest offset taken.
    next: i64,
    /// The offset last committed (the next to read).
    committed: i64,
}

impl Offsets {
    /// A message was taken; `true` when it is the first of its partition
    /// (whose start should be committed before it is delivered).
    pub fn take(&mut self, topic: &str, partition: i32, offset: i64) -> bool {
        let first = !self.parts.contains_key(&(topic.to_owned(), partition));
        // The first message read is where the partition's reading began.
        let p = self
            .parts
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| Part {
                committed: offset,
                next: offset,
                ..Part::default()
            });
        p.pending.insert(offset);
        p.next = p.next.max(offset + 1);
        first
    }

    /// A message was delivered or dead-lettered.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            p.pending.remove(&offset);
        }
    }

    /// Offsets to commit now (`(topic, partition, next offset)`): those
    /// that moved past the last commit that landed.
    pub fn to_commit(&self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for ((topic, partition), p) in &self.parts {
            let upto = p.pending.first().copied().unwrap_or(p.next);
            if upto > p.committed {
                out.push((topic.clone(), *partition, upto));
            }
        }
        out.sort();
        out
    }

    /// These offsets were committed.
    pub fn committed(&mut self, points: &[(String, i32, i64)]) {
        for (topic, partition, offset) in points {
            if let Some(p) = self.parts.get_mut(&(topic.clone(), *partition)) {
                p.committed = p.committed.max(*offset);
            }
        }
    }
}

/// Lanes per partition with `kafka-ordering: key`.
pub const KEY_LANES: u64 = 64;

/// Which lane a message goes to: messages of one lane are delivered one at a
/// time, in order; `None` means no order is kept (delivered at once).
pub fn lane(
    ordering: KafkaOrdering,
    topic: &str,
    partition: i32,
    key: Option<&[u8]>,
) -> Option<(String, i32, u64)> {
    match (ordering, key) {
        (KafkaOrdering::Partition, _) => Some((topic.to_owned(), partition, 0)),
        // Keys share a bounded number of lanes per partition: one key always
        // lands in the same lane (so its messages keep their order), and
        // many keys do not make many lanes.
        (KafkaOrdering::Key, Some(k)) => {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            k.hash(&mut h);
            Some((topic.to_owned(), partition, h.finish() % KEY_LANES))
        }
        // Messages without a key have no order to keep.
        (KafkaOrdering::Key, None) | (KafkaOrdering::None, _) => None,
    }
}

/// HTTP headers of a Kafka message: its headers whose value is valid in
/// HTTP, and the key as `ce-partitionkey` (CloudEvents' Kafka binding).
pub fn http_headers(msg: &OwnedMessage) -> HeaderMap {
    // rdkafka panics on a header name that is not UTF-8: such a message
    // is delivered without its headers rather than stopping the consumer.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| broker_headers(msg)));
    let mut out = read.unwrap_or_else(|_| {
        tracing::warn!(
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            "a header name is not UTF-8; the message is delivered without its headers"
        );
        HeaderMap::new()
    });
    if let Some(k) = msg.key()
        && let Ok(v) = http::HeaderValue::from_bytes(k)
    {
        out.insert("ce-partitionkey", v);
    }
    out
}

fn broker_headers(msg: &OwnedMessage) -> HeaderMap {
    let mut out = HeaderMap::new();
    if let Some(h) = msg.headers() {
        for header in h.iter() {
            let (Ok(name), Some(value)) = (
                http::HeaderName::from_bytes(header.key.as_bytes()),
                header.value,
            ) else {
                continue;
            };
            if let Ok(v) = http::HeaderValue::from_bytes(value) {
                out.append(name, v);
            }
        }
    }
    out
}

/// Kafka headers from HTTP headers.
pub fn kafka_headers(h: &HeaderMap) -> OwnedHeaders {
    let mut out = OwnedHeaders::new();
    for (name, value) in h {
        out = out.insert(Header {
            key: name.as_str(),
            value: Some(value.as_bytes()),
        });
    }
    out
}

fn kafka_event(msg: &OwnedMessage) -> Event {
    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
    Event {
        id: format!("{topic}/{partition}/{offset}"),
        source: format!("/ebb/kafka/{topic}"),
        kind: "io.ebb.kafka.message".into(),
        topic: topic.to_owned(),
        time: msg
            .timestamp()
            .to_millis()
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_else(Utc::now),
        headers: http_headers(msg),
        body: Bytes::copy_from_slice(msg.payload().unwrap_or_default()),
        position: format!("topic {topic} partition {partition} offset {offset}"),
    }
}

/// A Kafka message being delivered: finishing it lets its partition's
/// offset move past it; giving it back leaves it for the next reader.
struct KafkaDelivery {
    offsets: Arc<Mutex<Offsets>>,
    topic: String,
    partition: i32,
    offset: i64,
}

impl KafkaDelivery {
    fn finish(&self) {
        if let Ok(mut o) = self.offsets.lock() {
            o.finish(&self.topic, self.partition, self.offset);
        }
    }
}

impl Delivery for KafkaDelivery {
    async fn ack(&mut self) -> Result<(), Error> {
        self.finish();
        Ok(())
    }
    async fn release(&mut self) -> Result<(), Error> {
        // Not finished: the offset never moves past it in this process.
        Ok(())
    }
    async fn terminate(&mut self) -> Result<(), Error> {
        self.finish();
        Ok(())
    }
}

/// Produces dead letters with `acks=all`: `Ok` once the brokers have them.
pub struct KafkaDeadLetters {
    producer: FutureProducer,
}

impl DeadLetterSink for KafkaDeadLetters {
    async fn publish(&self, topic: &str, headers: HeaderMap, body: Bytes) -> Result<(), Error> {
        validate_topic(topic).map_err(Error::DeadLetter)?;
        let record = FutureRecord::<(), _>::to(topic)
            .payload(body.as_ref())
            .headers(kafka_headers(&headers));
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|_| ())
            .map_err(|(e, _)| Error::dead_letter(format!("produce to {topic}"), e))
    }
}

fn producer(brokers: &str, client_id: &str) -> Result<FutureProducer, Error> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", client_id)
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "10000")
        .create()
        .map_err(|e| Error::Config(format!("--url {brokers}: {e}")))
}

/// The Kafka source of `cfg`, with its supervisor settings.
pub fn source(cfg: KafkaConfig) -> Result<(KafkaSource, Settings), Error> {
    if cfg.brokers.trim().is_empty() {
        return Err(Error::Config(
            "--url: give the Kafka bootstrap servers, host:port[,host:port]".into(),
        ));
    }
    let sink = Arc::new(KafkaDeadLetters {
        producer: producer(&cfg.brokers, "ebb-connector-kafka")?,
    });
    let settings = Settings::new(cfg.max_inflight_total, cfg.drain_timeout);
    Ok((KafkaSource { cfg, sink }, settings))
}

/// The Kafka source: a consumer group per function, subscribed to its
/// topics; offsets committed only past what finished.
pub struct KafkaSource {
    cfg: KafkaConfig,
    sink: Arc<KafkaDeadLetters>,
}

impl Source for KafkaSource {
    fn name(&self) -> &'static str {
        "kafka"
    }

    fn accepts(&self, spec: &FunctionSpec) -> Option<Result<(), String>> {
        // Topics (and the dead-letter topic) must be Kafka topic names.
        let dead_letter = spec.dead_letter_topic();
        accepts_names(spec, spec.topics.iter().chain(&dead_letter), validate_topic)
    }

    async fn start(&mut self, c: Consumer) -> Result<ConsumerTask, Error> {
        let consumer = Arc::new(consumer_for(&self.cfg, &c.spec)?);
        tracing::debug!(function = %c.key(), group = %c.spec.consumer_group_name(), ordering = c.spec.kafka_ordering.as_str(), "joining the group");
        let (sink, commit_interval) = (self.sink.clone(), self.cfg.commit_interval);
        Ok(Box::pin(consume(consumer, commit_interval, c, sink)))
    }
}

fn consumer_for(cfg: &KafkaConfig, spec: &FunctionSpec) -> Result<StreamConsumer, Error> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", spec.consumer_group_name())
        .set("client.id", "ebb-connector-kafka")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set(
            "auto.offset.reset",
            match cfg.offset_reset {
                OffsetReset::Latest => "latest",
                OffsetReset::Earliest => "earliest",
            },
        )
        .set("allow.auto.create.topics", "false")
        // A crashed connector's partitions move to another after 10 s
        // (librdkafka's default is 45 s).
        .set("session.timeout.ms", "10000")
        // Reading pauses while every slot is busy (a hold lasts up to
        // --hold-timeout, 5 min): leave the group only after 15 min.
        .set("max.poll.interval.ms", "900000")
        // What librdkafka fetches ahead of the slots, per consumer.
        .set("queued.max.messages.kbytes", "4096")
        .create()
        .map_err(|e| Error::Config(format!("--url {}: {e}", cfg.brokers)))?;
    let topics: Vec<&str> = spec.topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(|e| Error::broker(format!("subscribe to {topics:?}"), e))?;
    Ok(consumer)
}

/// Commits `points` (synchronously: call it off the async threads).
fn commit_points(consumer: &StreamConsumer, points: &[(String, i32, i64)]) -> Result<(), String> {
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, offset) in points {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
            .map_err(|e| e.to_string())?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| e.to_string())
}

/// Commits what finished since the last commit that landed; one that fails
/// is tried again next time. A partition taken away by a rebalance: its new
/// reader starts from the last commit that landed, repeating, never
/// skipping.
async fn commit(consumer: &Arc<StreamConsumer>, offsets: &Arc<Mutex<Offsets>>, key: &str) {
    let points = match offsets.lock() {
        Ok(o) => o.to_commit(),
        Err(_) => return,
    };
    if points.is_empty() {
        return;
    }
    let c = consumer.clone();
    let done =
        tokio::task::spawn_blocking(move || commit_points(&c, &points).map(|()| points)).await;
    match done {
        Ok(Ok(points)) => {
            if let Ok(mut o) = offsets.lock() {
                o.committed(&points);
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(function = %key, error = %e, "cannot commit offsets; trying again")
        }
        Err(e) => tracing::warn!(function = %key, error = %e, "commit task failed"),
    }
}

async fn consume(
    consumer: Arc<StreamConsumer>,
    commit_interval: Duration,
    c: Consumer,
    sink: Arc<KafkaDeadLetters>,
) -> Finish {
    let key = c.key().to_string();
    let ordering = c.spec.kafka_ordering;
    let offsets = Arc::new(Mutex::new(Offsets::default()));
    let mut lanes: HashMap<(String, i32, u64), mpsc::UnboundedSender<BoxFuture<'static, ()>>> =
        HashMap::new();
    let mut tick = tokio::time::interval(commit_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut errors = Retrying::new(Duration::from_millis(500), Duration::from_secs(5));
    loop {
        // A slot of the function before reading, one of the process once a
        // message is there: an idle function holds no process slot.
        let own = tokio::select! {
            p = c.function_slot() => match p { Some(p) => p, None => break },
            _ = tick.tick() => {
                commit(&consumer, &offsets, &key).await;
                continue;
            }
        };
        let msg = loop {
            tokio::select! {
                biased;
                () = c.stop.cancelled() => break None,
                m = consumer.recv() => match m {
                    Ok(m) => {
                        errors.reset();
                        break Some(m.detach());
                    }
                    Err(e) => {
                        c.engine.metrics().error("consume");
                        let pause = errors.next_pause();
                        tracing::warn!(function = %key, error = %e, retry_in = ?pause, "cannot read from Kafka; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = c.stop.cancelled() => break None,
                        }
                    }
                },
                _ = tick.tick() => commit(&consumer, &offsets, &key).await,
            }
        };
        let Some(msg) = msg else { break };
        // Not taken on stop: read again by the next consumer.
        let Some(any) = c.process_slot().await else {
            break;
        };
        let (topic, partition, offset) = (msg.topic().to_owned(), msg.partition(), msg.offset());
        let first = offsets
            .lock()
            .map(|mut o| o.take(&topic, partition, offset))
            .unwrap_or(false);
        if first {
            // Where this partition's reading starts, committed before its
            // first delivery: a group new to it would otherwise start past
            // a message held here if the process stopped (`latest`).
            let cc = consumer.clone();
            let start = vec![(topic.clone(), partition, offset)];
            match tokio::task::spawn_blocking(move || commit_points(&cc, &start)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(function = %key, error = %e, "cannot commit where the partition starts")
                }
                Err(e) => tracing::warn!(function = %key, error = %e, "commit task failed"),
            }
        }
        let event = kafka_event(&msg);
        let delivery = KafkaDelivery {
            offsets: offsets.clone(),
            topic: topic.clone(),
            partition,
            offset,
        };
        let slots = Slots::new(own, any);
        match lane(ordering, &topic, partition, msg.key()) {
            None => c.deliver(slots, event, delivery, sink.clone()),
            Some(l) => {
                let tx = lanes.entry(l).or_insert_with(|| {
                    let (tx, mut rx) = mpsc::unbounded_channel::<BoxFuture<'static, ()>>();
                    let stop = c.stop.clone();
                    c.tracker.spawn(async move {
                        // One at a time, in order; on stop, what has not
                        // started stays unfinished (read again later).
                        while let Some(delivery) = rx.recv().await {
                            if stop.is_cancelled() {
                                break;
                            }
                            delivery.await;
                        }
                    });
                    tx
                });
                // A lane that ended (stopping) leaves the message unfinished.
                let _ = tx.send(Box::pin(c.delivery(slots, event, delivery, sink.clone())));
            }
        }
    }
    // Stopped taking; once the calls in flight have finished, the last
    // commit, then the group is left.
    drop(lanes);
    Some(Box::pin(async move {
        commit(&consumer, &offsets, &key).await;
        // Leaving the group blocks until librdkafka has closed the consumer.
        let _ = tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await;
        tracing::debug!(function = %key, "consumer stopped");
    }))
}

/// Produces one message (for `ebb publish --kafka`) and waits until the
/// brokers have it (`acks=all`); returns its partition and offset.
pub async fn publish(
    brokers: &str,
    topic: &str,
    key: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<(i32, i64), Error> {
    validate_topic(topic).map_err(Error::Config)?;
    let producer = producer(brokers, "ebb-publish")?;
    let mut record = FutureRecord::<str, [u8]>::to(topic)
        .payload(body.as_ref())
        .headers(kafka_headers(headers));
    if let Some(k) = key {
        record = record.key(k);
    }
    let delivery = producer
        .send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| Error::broker(format!("produce to {topic}"), e))?;
    Ok((delivery.partition, delivery.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_commit_only_past_a_finished_prefix() {
        let mut o = Offsets::default();
        assert!(o.take("t", 0, 10), "the first of its partition");
        for off in 11..15 {
            assert!(!o.take("t", 0, off));
        }
        assert!(o.to_commit().is_empty(), "nothing finished");
        // Finished out of order: 11 and 12 wait for 10.
        o.finish("t", 0, 11);
        o.finish("t", 0, 12);
        assert!(o.to_commit().is_empty());
        o.finish("t", 0, 10);
        let points = o.to_commit();
        assert_eq!(points, [("t".to_owned(), 0, 13)]);
        // Until the commit lands, it is asked for again.
        assert_eq!(o.to_commit(), points, "a failed commit is tried again");
        o.committed(&points);
        assert!(o.to_commit().is_empty(), "committed once");
        o.finish("t", 0, 14);
        assert!(o.to_commit().is_empty(), "13 is still unfinished");
        o.finish("t", 0, 13);
        assert_eq!(o.to_commit(), [("t".to_owned(), 0, 15)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut o = Offsets::default();
        o.take("t", 0, 0);
        o.take("t", 1, 5);
        o.take("u", 0, 7);
        o.finish("t", 1, 5);
        o.finish("u", 0, 7);
        let points = o.to_commit();
        assert_eq!(points, [("t".to_owned(), 1, 6), ("u".to_owned(), 0, 8)]);
        o.committed(&points);
        // A finish for a partition never taken changes nothing.
        o.finish("v", 3, 1);
        assert!(o.to_commit().is_empty());
    }

    #[test]
    fn lanes_follow_the_ordering() {
        let p = |o, part, k: Option<&[u8]>| lane(o, "t", part, k);
        assert_eq!(
            p(KafkaOrdering::Partition, 1, Some(b"a")),
            p(KafkaOrdering::Partition, 1, Some(b"b"))
        );
        assert_ne!(
            p(KafkaOrdering::Partition, 1, None),
            p(KafkaOrdering::Partition, 2, None)
        );
        assert_eq!(
            p(KafkaOrdering::Key, 1, Some(b"a")),
            p(KafkaOrdering::Key, 1, Some(b"a"))
        );
        assert_ne!(
            p(KafkaOrdering::Key, 1, Some(b"a")),
            p(KafkaOrdering::Key, 1, Some(b"b"))
        );
        assert_eq!(p(KafkaOrdering::Key, 1, None), None);
        // However many keys, at most KEY_LANES lanes a partition.
        let lanes: std::collections::HashSet<_> = (0..10_000u32)
            .map(|k| p(KafkaOrdering::Key, 1, Some(&k.to_be_bytes()[..])))
            .collect();
        assert!(lanes.len() <= KEY_LANES as usize, "{}", lanes.len());
        assert_eq!(p(KafkaOrdering::None, 1, Some(b"a")), None);
    }

    #[test]
    fn topics_are_plain_names() {
        assert!(validate_topic("orders.eu-1_x").is_ok());
        for bad in ["", ".", "..", "pay.*", "pay.>", "a b", &"x".repeat(250)] {
            let e = validate_topic(bad).expect_err(bad);
            assert!(e.contains("Kafka") || e.contains("topic"), "{e}");
        }
        assert!(
            validate_topic("pay.*")
                .unwrap_err()
                .contains("no wildcards")
        );
    }
}
