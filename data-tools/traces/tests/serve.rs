//! `traces serve` on 127.0.0.1:0 with a store in a temporary directory: OTLP in, Jaeger API
//! and the page out, sampling rules served and reloaded, and every refusal path.

mod support;

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prost::Message;
use support::{eventually_some, now_ns, request, start};
use traces::server::{self, Settings};
use traces::store::SpanStore;
#[tokio::test]
async fn a_trace_sent_over_otlp_is_found_through_the_jaeger_api_and_the_page() {
    let h = start(Settings::default()).await;
    let lib = request("push-lib", 0x42, &[(1, 0, "send", 0, 9_000)]);
    let node = request(
        "push-server",
        0x42,
        &[
            (2, 1, "POST /internal/v1/deliver", 1_000, 7_000),
            (3, 2, "socket write", 6_000, 500),
        ],
    );
    for req in [lib, node] {
        let (status, headers, body) = h
            .client
            .send(
                "POST",
                "/v1/traces",
                &[("content-type", "application/x-protobuf")],
                req.encode_to_vec(),
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert!(
            body.is_empty(),
            "full success: an empty ExportTraceServiceResponse"
        );
    }
    // JSON too, as OTLP/HTTP's JSON encoding.
    let json_body = r#"{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"browser"}}]},
      "scopeSpans":[{"spans":[{"traceId":"42424242424242424242424242424242","spanId":"0404040404040404","parentSpanId":"0303030303030303",
      "name":"receive","startTimeUnixNano":"NOW","endTimeUnixNano":"NOW"}]}]}]}"#
        .replace("NOW", &(now_ns() - 4_000_000_000).to_string());
    let (status, _, _) = h
        .client
        .send(
            "POST",
            "/v1/traces",
            &[("content-type", "application/json")],
            json_body.into_bytes(),
        )
        .await;
    assert_eq!(status, 200);

    let trace_id = "42".repeat(16);
    let trace = eventually_some("the whole trace", async || {
        let (status, v) = h.client.get_json(&format!("/api/traces/{trace_id}")).await;
        (status == 200 && v["data"][0]["spans"].as_array()?.len() == 4).then_some(v)
    })
    .await;
    let spans = trace["data"][0]["spans"].as_array().unwrap();
    let names: Vec<&str> = spans
        .iter()
        .map(|s| s["operationName"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "send",
            "POST /internal/v1/deliver",
            "socket write",
            "receive"
        ]
    );
    let deliver = &spans[1];
    assert_eq!(
        deliver["references"][0]["spanID"],
        "01".repeat(8),
        "parent link kept"
    );
    let pid = deliver["processID"].as_str().unwrap();
    assert_eq!(
        trace["data"][0]["processes"][pid]["serviceName"],
        "push-server"
    );

    let (_, services) = h.client.get_json("/api/services").await;
    assert_eq!(
        services["data"],
        serde_json::json!(["browser", "push-lib", "push-server"])
    );
    let (_, ops) = h
        .client
        .get_json("/api/services/push-server/operations")
        .await;
    assert_eq!(
        ops["data"],
        serde_json::json!(["POST /internal/v1/deliver", "socket write"])
    );

    let (status, found) = h.client.get_json("/api/traces?service=push-server&operation=socket+write&tags=%7B%22user%22%3A%22alice%22%7D&lookback=1h").await;
    assert_eq!(status, 200);
    assert_eq!(found["data"].as_array().unwrap().len(), 1);
    assert_eq!(found["data"][0]["traceID"], trace_id);
    let (_, none) = h
        .client
        .get_json("/api/traces?service=push-server&tags=%7B%22user%22%3A%22bob%22%7D")
        .await;
    assert_eq!(none["data"], serde_json::json!([]));
    let (_, none) = h
        .client
        .get_json("/api/traces?service=push-server&minDuration=1h")
        .await;
    assert_eq!(none["data"], serde_json::json!([]));

    let (status, _, page) = h
        .client
        .send("GET", &format!("/trace/{trace_id}"), &[], vec![])
        .await;
    assert_eq!(status, 200);
    let page = String::from_utf8(page).unwrap();
    assert!(
        page.contains(&format!(
            "class=\"span critical\" data-span-id=\"{}\"",
            "02".repeat(8)
        )),
        "{page}"
    );

    let (status, missing) = h
        .client
        .get_json(&format!("/api/traces/{}", "ab".repeat(16)))
        .await;
    assert_eq!(
        (status, missing["errors"][0]["code"].as_i64()),
        (404, Some(404))
    );
    let (_, _, metrics) = h.client.send("GET", "/metrics", &[], vec![]).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains("traces_spans_accepted_total 4"),
        "{metrics}"
    );
    h.running.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_clear_answers_and_a_full_queue_asks_to_retry() {
    let h = start(Settings {
        max_queue_spans: 2,
        max_body: 4096,
        flush_interval: Duration::from_secs(3600),
        flush_spans: 1_000,
        ..Settings::default()
    })
    .await;
    let proto = [("content-type", "application/x-protobuf")];
    let (status, _, body) = h
        .client
        .send(
            "POST",
            "/v1/traces",
            &[("content-type", "text/plain")],
            b"x".to_vec(),
        )
        .await;
    assert_eq!(status, 415, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = h
        .client
        .send("POST", "/v1/traces", &proto, vec![0xff; 16])
        .await;
    assert_eq!(status, 400);
    assert!(String::from_utf8_lossy(&body).contains("ExportTraceServiceRequest"));
    let (status, _, _) = h
        .client
        .send("POST", "/v1/traces", &proto, vec![0; 5000])
        .await;
    assert_eq!(status, 413);
    let (status, _, _) = h.client.send("POST", "//v1/traces", &proto, vec![]).await;
    assert_eq!(status, 400);

    // A bad span in a good request: partial success names it; the good one is kept.
    let mut req = request("s", 7, &[(1, 0, "good", 0, 10), (2, 0, "bad", 0, 10)]);
    req.resource_spans[0].scope_spans[0].spans[1].trace_id = vec![0; 16];
    let (status, _, body) = h
        .client
        .send("POST", "/v1/traces", &proto, req.encode_to_vec())
        .await;
    assert_eq!(status, 200);
    let answer = ExportTraceServiceResponse::decode(&body[..]).unwrap();
    let partial = answer.partial_success.unwrap();
    assert_eq!(partial.rejected_spans, 1);
    assert!(partial.error_message.contains("\"bad\""));

    // One span queued (the writer waits an hour); two more exceed the bound of 2.
    let req = request("s", 8, &[(1, 0, "a", 0, 10), (2, 0, "b", 0, 10)]);
    let (status, headers, _) = h
        .client
        .send("POST", "/v1/traces", &proto, req.encode_to_vec())
        .await;
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    // Shutdown writes what was queued.
    let addr = h.running.addr;
    h.running.shutdown().await;
    let store = SpanStore::open(h.dir.path().to_str().unwrap()).unwrap();
    assert_eq!(store.trace(&"07".repeat(16)).await.unwrap().len(), 1);
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "stopped listening"
    );
}

#[tokio::test]
async fn sampling_rules_are_served_and_reloaded_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sampling.json");
    let rules = |p: f64| {
        format!(
            r#"{{"service_strategies":[{{"service":"push-server","type":"probabilistic","param":{p},
        "operation_strategies":[{{"operation":"POST /v1/push","type":"probabilistic","param":0.5}}]}}],
        "default_strategy":{{"type":"ratelimiting","param":3}}}}"#
        )
    };
    std::fs::write(&file, rules(0.25)).unwrap();
    let h = start(Settings {
        sampling_file: Some(file.clone()),
        sampling_reload: Duration::from_millis(100),
        ..Settings::default()
    })
    .await;
    let (status, v) = h.client.get_json("/sampling?service=push-server").await;
    assert_eq!(status, 200);
    assert_eq!(v["strategyType"], "PROBABILISTIC");
    assert_eq!(v["probabilisticSampling"]["samplingRate"], 0.25);
    assert_eq!(
        v["operationSampling"]["perOperationStrategies"][0]["operation"],
        "POST /v1/push"
    );
    let (_, v) = h.client.get_json("/api/sampling?service=other").await;
    assert_eq!(v["rateLimitingSampling"]["maxTracesPerSecond"], 3);
    let (status, _, _) = h.client.send("GET", "/sampling", &[], vec![]).await;
    assert_eq!(status, 400);

    std::fs::write(&file, rules(0.75)).unwrap();
    eventually_some("the new rate", async || {
        let (_, v) = h.client.get_json("/sampling?service=push-server").await;
        (v["probabilisticSampling"]["samplingRate"] == 0.75).then_some(())
    })
    .await;
    // A broken file keeps the rules in force.
    std::fs::write(&file, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, v) = h.client.get_json("/sampling?service=push-server").await;
    assert_eq!(v["probabilisticSampling"]["samplingRate"], 0.75);
    h.running.shutdown().await;
}

#[tokio::test]
async fn a_bad_rules_file_stops_the_start_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rules.json");
    std::fs::write(
        &file,
        r#"{"default_strategy":{"type":"probabilistic","param":2}}"#,
    )
    .unwrap();
    let store = SpanStore::open(dir.path().join("store").to_str().unwrap()).unwrap();
    let err = server::start(
        Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            sampling_file: Some(file),
            ..Settings::default()
        },
        store,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("rules.json") && err.contains("param 2"),
        "{err}"
    );
}
