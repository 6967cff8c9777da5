//! The Kafka scaler: a function's backlog is the lag of its consumer group
//! (see [`FunctionSpec::consumer_group_name`]) summed over every partition of
//! its topics: high watermark − committed offset. A partition the group never
//! committed on counts from where the group would start reading
//! ([`OffsetReset`]), never as −1.
//!
//! The same read tells how many messages the group finished
//! ([`Reading::finished`]): its committed offsets summed over the partitions
//! that have one (a partition without a commit contributes nothing). The sum
//! grows as the function commits, but it also jumps when a partition gets
//! its first commit (a partition added to a topic, or one the group starts
//! reading at its end) and falls when a commit is moved back or expires, so
//! the scaler remembers each group's commits of its previous read and
//! reports `None` ("unknown") for a read where a partition gained, lost or
//! moved back its commit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_model::FunctionSpec;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

/// Why a lag could not be read. The policy treats every error as "unknown"
/// (hold), never as 0 and never as "scale to max".
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum KafkaScalerError {
    #[error("cannot create a Kafka client for {bootstrap}: {message}")]
    Client { bootstrap: String, message: String },
    #[error("no Kafka broker of {bootstrap} answers: {message}")]
    Unreachable { bootstrap: String, message: String },
    #[error("function {function} has no topics: there is no Kafka lag to read")]
    NoTopics { function: String },
    #[error("topic {topic} not found: is it created, and spelled as in the function's `topics`?")]
    #[strum(serialize = "missing_topic")]
    NoTopic { topic: String },
    #[error("cannot read the metadata of topic {topic}: {message}")]
    Metadata { topic: String, message: String },
    #[error("cannot read the committed offsets of consumer group {group}: {message}")]
    Coordinator { group: String, message: String },
    #[error("cannot read the watermarks of {topic}[{partition}]: {message}")]
    Watermarks {
        topic: String,
        partition: i32,
        message: String,
    },
    #[error("Kafka did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Kafka read task failed: {0}")]
    Task(String),
}

impl KafkaScalerError {
    pub fn metric_label(&self) -> &'static str {
        self.into()
    }
}

/// Where a group without a committed offset on a partition starts reading
/// (`auto.offset.reset`). ebb's connector uses [`Latest`](Self::Latest) for a
/// new group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// At the high watermark: such a partition has no lag.
    #[default]
    Latest,
    /// At the low watermark: everything still retained is lag.
    Earliest,
}

/// One read of a function's consumer group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// Lag summed over all partitions of the function's topics.
    pub lag: f64,
    /// Partitions of the function's topics: more replicas than this would idle.
    pub partitions: u32,
    /// Committed offsets summed over the partitions that have one: messages
    /// the group finished, a counter that grows as it commits. `None` when
    /// it cannot be compared with the previous read of the group: a
    /// partition gained or lost its commit, or its commit moved back.
    pub finished: Option<u64>,
}

/// Committed offsets of one group by topic and partition.
type Commits = HashMap<(String, i32), i64>;

/// Reads consumer-group lags. Cheap to clone; keeps one client per group
/// (committed offsets are fetched for the client's own `group.id`).
#[derive(Clone)]
pub struct KafkaScaler {
    config: ClientConfig,
    bootstrap: String,
    reset: OffsetReset,
    timeout: Duration,
    consumers: Arc<Mutex<HashMap<String, Arc<BaseConsumer>>>>,
    /// Each group's commits at its previous read.
    commits: Arc<Mutex<HashMap<String, Commits>>>,
}

impl KafkaScaler {
    /// A scaler for the cluster at `bootstrap_servers` (`host:port,…`).
    /// `timeout` bounds one [`read`](Self::read).
    pub fn new(bootstrap_servers: &str, reset: OffsetReset, timeout: Duration) -> Self {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", bootstrap_servers);
        Self::with_config(config, reset, timeout)
    }

    /// Like [`new`](Self::new), from a client configuration (security
    /// settings…) holding at least `bootstrap.servers`. `group.id`, commit
    /// and client-id settings are the scaler's.
    pub fn with_config(config: ClientConfig, reset: OffsetReset, timeout: Duration) -> Self {
        let bootstrap = config
            .get("bootstrap.servers")
            .unwrap_or_default()
            .to_string();
        Self {
            config,
            bootstrap,
            reset,
            timeout,
            consumers: Arc::default(),
            commits: Arc::default(),
        }
    }

    /// Keeps the clients and remembered commits of the groups `keep`
    /// accepts and drops the others (groups of deleted functions), so
    /// neither consumers nor their broker connections pile up.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|group, _| keep(group));
        self.commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|group, _| keep(group));
    }

    /// The lag of `f`'s consumer group.
    pub async fn backlog(&self, f: &FunctionSpec) -> Result<f64, KafkaScalerError> {
        self.read(f).await.map(|r| r.lag)
    }

    /// The lag of `f`'s consumer group and the partition count of its topics.
    pub async fn read(&self, f: &FunctionSpec) -> Result<Reading, KafkaScalerError> {
        if f.topics.is_empty() {
            return Err(KafkaScalerError::NoTopics {
                function: f.name.clone(),
            });
        }
        let group = f.consumer_group_name();
        let consumer = self.consumer(&group)?;
        let topics = f.topics.clone();
        let (reset, timeout) = (self.reset, self.timeout);
        let bootstrap = self.bootstrap.clone();
        let task = tokio::task::spawn_blocking(move || {
            let read = read(&consumer, &bootstrap, &group, &topics, reset, timeout);
            (group, read)
        });
        let (group, (mut reading, commits)) = match tokio::time::timeout(self.timeout, task).await {
            Err(_) => return Err(KafkaScalerError::Timeout(self.timeout)),
            Ok(Err(join)) => return Err(KafkaScalerError::Task(join.to_string())),
            Ok(Ok((group, read))) => (group, read?),
        };
        let previous = self
            .commits
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(group, commits.clone());
        if previous.is_some_and(|p| !comparable(&p, &commits)) {
            reading.finished = None;
        }
        Ok(reading)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<BaseConsumer>>> {
        self.consumers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn consumer(&self, group: &str) -> Result<Arc<BaseConsumer>, KafkaScalerError> {
        if let Some(consumer) = self.lock().get(group) {
            return Ok(consumer.clone());
        }
        // Never subscribes or assigns: it only asks the coordinator for the
        // group's committed offsets, so it never joins the group.
        let consumer: BaseConsumer = self
            .config
            .clone()
            .set("group.id", group)
            .set("client.id", "ebb-autoscaler")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("allow.auto.create.topics", "false")
            .create()
            .map_err(|e| KafkaScalerError::Client {
                bootstrap: self.bootstrap.clone(),
                message: e.to_string(),
            })?;
        let consumer = Arc::new(consumer);
        Ok(self
            .lock()
            .entry(group.to_string())
            .or_insert(consumer)
            .clone())
    }
}

impl super::QueueScaler for KafkaScaler {
    const NAME: &'static str = "kafka";

    async fn read_backlog(&self, f: &FunctionSpec) -> Result<super::Reading, super::ReadError> {
        Ok(self.read(f).await?.into())
    }

    fn retain_backlogs<W>(&self, live: &[(&FunctionSpec, Option<&W>)]) {
        let groups: std::collections::HashSet<String> =
            live.iter().map(|(f, _)| f.consumer_group_name()).collect();
        KafkaScaler::retain(self, |group| groups.contains(group));
    }
}

impl From<Reading> for super::Reading {
    fn from(r: Reading) -> Self {
        Self {
            value: r.lag,
            finished: r.finished,
            position: None,
            cap: Some(r.partitions),
            // Lag counts every message not committed, in flight included.
            in_flight_unseen: false,
        }
    }
}

fn is_timeout(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::OperationTimedOut)
}

fn is_unreachable(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::Resolve
        )
    )
}

/// Whether the commits summed now count on from those summed before: the
/// same partitions have a commit, none moved back.
fn comparable(before: &Commits, now: &Commits) -> bool {
    before.len() == now.len()
        && now
            .iter()
            .all(|(tp, offset)| before.get(tp).is_some_and(|b| b <= offset))
}

/// Blocking: metadata, committed offsets, then watermarks partition by
/// partition. Also returns the committed offsets it summed.
fn read(
    consumer: &BaseConsumer,
    bootstrap: &str,
    group: &str,
    topics: &[String],
    reset: OffsetReset,
    timeout: Duration,
) -> Result<(Reading, Commits), KafkaScalerError> {
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| {
            if is_timeout(&e) {
                KafkaScalerError::Timeout(timeout)
            } else if is_unreachable(&e) {
                KafkaScalerError::Unreachable {
                    bootstrap: bootstrap.to_string(),
                    message: e.to_string(),
                }
            } else {
                KafkaScalerError::Metadata {
                    topic: topic.clone(),
                    message: e.to_string(),
                }
            }
        })?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(KafkaScalerError::NoTopic {
                topic: topic.clone(),
            });
        };
        match t.error().map(RDKafkaErrorCode::from) {
            None => {}
            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => {
                return Err(KafkaScalerError::NoTopic {
                    topic: topic.clone(),
                });
            }
            Some(code) => {
                return Err(KafkaScalerError::Metadata {
                    topic: topic.clone(),
                    message: code.to_string(),
                });
            }
        }
        if t.partitions().is_empty() {
            return Err(KafkaScalerError::NoTopic {
                topic: topic.clone(),
            });
        }
        for p in t.partitions() {
            tpl.add_partition(topic, p.id());
        }
    }
    let partitions = u32::try_from(tpl.count()).unwrap_or(u32::MAX);

    let coordinator = |message: String| KafkaScalerError::Coordinator {
        group: group.to_string(),
        message,
    };
    let committed = consumer.committed_offsets(tpl, timeout).map_err(|e| {
        if is_timeout(&e) {
            KafkaScalerError::Timeout(timeout)
        } else {
            coordinator(e.to_string())
        }
    })?;

    let mut lag = 0u64;
    let mut commits = Commits::new();
    let mut finished = Some(0u64);
    for elem in committed.elements() {
        elem.error()
            .map_err(|e| coordinator(format!("{}[{}]: {e}", elem.topic(), elem.partition())))?;
        if let Offset::Offset(n) = elem.offset()
            && n >= 0
        {
            commits.insert((elem.topic().to_string(), elem.partition()), n);
            finished = finished.and_then(|f| f.checked_add(n.unsigned_abs()));
        }
        let (low, high) = consumer
            .fetch_watermarks(elem.topic(), elem.partition(), timeout)
            .map_err(|e| {
                if is_timeout(&e) {
                    KafkaScalerError::Timeout(timeout)
                } else {
                    KafkaScalerError::Watermarks {
                        topic: elem.topic().to_string(),
                        partition: elem.partition(),
                        message: e.to_string(),
                    }
                }
            })?;
        lag += partition_lag(elem.offset(), low, high, reset);
    }
    Ok((
        Reading {
            lag: lag as f64,
            partitions,
            finished,
        },
        commits,
    ))
}

/// The lag of one partition. Without a usable committed offset (none, or
/// below the low watermark, which the consumer would reset from too) the
/// group starts where `reset` says.
fn partition_lag(committed: Offset, low: i64, high: i64, reset: OffsetReset) -> u64 {
    let start = match committed {
        Offset::Offset(n) if n >= low => n,
        _ => match reset {
            OffsetReset::Latest => high,
            OffsetReset::Earliest => low,
        },
    };
    u64::try_from(high.saturating_sub(start)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retain_drops_the_commits_of_groups_no_longer_served() {
        let k = KafkaScaler::new("127.0.0.1:9", OffsetReset::Latest, Duration::from_secs(1));
        for g in ["ebb-default-a", "ebb-default-b"] {
            k.commits
                .lock()
                .unwrap()
                .insert(g.to_string(), Commits::new());
        }
        k.retain(|g| g == "ebb-default-a");
        let left: Vec<String> = k.commits.lock().unwrap().keys().cloned().collect();
        assert_eq!(left, ["ebb-default-a"]);
    }

    #[test]
    fn lag_of_one_partition() {
        use OffsetReset::{Earliest, Latest};
        assert_eq!(partition_lag(Offset::Offset(4), 0, 10, Latest), 6);
        assert_eq!(partition_lag(Offset::Offset(4), 0, 10, Earliest), 6);
        assert_eq!(partition_lag(Offset::Invalid, 2, 10, Latest), 0);
        assert_eq!(partition_lag(Offset::Invalid, 2, 10, Earliest), 8);
        // Below the low watermark (retention deleted it): reset.
        assert_eq!(partition_lag(Offset::Offset(1), 2, 10, Earliest), 8);
        assert_eq!(partition_lag(Offset::Offset(1), 2, 10, Latest), 0);
        // Never negative.
        assert_eq!(partition_lag(Offset::Offset(12), 0, 10, Latest), 0);
    }

    #[test]
    fn commits_compare_only_on_the_same_partitions_moving_forward() {
        let commits = |entries: &[(&str, i32, i64)]| -> Commits {
            entries
                .iter()
                .map(|&(t, p, o)| ((t.to_string(), p), o))
                .collect()
        };
        let before = commits(&[("a", 0, 4), ("a", 1, 2)]);
        assert!(comparable(&before, &before));
        assert!(comparable(&before, &commits(&[("a", 0, 9), ("a", 1, 2)])));
        // A partition's first commit (added, or read from its end): a jump.
        assert!(!comparable(
            &before,
            &commits(&[("a", 0, 4), ("a", 1, 2), ("a", 2, 1000)])
        ));
        // A commit gone, or moved back.
        assert!(!comparable(&before, &commits(&[("a", 0, 9)])));
        assert!(!comparable(&before, &commits(&[("a", 0, 3), ("a", 1, 9)])));
        // The same count of partitions, not the same partitions.
        assert!(!comparable(&before, &commits(&[("a", 0, 4), ("b", 1, 2)])));
    }
}
