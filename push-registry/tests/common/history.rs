//! The behavioural suite of [`MessageStore`], checked the same way on every backend.

use std::sync::Arc;
use std::time::Duration;

use push_registry::history::first_id_now;
use push_registry::{open_store, Appended, BufferLimits, MessageStore, NewMessage, Resume};

/// Count-limited: five kept per user, nothing ages out during the suite.
/// A W3C traceparent kept with a message.
const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

pub const FIVE: BufferLimits = BufferLimits {
    max_messages: 5,
    max_age: Duration::from_secs(60),
};

/// Age-limited: one second.
pub const ONE_SECOND: BufferLimits = BufferLimits {
    max_messages: 100,
    max_age: Duration::from_secs(1),
};

pub fn msg<'a>(user: &'a str, data: &'a str) -> NewMessage<'a> {
    NewMessage {
        user,
        mid: None,
        device: None,
        traceparent: None,
        json: false,
        data: data.as_bytes(),
    }
}

pub fn with_mid<'a>(user: &'a str, mid: &'a str, data: &'a str) -> NewMessage<'a> {
    NewMessage {
        mid: Some(mid),
        ..msg(user, data)
    }
}

fn ids(r: &Resume) -> Vec<u64> {
    r.messages.iter().map(|m| m.id).collect()
}

fn data(r: &Resume) -> Vec<String> {
    r.messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).into_owned())
        .collect()
}

pub async fn open(url: &str, limits: BufferLimits) -> Arc<dyn MessageStore> {
    open_store(url, limits).await.unwrap()
}

/// The contract of [`MessageStore`] on the store a URL names. `tag` keeps users apart when one
/// storage holds several runs.
pub async fn history_suite(url: &str, tag: &str) {
    let u = |name: &str| format!("{tag}-{name}");
    let store = open(url, FIVE).await;
    assert_eq!(store.limits(), FIVE);

    // IDs: per user, +1 per append, the first one above the clock in µs at the time.
    let (a, b) = (u("ann"), u("ben"));
    let before = first_id_now();
    let got = store
        .append(&[msg(&a, "a1"), msg(&b, "b1"), msg(&a, "a2"), msg(&a, "a3")])
        .await
        .unwrap();
    let after = first_id_now();
    assert!(got.iter().all(|g| !g.duplicate), "{got:?}");
    let first = got[0].id;
    assert!(
        first > before && first <= after + 1,
        "{before} < {first} ≤ {after}+1"
    );
    assert!(got[1].id > before && got[1].id <= after + 1);
    assert_eq!([got[2].id, got[3].id], [first + 1, first + 2]);
    let r = store.since(&a, 0).await.unwrap();
    assert_eq!(
        (data(&r), r.gap),
        (vec!["a1".into(), "a2".into(), "a3".into()], None)
    );
    assert_eq!(ids(&r), [first, first + 1, first + 2]);
    assert_eq!(data(&store.since(&b, 0).await.unwrap()), ["b1"]);

    // Every field round-trips; at_ms is the append's time.
    let c = u("cleo");
    let t0 = push_registry::now_ms();
    let payload = r#"{"text":"héllo \"quoted\"","n":[1,2]}"#;
    let full = NewMessage {
        user: &c,
        mid: Some("env-1"),
        device: Some("phone"),
        traceparent: Some(TP),
        json: true,
        data: payload.as_bytes(),
    };
    let id = store.append(&[full]).await.unwrap()[0].id;
    let t1 = push_registry::now_ms();
    let r = store.since(&c, 0).await.unwrap();
    assert_eq!(r.messages.len(), 1);
    let m = &r.messages[0];
    assert_eq!(m.id, id);
    assert_eq!(m.mid.as_deref(), Some("env-1"));
    assert_eq!(m.device.as_deref(), Some("phone"));
    assert_eq!(m.traceparent.as_deref(), Some(TP));
    assert!(m.json);
    assert_eq!(&m.data[..], payload.as_bytes());
    assert!((t0..=t1).contains(&m.at_ms), "{t0} ≤ {} ≤ {t1}", m.at_ms);
    let plain = store.append(&[msg(&c, "plain")]).await.unwrap()[0].id;
    let r = store.since(&c, id).await.unwrap();
    assert_eq!((ids(&r), r.gap), (vec![plain], None));
    let m = &r.messages[0];
    assert_eq!(
        (m.mid.as_deref(), m.device.as_deref(), m.json),
        (None, None, false)
    );
    assert_eq!(m.traceparent, None);

    // Dedup by mid: a redelivery gets the earlier ID and takes none; a mid that only starts
    // the same, or a mid quoted inside a payload, is not the same message.
    let d = u("dan");
    let first = store.append(&[with_mid(&d, "m-1", "x")]).await.unwrap()[0];
    let again = store
        .append(&[with_mid(&d, "m-1", "x, redelivered")])
        .await
        .unwrap();
    assert_eq!(
        again,
        [Appended {
            id: first.id,
            duplicate: true
        }]
    );
    let tricky = r#"see ,"mid":"m-2", here"#.to_string();
    let other = store
        .append(&[
            with_mid(&d, "m-10", "y"),
            msg(&d, &tricky),
            with_mid(&d, "m-2", "z"),
            with_mid(&d, "m-10", "y again"),
        ])
        .await
        .unwrap();
    assert_eq!(
        other,
        [
            Appended {
                id: first.id + 1,
                duplicate: false
            },
            Appended {
                id: first.id + 2,
                duplicate: false
            },
            Appended {
                id: first.id + 3,
                duplicate: false
            },
            Appended {
                id: first.id + 1,
                duplicate: true
            },
        ]
    );
    assert_eq!(
        data(&store.since(&d, 0).await.unwrap()),
        ["x", "y", &tricky, "z"]
    );

    // The count limit, and resume at each edge of what is kept.
    let e = u("eve");
    let mut all = Vec::new();
    for i in 1..=8 {
        let text = format!("e{i}");
        all.push(store.append(&[msg(&e, &text)]).await.unwrap()[0].id);
    }
    let f = all[0];
    assert_eq!(all, (f..f + 8).collect::<Vec<_>>());
    let kept: Vec<u64> = (f + 3..=f + 7).collect();
    let r = store.since(&e, 0).await.unwrap();
    assert_eq!(
        (ids(&r), r.gap),
        (kept.clone(), None),
        "after == 0: all kept, no gap"
    );
    assert_eq!(data(&r), ["e4", "e5", "e6", "e7", "e8"]);
    let r = store.since(&e, f + 1).await.unwrap();
    assert_eq!(
        (ids(&r), r.gap),
        (kept.clone(), Some(f + 3)),
        "before the oldest kept"
    );
    let r = store.since(&e, f + 2).await.unwrap();
    assert_eq!(
        (ids(&r), r.gap),
        (kept.clone(), None),
        "right before the oldest kept"
    );
    let r = store.since(&e, f + 3).await.unwrap();
    assert_eq!(
        (ids(&r), r.gap),
        (kept[1..].to_vec(), None),
        "at the oldest kept"
    );
    let r = store.since(&e, f + 5).await.unwrap();
    assert_eq!((ids(&r), r.gap), (vec![f + 6, f + 7], None), "inside");
    let r = store.since(&e, f + 7).await.unwrap();
    assert_eq!((ids(&r), r.gap), (vec![], None), "at the newest");
    let r = store.since(&e, f + 100).await.unwrap();
    assert_eq!((ids(&r), r.gap), (vec![], None), "past the newest");

    // get: kept IDs only, in ID order, once each.
    let got = store
        .get(&e, &[f + 7, f + 3, f + 1, f + 3, f + 100])
        .await
        .unwrap();
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), [f + 3, f + 7]);
    assert_eq!(&got[1].data[..], b"e8");
    assert!(store.get(&e, &[]).await.unwrap().is_empty());
    assert!(store.get(&u("nobody"), &[f]).await.unwrap().is_empty());

    // A user the store does not know: nothing, and a gap for a client that saw something.
    let r = store.since(&u("nobody"), 5).await.unwrap();
    assert!(r.messages.is_empty());
    assert!(r.gap.is_some_and(|g| g > 5), "{r:?}");
    assert_eq!(
        store.since(&u("nobody"), 0).await.unwrap(),
        Resume {
            messages: vec![],
            gap: None
        }
    );

    // A batch for several users: each user's messages in the order given, IDs +1 each.
    let users: Vec<String> = (0..4).map(|i| u(&format!("batch-{i}"))).collect();
    let texts: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    let batch: Vec<NewMessage<'_>> = (0..12).map(|i| msg(&users[i % 4], &texts[i])).collect();
    let got = store.append(&batch).await.unwrap();
    for (k, user) in users.iter().enumerate() {
        let mine: Vec<u64> = (0..12).filter(|i| i % 4 == k).map(|i| got[i].id).collect();
        assert_eq!(mine, [mine[0], mine[0] + 1, mine[0] + 2], "{user}");
        let r = store.since(user, 0).await.unwrap();
        assert_eq!(ids(&r), mine);
        assert_eq!(data(&r), [texts[k].as_str(), &texts[k + 4], &texts[k + 8]]);
    }
    assert!(store.append(&[]).await.unwrap().is_empty());

    // The age limit (a real wait: the stores stamp messages with the wall clock).
    let aged = open(url, ONE_SECOND).await;
    let g = u("gus");
    let old = aged.append(&[msg(&g, "old")]).await.unwrap()[0].id;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new = aged.append(&[msg(&g, "new")]).await.unwrap()[0].id;
    assert_eq!(new, old + 1);
    let r = aged.since(&g, 0).await.unwrap();
    assert_eq!((data(&r), r.gap), (vec!["new".to_string()], None));
    let r = aged.since(&g, old - 1).await.unwrap();
    assert_eq!(
        (ids(&r), r.gap),
        (vec![new], Some(new)),
        "the aged-out one is a gap"
    );
    let r = aged.since(&g, old).await.unwrap();
    assert_eq!((ids(&r), r.gap), (vec![new], None));
    assert!(aged.get(&g, &[old]).await.unwrap().is_empty());
    // Once everything aged out and the store forgot the user, IDs still go up.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = aged.since(&g, old).await.unwrap();
    assert!(r.messages.is_empty());
    assert!(r.gap.is_some_and(|gap| gap > new), "{r:?}");
    let later = aged.append(&[msg(&g, "later")]).await.unwrap()[0].id;
    assert!(later > new, "{later} > {new}");
}
