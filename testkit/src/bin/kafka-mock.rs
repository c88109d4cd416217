//! `kafka-mock [--topic NAME:PARTITIONS]...`: librdkafka's mock cluster (a real Kafka protocol
//! peer on a local TCP port, `rdkafka::mocking`) as a process, for tests that are not Rust
//! (the browser end-to-end tests of `clients/js`).
//!
//! Prints the bootstrap servers as its first stdout line, then serves until its standard input
//! closes: a test that dies leaves no cluster behind.

use std::io::{Read, Write};
use std::process::ExitCode;

use testkit::kafka::MockKafka;

fn main() -> ExitCode {
    let mut topics = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--topic", Some(spec)) => match parse_topic(&spec) {
                Some(t) => topics.push(t),
                None => return usage(&format!("bad --topic `{spec}`: expected NAME:PARTITIONS")),
            },
            _ => return usage(&format!("unexpected argument `{arg}`")),
        }
    }
    let cluster = match MockKafka::try_start() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kafka-mock: cannot start the mock cluster: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, partitions) in &topics {
        if let Err(e) = cluster.try_create_topic(name, *partitions) {
            eprintln!("kafka-mock: cannot create topic {name}: {e}");
            return ExitCode::FAILURE;
        }
    }
    println!("{}", cluster.brokers());
    let _ = std::io::stdout().flush();
    // Serve until the parent closes our stdin (or dies, which closes it too).
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    ExitCode::SUCCESS
}

fn parse_topic(spec: &str) -> Option<(String, i32)> {
    let (name, partitions) = spec.rsplit_once(':')?;
    let partitions: i32 = partitions.parse().ok().filter(|p| *p > 0)?;
    (!name.is_empty()).then(|| (name.to_owned(), partitions))
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("kafka-mock: {problem}\nusage: kafka-mock [--topic NAME:PARTITIONS]...");
    ExitCode::from(2)
}
