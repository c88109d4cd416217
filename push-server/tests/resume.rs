//! Resume from the history (`?since=`, `Last-Event-ID`), gaps, and delivery receipts, with
//! real clients on port 0 against the embedded (memory) history.

mod common;

use common::*;
use serde_json::{json, Value};

fn id(v: &Value) -> u64 {
    v["id"].as_u64().unwrap_or_else(|| panic!("no id in {v}"))
}

async fn ws_since(server: &push_server::Server, token: &str, since: u64) -> Ws {
    let (ws, resp) = ws_connect_with(server, &format!("?token={token}&since={since}"), &[])
        .await
        .expect("resume handshake");
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn websocket_resume_gets_exactly_the_messages_after_since_then_live_ones() {
    let server = start(config()).await;
    let t = token(&server, "ada", Some("phone"));
    let mut ws = ws_connect(&server, &t).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let mut seen = Vec::new();
    for i in 0..3 {
        push(&server, "ada", &format!("m{i}")).await;
        seen.push(id(&ws_next_json(&mut ws).await));
    }
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "{seen:?}");
    ws.close(None).await.unwrap();
    drop(ws);
    // Sent while the device is away: kept, not lost.
    for i in 3..6 {
        let r = push(&server, "ada", &format!("m{i}")).await;
        assert_eq!(r["stored"], true, "{r}");
    }
    // The client saw m0 and m1 only (m2 was in flight when it dropped).
    let mut ws = ws_since(&server, &t, seen[1]).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let mut got = Vec::new();
    for _ in 0..4 {
        let m = ws_next_json(&mut ws).await;
        assert_eq!(m["type"], "message");
        got.push((id(&m), m["data"].as_str().unwrap().to_owned()));
    }
    let want: Vec<(u64, String)> = (2..6).map(|i| (seen[0] + i, format!("m{i}"))).collect();
    assert_eq!(got, want);
    // Then live messages, continuing the sequence.
    push(&server, "ada", "live").await;
    let m = ws_next_json(&mut ws).await;
    assert_eq!((id(&m), m["data"].as_str()), (seen[0] + 6, Some("live")));
    assert!(metric(&server, r#"push_resumes_total{result="complete"}"#).await >= 1.0);
}

/// A client that rotates its connection over and over while messages keep coming, each time
/// resuming from the last ID it saw on the old connection, receives every message exactly
/// once and in order: nothing is lost or repeated at the seams.
#[tokio::test]
async fn no_loss_and_no_duplicate_at_the_seams_while_pushes_continue() {
    let server = start(config()).await;
    let t = token(&server, "bo", Some("phone"));
    const N: usize = 400;
    let admin = server.admin_addr();
    let pusher = tokio::spawn(async move {
        let mut ids = Vec::with_capacity(N);
        for i in 0..N {
            let r = http(admin, "POST", "/v1/push/bo", &[], format!("{i}").as_bytes()).await;
            assert_eq!(r.status, 200, "{}", r.body);
            ids.push(r.json()["id"].as_u64().unwrap());
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        ids
    });
    let mut ws = ws_connect(&server, &t).await;
    ws_next_json(&mut ws).await;
    let mut received: Vec<(u64, String)> = Vec::new();
    let mut rotations = 0;
    while received.len() < N {
        let m = ws_next_json(&mut ws).await;
        assert_eq!(m["type"], "message", "{m}");
        received.push((id(&m), m["data"].as_str().unwrap().to_owned()));
        if received.len() % 37 == 0 {
            // Rotate like a well-behaved client: open the new connection from the last ID
            // seen, then close the old one (whatever it still had is in the new backlog).
            let last = received.last().unwrap().0;
            let mut new = ws_since(&server, &t, last).await;
            assert_eq!(ws_next_json(&mut new).await["type"], "hello");
            ws.close(None).await.unwrap();
            ws = new;
            rotations += 1;
        }
    }
    let pushed = pusher.await.unwrap();
    let got_ids: Vec<u64> = received.iter().map(|(i, _)| *i).collect();
    assert_eq!(got_ids, pushed, "every message once, in order");
    let data: Vec<String> = received.into_iter().map(|(_, d)| d).collect();
    assert_eq!(data, (0..N).map(|i| i.to_string()).collect::<Vec<_>>());
    assert!(rotations >= 10);
}

#[tokio::test]
async fn a_gap_is_reported_when_the_history_no_longer_covers_the_resume_point() {
    let mut cfg = config();
    cfg.history_messages = 3;
    let server = start(cfg).await;
    let t = token(&server, "cy", None);
    let mut ws = ws_connect(&server, &t).await;
    ws_next_json(&mut ws).await;
    push(&server, "cy", "first").await;
    let first = id(&ws_next_json(&mut ws).await);
    drop(ws);
    for i in 0..6 {
        push(&server, "cy", &format!("away {i}")).await;
    }
    // Kept: the last three. The client saw `first`; the three after it are gone.
    let mut ws = ws_since(&server, &t, first).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let gap = ws_next_json(&mut ws).await;
    assert_eq!(
        gap,
        json!({"type": "gap", "after": first, "oldest": first + 4})
    );
    for i in 3..6 {
        let m = ws_next_json(&mut ws).await;
        assert_eq!(
            (id(&m), m["data"].as_str().unwrap()),
            (first + 1 + i, format!("away {i}").as_str())
        );
    }
    assert!(metric(&server, r#"push_resumes_total{result="gap"}"#).await >= 1.0);
}

#[tokio::test]
async fn sse_resumes_from_last_event_id() {
    let server = start(config()).await;
    let t = token(&server, "di", None);
    let mut sse = sse_connect(&server, &t).await;
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
    push(&server, "di", "one").await;
    let one = sse.next_event().await.unwrap();
    let last: u64 = one.id.as_deref().unwrap().parse().unwrap();
    drop(sse);
    push(&server, "di", "two").await;
    push(&server, "di", "three").await;
    // What a browser's EventSource sends on its own reconnect. The URL's `since` (from the
    // first connect) loses to the header.
    let auth = format!("Bearer {t}");
    let last_s = last.to_string();
    let mut sse = sse_connect_raw(
        server.client_addr(),
        "/sse?since=1",
        &[("Authorization", &auth), ("Last-Event-ID", &last_s)],
    )
    .await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
    for (n, data) in [(1, "two"), (2, "three")] {
        let e = sse.next_event().await.unwrap();
        assert_eq!(e.event, "message");
        assert_eq!(e.data, data);
        assert_eq!(e.id, Some((last + n).to_string()));
    }
}

/// A message's `traceparent` (docs/protocol.md) reaches SSE clients as a `traceparent:`
/// field, and is kept in the history: a replay after resume carries it, over WebSocket and
/// SSE alike. A message pushed without one shows none, live or replayed.
#[tokio::test]
async fn the_traceparent_reaches_sse_clients_and_replays_after_resume() {
    let server = start(config()).await;
    let want = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let t = token(&server, "tia", None);
    let mut sse = sse_connect(&server, &t).await;
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
    let r = http(
        server.admin_addr(),
        "POST",
        "/v1/push/tia",
        &[("traceparent", want)],
        b"traced",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    push(&server, "tia", "plain").await;
    let seen = |e: &Event| (e.data.clone(), e.traceparent.clone());
    let live = [
        sse.next_event().await.unwrap(),
        sse.next_event().await.unwrap(),
    ];
    let want_seen = [
        ("traced".to_owned(), Some(want.to_owned())),
        ("plain".to_owned(), None),
    ];
    assert_eq!(live.each_ref().map(seen), want_seen, "live over SSE");
    drop(sse);

    // Replayed from the history (since=0: everything kept).
    let mut ws = ws_since(&server, &t, 0).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    let traced = ws_next_json(&mut ws).await;
    assert_eq!(traced["data"], "traced", "{traced}");
    assert_eq!(traced["traceparent"], want, "{traced}");
    let plain = ws_next_json(&mut ws).await;
    assert_eq!(plain["data"], "plain", "{plain}");
    assert!(plain.get("traceparent").is_none(), "{plain}");

    let auth = format!("Bearer {t}");
    let mut sse = sse_connect_raw(
        server.client_addr(),
        "/sse?since=0",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(sse.status, 200, "{}", sse.head);
    assert_eq!(sse.next_event().await.unwrap().event, "hello");
    let replayed = [
        sse.next_event().await.unwrap(),
        sse.next_event().await.unwrap(),
    ];
    assert_eq!(
        replayed.each_ref().map(seen),
        want_seen,
        "replayed over SSE"
    );
}

#[tokio::test]
async fn messages_for_one_device_are_not_resumed_on_another() {
    let mut cfg = config();
    cfg.admin_token = Some("shared-secret-0123456789".into());
    let server = start(cfg).await;
    let batch = json!([
        {"user": "ed", "device": "watch", "data": "for the watch"},
        {"user": "ed", "data": "for every device"}
    ]);
    let r = http(
        server.admin_addr(),
        "POST",
        "/internal/v1/deliver",
        &[("Authorization", "Bearer shared-secret-0123456789")],
        batch.to_string().as_bytes(),
    )
    .await;
    let outcomes: Vec<String> = r.json()["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes, ["stored", "stored"]);
    // A new phone asks for everything kept (since=0): it gets only what was for it.
    let mut phone = ws_since(&server, &token(&server, "ed", Some("phone")), 0).await;
    ws_next_json(&mut phone).await;
    assert_eq!(ws_next_json(&mut phone).await["data"], "for every device");
    let mut watch = ws_since(&server, &token(&server, "ed", Some("watch")), 0).await;
    ws_next_json(&mut watch).await;
    assert_eq!(ws_next_json(&mut watch).await["data"], "for the watch");
    assert_eq!(ws_next_json(&mut watch).await["data"], "for every device");
}

#[tokio::test]
async fn a_resume_point_that_is_not_an_id_is_refused() {
    let server = start(config()).await;
    let t = token(&server, "fay", None);
    let err = ws_connect_with(&server, &format!("?token={t}&since=yesterday"), &[])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("400"), "{err}");
    let auth = format!("Bearer {t}");
    let sse = sse_connect_raw(
        server.client_addr(),
        "/sse",
        &[("Authorization", &auth), ("Last-Event-ID", "-3")],
    )
    .await;
    assert_eq!(sse.status, 400);
}

#[tokio::test]
async fn a_websocket_ack_answers_a_push_that_waits_for_its_receipt() {
    let server = start(config()).await;
    let mut ws = ws_connect(&server, &token(&server, "gus", Some("phone"))).await;
    ws_next_json(&mut ws).await;
    let admin = server.admin_addr();
    let waiting = tokio::spawn(async move {
        http(
            admin,
            "POST",
            "/v1/push/gus?wait_receipt=5s",
            &[],
            b"ping me",
        )
        .await
    });
    let m = ws_next_json(&mut ws).await;
    assert_eq!(m["data"], "ping me");
    ws_send_json(&mut ws, json!({"type": "ack", "id": m["id"]})).await;
    let r = waiting.await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let body = r.json();
    let receipt = &body["receipt"];
    assert_eq!(receipt["id"], m["id"]);
    assert_eq!(receipt["user"], "gus");
    assert_eq!(receipt["device"], "phone");
    assert_eq!(receipt["transport"], "ws");
    assert!(receipt["acked_at_ms"].as_u64() >= receipt["sent_at_ms"].as_u64());
    assert!(metric(&server, r#"push_receipts_total{transport="ws"}"#).await >= 1.0);

    // Nobody acknowledges: the push answers when the wait is over, without a receipt.
    let r = http(
        admin,
        "POST",
        "/v1/push/gus?wait_receipt_ms=300",
        &[],
        b"ignored",
    )
    .await;
    let body = r.json();
    assert_eq!(body["delivered"], 1);
    assert_eq!(body["receipt"], Value::Null);
    let r = http(admin, "POST", "/v1/push/gus?wait_receipt=2h", &[], b"x").await;
    assert_eq!(r.status, 400, "{}", r.body);
}

#[tokio::test]
async fn sse_clients_acknowledge_with_post_ack() {
    let server = start(config()).await;
    let t = token(&server, "hal", Some("tv"));
    let mut sse = sse_connect(&server, &t).await;
    sse.next_event().await.unwrap();
    let admin = server.admin_addr();
    let waiting = tokio::spawn(async move {
        http(
            admin,
            "POST",
            "/v1/push/hal?wait_receipt=5s",
            &[],
            b"watch this",
        )
        .await
    });
    let e = sse.next_event().await.unwrap();
    let mid = e.id.unwrap();
    let client = server.client_addr();
    let auth = format!("Bearer {t}");
    let r = http(
        client,
        "POST",
        &format!("/ack?id={mid}"),
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.json()["accepted"], 1);
    let body = waiting.await.unwrap().json();
    assert_eq!(body["receipt"]["transport"], "sse");
    assert_eq!(body["receipt"]["device"], "tv");
    assert_eq!(body["receipt"]["id"].as_u64().unwrap().to_string(), mid);

    // Bad calls get clear answers.
    let r = http(client, "POST", "/ack?id=1", &[], b"").await;
    assert_eq!(r.status, 401);
    let r = http(
        client,
        "POST",
        "/ack?id=soon",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (400, Some("bad_ack"))
    );
    let r = http(client, "GET", "/ack?id=1", &[("Authorization", &auth)], b"").await;
    assert_eq!(r.status, 405);
    // An ID that was never sent yields no receipt, and is counted.
    let r = http(
        client,
        "POST",
        "/ack?id=7",
        &[("Authorization", &auth)],
        b"",
    )
    .await;
    assert_eq!(r.status, 202);
    eventually("the unknown ID to be counted", || async {
        metric(
            &server,
            r#"push_receipts_dropped_total{reason="not_in_history"}"#,
        )
        .await
            >= 1.0
    })
    .await;
}

#[tokio::test]
async fn the_history_of_a_user_can_be_read_on_the_admin_api() {
    let server = start(config()).await;
    let a = push(&server, "ivy", "one").await;
    push(&server, "ivy", "two").await;
    let first = a["id"].as_u64().unwrap();
    let r = http(
        server.admin_addr(),
        "GET",
        &format!("/v1/history/ivy?since={first}"),
        &[],
        b"",
    )
    .await;
    let body = r.json();
    assert_eq!(body["gap"], Value::Null);
    let msgs = body["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(
        (msgs[0]["id"].as_u64(), msgs[0]["data"].as_str()),
        (Some(first + 1), Some("two"))
    );
    let r = http(
        server.admin_addr(),
        "GET",
        "/v1/history/ivy?since=x",
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, 400);
}

/// A `since` above every ID the history gave (a client from before a history reset) gets
/// nothing from the history, no `gap`, and still every live message after it.
#[tokio::test]
async fn a_resume_point_above_the_history_still_gets_live_messages() {
    let server = start(config()).await;
    push(&server, "ula", "before the client").await;
    let t = token(&server, "ula", None);
    let mut ws = ws_since(&server, &t, u64::MAX / 2).await;
    assert_eq!(ws_next_json(&mut ws).await["type"], "hello");
    push(&server, "ula", "after a reset").await;
    let m = ws_next_json(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), m["data"].as_str()),
        (Some("message"), Some("after a reset"))
    );
}
