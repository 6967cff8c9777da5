//! Reliability soak, one per broker: 20 000 events published while they are
//! consumed; the connector is killed with SIGKILL three times (and started
//! again at once) and the broker restarts once, while 10 % of first attempts
//! are answered 500. Nothing may be lost; duplicates (a call whose ack died
//! with a killed connector) are printed, never failed on. Each is bounded to
//! 3 minutes.
//!
//! The broker restart: nats-server is stopped and started on the same store;
//! the RabbitMQ node is shared by the whole test run, so the broker closes
//! the connector's connection instead; librdkafka's mock cluster cannot
//! restart, so the Kafka soak has the kills only.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::connector::{func, stack_yaml, wait_ready, write_stack};
use crate::support::{ChildGuard, KafkaMock, NatsServer, RabbitMq, Vhost, ebb_command, free_port};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use nix::sys::signal::Signal;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::time::Instant;

const EVENTS: usize = 20_000;
const TOPIC: &str = "soak";
/// The whole soak, publishing included.
const BOUND: Duration = Duration::from_secs(180);
/// Events published at once.
const BATCH: usize = 200;

/// The function: counts each event's successful calls; answers 500 to the
/// first attempt of every tenth event.
#[derive(Default)]
struct Function {
    ok: Mutex<HashMap<usize, u32>>,
    calls: Mutex<u64>,
}

async fn call(State(f): State<Arc<Function>>, headers: HeaderMap, body: String) -> StatusCode {
    let Some(n) = body
        .strip_prefix("e-")
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return StatusCode::BAD_REQUEST;
    };
    let attempt = headers
        .get("ebb-attempt")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(1);
    *f.calls.lock().unwrap() += 1;
    if attempt == 1 && n % 10 == 0 {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    *f.ok.lock().unwrap().entry(n).or_default() += 1;
    StatusCode::OK
}

impl Function {
    async fn start() -> (Arc<Self>, String) {
        let f = Arc::new(Self::default());
        let app = axum::Router::new()
            .route("/", axum::routing::post(call))
            .with_state(f.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (f, url)
    }

    fn delivered(&self) -> usize {
        self.ok.lock().unwrap().len()
    }
}

/// How events get in, and how the broker "restarts".
enum Bus {
    Nats {
        server: NatsServer,
        js: async_nats::jetstream::Context,
    },
    Amqp {
        vhost: Vhost,
        channel: Channel,
        _conn: lapin::Connection,
    },
    Kafka {
        mock: KafkaMock,
        producer: FutureProducer,
    },
}

impl Bus {
    fn connector_args(&self) -> Vec<String> {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Self::Nats { server, .. } => v(&["nats", "--url", server.url()]),
            Self::Amqp { vhost, .. } => v(&["amqp", "--url", vhost.url()]),
            Self::Kafka { mock, .. } => {
                let mut a = v(&["kafka", "--url"]);
                a.push(mock.bootstrap_servers());
                a.extend(v(&["--offset-reset", "earliest"]));
                a
            }
        }
    }

    /// Publishes event `n`; `false` if the broker did not take it (tried again).
    async fn publish(&self, n: usize) -> bool {
        let body = format!("e-{n}");
        match self {
            Self::Nats { js, .. } => match js.publish(TOPIC, body.into()).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            },
            Self::Amqp { channel, .. } => {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(format!("e-{n}").into());
                let sent = channel
                    .basic_publish(
                        "ebb".into(),
                        TOPIC.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        body.as_bytes(),
                        props,
                    )
                    .await;
                match sent {
                    Ok(confirm) => confirm.await.is_ok_and(|c| c.is_ack()),
                    Err(_) => false,
                }
            }
            Self::Kafka { producer, .. } => {
                let record = FutureRecord::to(TOPIC).key(&body).payload(&body);
                producer.send(record, Duration::from_secs(5)).await.is_ok()
            }
        }
    }

    async fn restart(&mut self) -> &'static str {
        match self {
            Self::Nats { server, .. } => {
                server.restart().await;
                "nats-server restarted"
            }
            Self::Amqp { vhost, .. } => {
                vhost.close_connections("ebb-connector-amqp").await;
                "the broker closed the connector's connection"
            }
            Self::Kafka { .. } => "no broker restart (mock cluster)",
        }
    }
}

fn spawn_connector(bus: &Bus, stack: &std::path::Path, admin: &str) -> ChildGuard {
    let mut cmd = ebb_command();
    cmd.arg("connector")
        .args(bus.connector_args())
        .arg("--functions")
        .arg(stack)
        .args(["--admin-addr", admin])
        .args(["--retry-base-delay", "50ms", "--retry-max-delay", "500ms"])
        .args(["--drain-timeout", "2s"]);
    ChildGuard::spawn("connector", &mut cmd)
}

async fn soak(mut bus: Bus) {
    let started = Instant::now();
    let (function, url) = Function::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let stack = dir.path().join("stack.yaml");
    write_stack(
        &stack,
        &stack_yaml(&[func("soak", &url, &[TOPIC])
            .set("max-inflight", "64")
            .set("kafka-ordering", "none")]),
    );
    let admin = format!("127.0.0.1:{}", free_port());
    let mut connector = spawn_connector(&bus, &stack, &admin);
    wait_ready(&mut connector, &admin, Duration::from_secs(60)).await;

    let mut published = 0;
    let mut kills = 0;
    let mut restarted = None;
    let mut last_progress = (0, Instant::now());
    loop {
        assert!(
            started.elapsed() < BOUND,
            "the soak took longer than {BOUND:?}: {} of {EVENTS} delivered",
            function.delivered()
        );
        // Publish the next batch (each event until the broker takes it).
        if published < EVENTS {
            let end = (published + BATCH).min(EVENTS);
            let sent = futures::future::join_all((published..end).map(|n| bus.publish(n))).await;
            for (n, ok) in (published..end).zip(sent) {
                while !ok && !bus.publish(n).await {
                    assert!(started.elapsed() < BOUND, "event {n} was never published");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            published = end;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let delivered = function.delivered();
        if delivered == EVENTS && kills == 3 {
            break;
        }
        if delivered != last_progress.0 {
            last_progress = (delivered, Instant::now());
        }
        // Chaos while events flow: at a quarter, half and three quarters
        // published; the broker restarts between the second and third kill.
        if kills < 3 && published >= EVENTS * (kills + 1) / 4 {
            connector.signal(Signal::SIGKILL);
            let _ = connector.wait(Duration::from_secs(10)).await;
            kills += 1;
            connector = spawn_connector(&bus, &stack, &admin);
            if kills == 2 && restarted.is_none() {
                restarted = Some(bus.restart().await);
            }
        }
    }
    let ok = function.ok.lock().unwrap().clone();
    let lost: Vec<usize> = (0..EVENTS).filter(|n| !ok.contains_key(n)).collect();
    let duplicates: u32 = ok.values().map(|c| c - 1).sum();
    let calls = *function.calls.lock().unwrap();
    println!(
        "soak: {EVENTS} events, {kills} kill -9 of the connector, {}, 10 % of first attempts 500: \
         lost {}, duplicates {duplicates}, calls {calls}, {:.1} s",
        restarted.unwrap_or("no broker restart"),
        lost.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(lost.is_empty(), "lost: {:?}", &lost[..lost.len().min(20)]);
    assert_eq!(kills, 3);
    let status = connector.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "connector exited with {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_soak_loses_nothing() {
    let server = NatsServer::start_local().await;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(server.url())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    soak(Bus::Nats { server, js }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_soak_loses_nothing() {
    let vhost = RabbitMq::shared().await.vhost().await;
    let (conn, channel) = vhost.channel(true).await;
    soak(Bus::Amqp {
        vhost,
        channel,
        _conn: conn,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_soak_loses_nothing() {
    let mock = KafkaMock::new();
    mock.create_topic(TOPIC, 4);
    let producer = ClientConfig::new()
        .set("bootstrap.servers", mock.bootstrap_servers())
        .set("linger.ms", "5")
        .create()
        .expect("producer");
    soak(Bus::Kafka { mock, producer }).await;
}
