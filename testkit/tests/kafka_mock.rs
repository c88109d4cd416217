//! The `kafka-mock` binary as the browser tests of clients/js use it: it prints bootstrap
//! servers, serves the topics it was given, and exits once its standard input closes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(30);

fn start(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kafka-mock"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kafka-mock starts")
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().expect("kafka-mock can be waited for") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("kafka-mock still running {WAIT:?} after its stdin closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serves_the_given_topics_until_stdin_closes() {
    let mut child = start(&["--topic", "receipts:3"]);
    let mut brokers = String::new();
    BufReader::new(child.stdout.take().expect("stdout is piped"))
        .read_line(&mut brokers)
        .expect("kafka-mock prints a line");
    let brokers = brokers.trim();
    assert!(
        brokers.starts_with("127.0.0.1:") || brokers.starts_with("localhost:"),
        "first line is the bootstrap servers, got {brokers:?}"
    );

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "20000")
        .create()
        .expect("a producer for the mock cluster");
    let metadata = producer
        .client()
        .fetch_metadata(Some("receipts"), WAIT)
        .expect("metadata of the given topic");
    let partitions = metadata.topics()[0].partitions().len();
    assert_eq!(partitions, 3, "the topic has the partitions asked for");
    producer
        .send(
            BaseRecord::to("receipts")
                .partition(2)
                .key("u1")
                .payload("x"),
        )
        .expect("the record is queued");
    producer.flush(WAIT).expect("the broker acknowledges it");

    drop(child.stdin.take());
    assert!(
        wait_exit(&mut child).success(),
        "closing stdin stops it cleanly"
    );
}

#[test]
fn a_bad_topic_argument_is_refused_with_usage() {
    let mut child = start(&["--topic", "receipts:zero"]);
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kafka-mock exits");
    assert_eq!(out.status.code(), Some(2), "usage errors exit with 2");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad --topic `receipts:zero`") && stderr.contains("usage:"),
        "says what is wrong and how to call it: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "prints no brokers when it does not start"
    );
}
