//! Host tests of the core: a `BTreeMap` plays localStorage (shared by simulated tabs), a
//! plain `u64` plays the clock, and batches are decoded with the collector's own types.

use super::*;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::vec;
use tracklet_wire::types::{BatchEnvelope, Event};

extern crate std;

use crate::memory::{apply, entries, Storage};

fn tab(storage: &mut Storage, cfg: Config, seed: u64) -> Core {
    let mut core = Core::new(cfg, seed);
    let snapshot = storage.clone();
    core.restore(entries(&snapshot));
    apply(storage, &mut core);
    core
}

/// Decoded batch: (sent_at, dropped, events).
fn decode(body: &[u8]) -> (u64, u64, Vec<Event>) {
    assert_eq!(&body[..2], &[0x1f, 0x8b], "gzip magic");
    let json = miniz_oxide::inflate::decompress_to_vec(&body[10..body.len() - 8]).unwrap();
    let text = std::str::from_utf8(&json).unwrap();
    let env: BatchEnvelope = serde_json::from_str(text).unwrap();
    let events = env
        .events
        .iter()
        .map(|raw| serde_json::from_str(raw.get()).unwrap())
        .collect();
    (env.sent_at, env.dropped, events)
}

fn track_n(core: &mut Core, storage: &mut Storage, n: usize, now: u64) -> Vec<String> {
    let ids = (0..n)
        .map(|i| {
            core.track("Song Played", Some(&format!("{{\"seq\":{i}}}")), now)
                .unwrap()
        })
        .collect();
    apply(storage, core);
    ids
}

fn ok() -> Outcome {
    Outcome::Accepted { rejected: vec![] }
}

/// Every stored event line by id, as a new page would read it: the lines of each record
/// minus the record's gone-list.
fn stored(storage: &Storage) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in storage
        .iter()
        .filter(|(k, _)| k.starts_with(storage::EVENT))
    {
        let gone_key = k.replacen(storage::EVENT, storage::GONE, 1);
        let gone: Vec<usize> = storage.get(&gone_key).map_or(vec![], |g| {
            g.split('\n').map(|n| n.parse().unwrap()).collect()
        });
        for (at, line) in v.split('\n').enumerate() {
            if let Some(id) = storage::event_line_id(line).filter(|_| !gone.contains(&at)) {
                out.insert(id.to_string(), line.to_string());
            }
        }
    }
    out
}

fn stored_events(storage: &Storage) -> usize {
    stored(storage).len()
}

#[test]
fn sends_when_the_batch_is_full() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 49, 1_000);
    assert!(c.poll_send(1_000, false).is_none());
    assert_eq!(c.next_wake(), Some(6_000));
    track_n(&mut c, &mut st, 1, 1_001);
    assert_eq!(c.next_wake(), Some(0), "due now");
    let out = c
        .poll_send(1_001, false)
        .expect("a full batch goes at once");
    assert_eq!(out.events, 50);
    let (sent_at, dropped, events) = decode(&out.body);
    assert_eq!((sent_at, dropped), (1_001, 0));
    assert_eq!(events.len(), 50);
    assert_eq!(events[0].props.as_ref().unwrap()["seq"], 0);
    assert_eq!(
        events[49].props.as_ref().unwrap()["seq"],
        0,
        "the 50th came from the second call"
    );
    assert!(
        c.poll_send(1_001, true).is_none(),
        "one batch in flight at a time"
    );
}

#[test]
fn sends_when_the_oldest_event_waited_long_enough() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 3, 10_000);
    assert!(c.poll_send(14_999, false).is_none());
    assert_eq!(c.next_wake(), Some(15_000));
    let out = c.poll_send(15_000, false).unwrap();
    assert_eq!(out.events, 3);
}

#[test]
fn events_are_persisted_at_once_and_removed_only_when_acknowledged() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    let ids = track_n(&mut c, &mut st, 3, 100);
    for id in &ids {
        let v = &stored(&st)[id];
        let e: Event = serde_json::from_str(v).unwrap();
        assert_eq!(&e.id, id);
        assert_eq!(e.anonymous_id, st["tl1:anon"]);
    }
    let out = c.poll_send(100, true).unwrap();
    apply(&mut st, &mut c);
    assert_eq!(stored_events(&st), 3, "still stored while in flight");
    assert_eq!(c.status().in_flight, 3);
    c.on_result(out.batch, ok(), 200);
    apply(&mut st, &mut c);
    assert_eq!(stored_events(&st), 0);
    assert_eq!(c.pending(), 0);
    assert_eq!(c.status().last_sent_at, Some(200));
    assert!(!st.contains_key(storage::LEASE), "lease released");
}

#[test]
fn the_lease_is_released_after_the_acknowledged_events_are_removed() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 3, 100);
    let out = c.poll_send(100, true).unwrap();
    c.take_actions();
    c.on_result(out.batch, ok(), 200);
    let actions = c.take_actions();
    assert_eq!(
        actions.last(),
        Some(&Action::Remove(storage::LEASE.into())),
        "{actions:?}"
    );
}

#[test]
fn a_reload_restores_the_queue_and_identity() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    let ids = track_n(&mut c, &mut st, 7, 100);
    let anon = c.anonymous_id().to_string();
    let session = c.session_id().to_string();
    drop(c);
    let mut c2 = tab(&mut st, Config::default(), 2);
    assert_eq!(c2.pending(), 7);
    assert_eq!(c2.anonymous_id(), anon);
    c2.track("x", None, 1_000).unwrap();
    assert_eq!(c2.session_id(), session, "same session within 30 minutes");
    let out = c2.poll_send(1_000, true).unwrap();
    let (_, _, events) = decode(&out.body);
    let sent: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(&sent[..7], &ids[..], "restored events go first, in order");
}

#[test]
fn corrupt_records_lose_only_themselves() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    let ids = track_n(&mut c, &mut st, 3, 100);
    assert_eq!(
        st.keys().filter(|k| k.starts_with("tl1:e:")).count(),
        1,
        "one record per task"
    );
    let more = track_n(&mut c, &mut st, 2, 101);
    let key = format!("tl1:e:{}", ids[0]);
    // Truncate the middle line of the first record; the second record stays whole.
    let lines: Vec<String> = st[&key].split('\n').map(String::from).collect();
    let damaged = [
        lines[0].clone(),
        lines[1][..20].to_string(),
        lines[2].clone(),
    ]
    .join("\n");
    st.insert(key.clone(), damaged);
    st.insert("tl1:e:nonsense".into(), "\u{0}\u{1}".into());
    st.insert(storage::RETRY.into(), "garbage".into());
    st.insert(storage::SESSION.into(), "no-number".into());
    let mut c2 = tab(&mut st, Config::default(), 2);
    assert_eq!(c2.pending(), 4);
    assert!(!st.contains_key("tl1:e:nonsense"));
    let out = c2.poll_send(200, true).unwrap();
    let (_, _, events) = decode(&out.body);
    assert_eq!(
        events.iter().map(|e| &e.id).collect::<Vec<_>>(),
        vec![&ids[0], &ids[2], &more[0], &more[1]]
    );
    c2.on_result(out.batch, ok(), 201);
    apply(&mut st, &mut c2);
    assert!(
        !st.keys()
            .any(|k| k.starts_with("tl1:e:") || k.starts_with("tl1:a:")),
        "{st:?}"
    );
}

#[test]
fn records_are_never_rewritten_and_gone_lists_hide_acknowledged_events() {
    let mut st = Storage::new();
    let cfg = Config {
        max_batch_size: 3,
        ..Config::default()
    };
    let mut a = tab(&mut st, cfg.clone(), 1);
    let ids = track_n(&mut a, &mut st, 5, 10); // one record of 5
    let key = format!("tl1:e:{}", ids[0]);
    let record = st[&key].clone();
    // A 413 makes the next batch take 2 of the 5: a partial acknowledgement of the record.
    let out = a.poll_send(10, false).unwrap();
    assert_eq!(out.events, 5, "a backlog goes in one bigger batch");
    a.on_result(out.batch, Outcome::TooLarge, 10);
    let out = a.poll_send(10, true).unwrap();
    assert_eq!(out.events, 2);
    a.on_result(out.batch, ok(), 11);
    apply(&mut st, &mut a);
    assert_eq!(st[&key], record, "the record itself is untouched");
    let gone_key = format!("tl1:a:{}", ids[0]);
    assert_eq!(st[&gone_key], "0\n1", "the first two lines are gone");
    assert_eq!(
        stored(&st).keys().cloned().collect::<Vec<_>>(),
        ids[2..].to_vec()
    );
    // A stale tab that still has the first two queued forgets them on refresh ...
    let mut b = tab(&mut Storage::new(), cfg.clone(), 2);
    b.refresh(entries(&{
        let mut old = st.clone();
        old.remove(&gone_key);
        old
    }));
    assert_eq!(b.pending(), 5);
    let snap = st.clone();
    b.refresh(entries(&snap));
    assert_eq!(b.pending(), 3);
    // ... and a new page never sees them.
    let mut c = tab(&mut st, cfg, 3);
    assert_eq!(c.pending(), 3);
    let out = c.poll_send(20, true).unwrap();
    c.on_result(out.batch, ok(), 21);
    apply(&mut st, &mut c);
    assert!(
        !st.contains_key(&key) && !st.contains_key(&gone_key),
        "both go with the last event"
    );
}

#[test]
fn backoff_follows_the_schedule_and_force_skips_it() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 5, 0);
    let mut now = 0;
    let mut rng = ids::Rng::new(1);
    // Replay the core's own random draws to know the expected delays.
    let _tab_id = ids::uuid_v4(&mut rng);
    let mut failures = 0;
    for _ in 0..6 {
        let out = c.poll_send(now, true).unwrap();
        c.on_result(
            out.batch,
            Outcome::Retry {
                status: 503,
                retry_after_ms: None,
            },
            now,
        );
        apply(&mut st, &mut c);
        failures += 1;
        let next = c.status().next_retry_at.unwrap();
        let ceiling = (1_000u64 << (failures - 1)).min(300_000);
        assert!(
            next > now && next <= now + ceiling.max(100),
            "failure {failures}: {next}"
        );
        assert!(
            c.poll_send(next - 1, false).is_none(),
            "not before the backoff"
        );
        assert_eq!(c.next_wake(), Some(next));
        assert_eq!(
            RetryState::decode(&st[storage::RETRY]).unwrap().failures,
            failures
        );
        now = next;
        assert!(c.poll_send(now, false).is_some(), "due at next_retry_at");
        c.on_result(
            out.batch + 1,
            Outcome::Retry {
                status: 500,
                retry_after_ms: None,
            },
            now,
        );
        failures += 1;
        apply(&mut st, &mut c);
    }
    assert_eq!(c.status().last_error.as_deref(), Some("HTTP 500"));
    let out = c
        .poll_send(now + 1, true)
        .expect("forceSend skips the backoff wait");
    c.on_result(out.batch, ok(), now + 2);
    apply(&mut st, &mut c);
    assert_eq!(c.status().next_retry_at, None);
    assert!(!st.contains_key(storage::RETRY));
}

#[test]
fn retry_after_is_honoured_even_by_force() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 5, 0);
    let out = c.poll_send(0, true).unwrap();
    c.on_result(
        out.batch,
        Outcome::Retry {
            status: 429,
            retry_after_ms: Some(30_000),
        },
        1_000,
    );
    apply(&mut st, &mut c);
    assert!(c.poll_send(30_999, true).is_none());
    assert!(c.status().next_retry_at.unwrap() >= 31_000);
    // A reload (or another tab) sees the same wait.
    let mut c2 = tab(&mut st, Config::default(), 2);
    assert!(c2.poll_send(2_000, true).is_none());
    assert!(c2.next_wake().unwrap() >= 31_000);
    assert!(c.poll_send(31_000, true).is_some());
}

#[test]
fn a_413_splits_the_batch_and_a_lone_event_is_dropped() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 50, 0);
    let out = c.poll_send(0, false).unwrap();
    assert_eq!(out.events, 50);
    c.on_result(out.batch, Outcome::TooLarge, 1);
    let out = c.poll_send(1, true).unwrap();
    assert_eq!(out.events, 25);
    c.on_result(out.batch, Outcome::TooLarge, 2);
    let out = c.poll_send(2, true).unwrap();
    assert_eq!(out.events, 12);
    c.on_result(out.batch, ok(), 3);
    let out = c.poll_send(3, true).unwrap();
    assert_eq!(out.events, 38, "the limit is lifted after a success");
    c.on_result(out.batch, ok(), 4);
    track_n(&mut c, &mut st, 1, 5);
    let out = c.poll_send(5, true).unwrap();
    c.on_result(out.batch, Outcome::TooLarge, 6);
    assert_eq!(c.pending(), 0);
    assert_eq!(c.status().rejected, 1);
}

#[test]
fn rejected_events_and_400s_are_dropped_and_counted() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 4, 0);
    let out = c.poll_send(0, true).unwrap();
    c.on_result(
        out.batch,
        Outcome::Accepted {
            rejected: vec![1, 3, 99],
        },
        1,
    );
    assert_eq!(c.pending(), 0);
    assert_eq!(c.status().rejected, 2);
    assert!(c.status().last_error.unwrap().contains("2 events rejected"));
    track_n(&mut c, &mut st, 4, 2);
    let out = c.poll_send(2, true).unwrap();
    c.on_result(out.batch, Outcome::BadRequest, 3);
    apply(&mut st, &mut c);
    assert_eq!(c.pending(), 0);
    assert_eq!(stored_events(&st), 0);
    assert_eq!(c.status().rejected, 6);
}

#[test]
fn unauthorized_stops_sending_and_keeps_the_events() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 4, 0);
    let out = c.poll_send(0, true).unwrap();
    c.on_result(out.batch, Outcome::Unauthorized { status: 401 }, 1);
    apply(&mut st, &mut c);
    assert!(c.poll_send(100_000, true).is_none());
    assert_eq!(c.next_wake(), None);
    assert_eq!(c.pending(), 4);
    assert_eq!(stored_events(&st), 4);
    assert!(c.status().last_error.unwrap().starts_with("HTTP 401"));
}

#[test]
fn offline_spends_no_attempt() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 2, 0);
    let out = c.poll_send(0, true).unwrap();
    c.on_result(out.batch, Outcome::Offline, 1);
    assert!(!c.status().online);
    assert_eq!(c.next_wake(), None, "sleep until the online event");
    assert!(c.poll_send(2, true).is_none());
    c.set_online(true);
    assert_eq!(
        c.status().next_retry_at,
        None,
        "no backoff from being offline"
    );
    assert!(c.poll_send(3, true).is_some());
}

#[test]
fn a_full_queue_drops_the_oldest_and_reports_them() {
    let mut st = Storage::new();
    let cfg = Config {
        max_queue_events: 10,
        always_keep: vec!["purchase".into()],
        ..Config::default()
    };
    let mut c = tab(&mut st, cfg.clone(), 1);
    c.track("purchase", None, 0).unwrap();
    let ids = track_n(&mut c, &mut st, 15, 1);
    assert_eq!(c.pending(), 10);
    assert_eq!(stored_events(&st), 10);
    assert_eq!(c.status().dropped, 6);
    assert_eq!(st[storage::DROPPED], "6");
    let out = c.poll_send(2, true).unwrap();
    let (_, dropped, events) = decode(&out.body);
    assert_eq!(dropped, 6);
    assert_eq!(events[0].name, "purchase", "always_keep survives");
    assert_eq!(events[1].id, ids[6], "the oldest others went");
    c.on_result(out.batch, ok(), 3);
    apply(&mut st, &mut c);
    assert_eq!(c.status().dropped, 0);
    assert!(!st.contains_key(storage::DROPPED));
}

#[test]
fn the_byte_bound_also_drops_the_oldest() {
    let mut st = Storage::new();
    let cfg = Config {
        max_queue_bytes: 2_000,
        ..Config::default()
    };
    let mut c = tab(&mut st, cfg, 1);
    let big = format!("{{\"s\":\"{}\"}}", "x".repeat(400));
    for _ in 0..10 {
        c.track("big", Some(&big), 0).unwrap();
    }
    // The bounds hold from the end of the task (the binding's take_actions) on.
    apply(&mut st, &mut c);
    assert!(c.pending() <= 4, "{}", c.pending());
    assert_eq!(c.status().dropped as usize + c.pending(), 10);
    assert_eq!(
        stored_events(&st),
        c.pending(),
        "dropped events are never written"
    );
    assert!(
        !st.keys().any(|k| k.starts_with(storage::GONE)),
        "nor need a gone-list"
    );
}

#[test]
fn sampling_and_always_keep() {
    let mut st = Storage::new();
    let cfg = Config {
        sampling: vec![("scroll".into(), 0.0), ("half".into(), 0.5)],
        always_keep: vec!["scroll_keep".into()],
        ..Config::default()
    };
    let mut c = tab(&mut st, cfg, 1);
    assert_eq!(c.track("scroll", None, 0), Err(Skipped::Sampled));
    assert!(c.track("scroll_keep", None, 0).is_ok());
    let kept = (0..1000)
        .filter(|_| c.track("half", None, 0).is_ok())
        .count();
    assert!((400..600).contains(&kept), "{kept}");
    assert_eq!(c.track("", None, 0), Err(Skipped::InvalidName));
    let huge = format!("{{\"s\":\"{}\"}}", "x".repeat(40_000));
    assert_eq!(c.track("x", Some(&huge), 0), Err(Skipped::TooLarge));
}

#[test]
fn opt_out_is_persisted_and_clears_the_queue() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 3, 0);
    assert_eq!(c.opt_out(), 3);
    apply(&mut st, &mut c);
    assert_eq!(c.track("x", None, 1), Err(Skipped::OptedOut));
    let mut c2 = tab(&mut st, Config::default(), 2);
    assert!(c2.opted_out());
    c2.opt_in();
    apply(&mut st, &mut c2);
    assert!(c2.track("x", None, 3).is_ok());
}

#[test]
fn sessions_expire_after_30_idle_minutes_and_reset_makes_new_ids() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    c.track("a", None, 0).unwrap();
    let s1 = c.session_id().to_string();
    c.track("a", None, 29 * 60_000).unwrap();
    assert_eq!(c.session_id(), s1);
    c.track("a", None, 60 * 60_000).unwrap();
    assert_ne!(c.session_id(), s1);
    let anon = c.anonymous_id().to_string();
    c.identify("user-1");
    let id = c.track("a", None, 60 * 60_000 + 1).unwrap();
    apply(&mut st, &mut c);
    let e: Event = serde_json::from_str(&stored(&st)[&id]).unwrap();
    assert_eq!(e.user_id.as_deref(), Some("user-1"));
    c.reset(60 * 60_000 + 2);
    assert_ne!(c.anonymous_id(), anon);
    let id = c.track("a", None, 60 * 60_000 + 3).unwrap();
    apply(&mut st, &mut c);
    let e: Event = serde_json::from_str(&stored(&st)[&id]).unwrap();
    assert_eq!(e.user_id, None);
}

#[test]
fn tabs_share_one_sender_and_a_crashed_tabs_lease_expires() {
    let mut st = Storage::new();
    let mut a = tab(&mut st, Config::default(), 1);
    let mut b = tab(&mut st, Config::default(), 2);
    assert_eq!(
        a.anonymous_id(),
        b.anonymous_id(),
        "one browser, one anonymous id"
    );
    let from_a = track_n(&mut a, &mut st, 3, 10);
    let from_b = track_n(&mut b, &mut st, 2, 11);
    let snap = st.clone();
    a.refresh(entries(&snap));
    let out = a.poll_send(20, true).unwrap();
    apply(&mut st, &mut a);
    assert_eq!(out.events, 5, "tab A sends tab B's events too");
    let snap = st.clone();
    b.refresh(entries(&snap));
    assert!(b.poll_send(21, true).is_none(), "A holds the lease");
    assert_eq!(b.next_wake(), Some(20 + 30_000));
    // A crashes here: no answer ever comes. After the lease, B sends everything again.
    drop(a);
    let snap = st.clone();
    b.refresh(entries(&snap));
    let out = b.poll_send(30_020, false).unwrap();
    let (_, _, events) = decode(&out.body);
    let sent: BTreeSet<String> = events.into_iter().map(|e| e.id).collect();
    let all: BTreeSet<String> = from_a.into_iter().chain(from_b).collect();
    assert_eq!(sent, all);
    b.on_result(out.batch, ok(), 30_021);
    apply(&mut st, &mut b);
    assert_eq!(stored_events(&st), 0);
}

#[test]
fn events_acknowledged_by_another_tab_leave_this_tabs_queue() {
    let mut st = Storage::new();
    let mut a = tab(&mut st, Config::default(), 1);
    let mut b = tab(&mut st, Config::default(), 2);
    track_n(&mut b, &mut st, 4, 1);
    let snap = st.clone();
    a.refresh(entries(&snap));
    let out = a.poll_send(2, true).unwrap();
    a.on_result(out.batch, ok(), 3);
    apply(&mut st, &mut a);
    assert_eq!(b.pending(), 4);
    let snap = st.clone();
    b.refresh(entries(&snap));
    assert_eq!(b.pending(), 0);
}

#[test]
fn an_event_not_persisted_survives_a_refresh() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    let id = c.track("x", None, 0).unwrap();
    c.take_actions(); // the write failed: storage never got it
    c.persist_failed(&format!("tl1:e:{id}"));
    assert!(stored(&st).is_empty());
    let snap = st.clone();
    c.refresh(entries(&snap));
    assert_eq!(c.pending(), 1);
}

#[test]
fn the_unload_body_fits_the_beacon_budget_and_covers_the_queue() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 120, 0);
    let inflight = c.poll_send(0, true).unwrap();
    assert_eq!(inflight.events, 120, "a backlog goes in one bigger batch");
    track_n(&mut c, &mut st, 130, 1);
    let body = c.unload_body(1).expect("a beacon");
    assert!(body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES);
    assert_eq!(decode(&body).2.len(), 130, "everything not in flight");
    assert_eq!(c.pending(), 250, "still stored until acknowledged");
    apply(&mut st, &mut c);
    assert!(
        !st.contains_key(storage::LEASE),
        "the next page need not wait for this one's lease"
    );
    // The next page holds both batches back until the collector says which arrived.
    let mut next = tab(&mut st, Config::default(), 2);
    assert_eq!(next.pending(), 250);
    assert!(next.poll_send(2, true).is_none(), "held until confirmed");
    let asked = next
        .unconfirmed_due(2, 0)
        .expect("two batches to ask about");
    assert_eq!(asked.len(), 2);
    let beacon_id = beacon_batch_id(&body);
    assert!(asked.contains(&beacon_id));
    // The beacon arrived, the request in flight did not: only its 120 events are resent.
    assert_eq!(next.confirm(&asked, Some(&[beacon_id])), 130);
    apply(&mut st, &mut next);
    assert_eq!(next.pending(), 120);
    assert!(!st.keys().any(|k| k.starts_with(storage::UNCONFIRMED)));
    assert_eq!(next.poll_send(3, true).unwrap().events, 120);
}

fn beacon_batch_id(body: &[u8]) -> String {
    let json = miniz_oxide::inflate::decompress_to_vec(&body[10..body.len() - 8]).unwrap();
    let env: BatchEnvelope = serde_json::from_slice(&json).unwrap();
    env.batch_id.expect("every batch has an id")
}

#[test]
fn unconfirmed_batches_are_resent_when_the_collector_cannot_say() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 20, 0);
    assert!(c.unload_body(10).is_some());
    apply(&mut st, &mut c);
    let mut next = tab(&mut st, Config::default(), 2);
    assert_eq!(
        next.unconfirmed_due(500, 1_000),
        None,
        "a beacon may still be on its way"
    );
    assert_eq!(next.unconfirmed_at(1_000), Some(1_010));
    let asked = next.unconfirmed_due(1_010, 1_000).unwrap();
    assert_eq!(next.confirm(&asked, None), 0);
    apply(&mut st, &mut next);
    assert_eq!(
        next.poll_send(1_011, true).unwrap().events,
        20,
        "nothing lost"
    );
    // A batch id the collector lists but that was never asked about changes nothing.
    assert_eq!(next.confirm(&["other".into()], Some(&["other".into()])), 0);
}

#[test]
fn an_unload_body_too_big_for_the_budget_takes_the_oldest_that_fit() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    // Random-looking strings compress badly: 100 of 2 KB is far over 60 KB gzipped.
    let mut rng = ids::Rng::new(5);
    let mut ids = Vec::new();
    for i in 0..100 {
        let s: String = (0..2_000)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        ids.push(
            c.track("big", Some(&format!(r#"{{"s":"{s}"}}"#)), i)
                .unwrap(),
        );
    }
    apply(&mut st, &mut c);
    let body = c.unload_body(200).expect("a beacon");
    assert!(body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES);
    let sent = decode(&body).2;
    assert!(
        !sent.is_empty() && sent.len() < 100,
        "{} events",
        sent.len()
    );
    assert_eq!(sent[0].id, ids[0], "the oldest first");
    assert!(
        c.unload_body(200).is_some(),
        "asking again gives the same oldest events"
    );
}

#[test]
fn big_events_are_split_to_stay_under_the_request_cap() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    // Random-looking strings compress badly: 50 of 5 KB is far over 60 KB gzipped.
    let mut rng = ids::Rng::new(3);
    for _ in 0..50 {
        let s: String = (0..5_000)
            .map(|_| (b'a' + rng.below(26) as u8) as char)
            .collect();
        c.track("blob", Some(&format!("{{\"s\":\"{s}\"}}")), 0)
            .unwrap();
    }
    let out = c.poll_send(0, true).unwrap();
    assert!(out.body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES);
    assert!(out.events < 50 && out.events >= 12, "{}", out.events);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Track(usize, usize),
        Tick(usize, u64),
        Answer(usize, u8),
        Reload(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..2usize, 1..4usize).prop_map(|(t, n)| Op::Track(t, n)),
            2 => (0..2usize, 0..40_000u64).prop_map(|(t, d)| Op::Tick(t, d)),
            3 => (0..2usize, 0..5u8).prop_map(|(t, r)| Op::Answer(t, r)),
            1 => (0..2usize).prop_map(Op::Reload),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Two tabs, a flaky collector, reloads: every tracked event is stored by the
        /// collector or still queued; after a clean drain, all of them are stored; the
        /// collector never sees an event it was not given.
        #[test]
        fn no_event_is_lost(ops in proptest::collection::vec(op(), 1..120), seed in any::<u64>()) {
            let mut st = Storage::new();
            let mut now = 1_000u64;
            let mut tabs = [tab(&mut st, Config::default(), seed), tab(&mut st, Config::default(), seed ^ 1)];
            let mut inflight: [Option<(u64, String, Vec<String>)>; 2] = [None, None];
            let mut tracked = BTreeSet::new();
            let mut collector = BTreeSet::new();
            // The batch ids the collector committed (what `/v1/batch/status` answers).
            let mut arrived: Vec<String> = Vec::new();
            let mut seeds = 2u64;
            for op in ops {
                match op {
                    Op::Track(t, n) => {
                        // n events in one task: one storage record.
                        for _ in 0..n {
                            tracked.insert(tabs[t].track("e", Some("{}"), now).unwrap());
                        }
                        apply(&mut st, &mut tabs[t]);
                    }
                    Op::Tick(t, d) => {
                        now += d;
                        let snap = st.clone();
                        tabs[t].refresh(entries(&snap));
                        // Batches whose answer was lost are asked about first.
                        if let Some(asked) = tabs[t].unconfirmed_due(now, 1_000) {
                            tabs[t].confirm(&asked, Some(&arrived));
                        }
                        if let Some(out) = tabs[t].poll_send(now, false) {
                            let ids = decode(&out.body).2.into_iter().map(|e| e.id).collect();
                            inflight[t] = Some((out.batch, out.batch_id, ids));
                        }
                        apply(&mut st, &mut tabs[t]);
                    }
                    Op::Answer(t, r) => {
                        if let Some((batch, batch_id, ids)) = inflight[t].take() {
                            let outcome = match r {
                                0 | 1 => { collector.extend(ids); arrived.push(batch_id); ok() }
                                2 => Outcome::Retry { status: 503, retry_after_ms: Some(1_000) },
                                3 => Outcome::Retry { status: 0, retry_after_ms: None },
                                // Committed, but the answer was lost on the way back.
                                _ => {
                                    collector.extend(ids);
                                    arrived.push(batch_id);
                                    Outcome::Retry { status: 0, retry_after_ms: None }
                                }
                            };
                            tabs[t].on_result(batch, outcome, now);
                            apply(&mut st, &mut tabs[t]);
                        }
                    }
                    Op::Reload(t) => {
                        seeds += 1;
                        tabs[t] = tab(&mut st, Config::default(), seed.wrapping_add(seeds));
                        inflight[t] = None;
                    }
                }
                let kept = stored(&st);
                for id in &tracked {
                    prop_assert!(collector.contains(id) || kept.contains_key(id), "lost {}", id);
                }
                prop_assert!(collector.is_subset(&tracked));
            }
            // Drain with a healthy collector, from a fresh page.
            now += 400_000;
            let mut c = tab(&mut st, Config::default(), seed ^ 99);
            if let Some(asked) = c.unconfirmed_due(now, 1_000) {
                c.confirm(&asked, Some(&arrived));
                apply(&mut st, &mut c);
            }
            for _ in 0..100 {
                now += 1;
                let Some(out) = c.poll_send(now, true) else { break };
                collector.extend(decode(&out.body).2.into_iter().map(|e| e.id));
                c.on_result(out.batch, ok(), now);
                apply(&mut st, &mut c);
            }
            prop_assert_eq!(&collector, &tracked);
            prop_assert_eq!(stored_events(&st), 0);
        }
    }
}

#[test]
fn a_backlog_drains_in_few_requests_under_the_size_cap() {
    let mut st = Storage::new();
    let mut c = tab(&mut st, Config::default(), 1);
    track_n(&mut c, &mut st, 1_000, 0);
    let mut requests = 0;
    let mut now = 0;
    while let Some(out) = c.poll_send(now, false) {
        assert!(out.body.len() <= tracklet_wire::SDK_MAX_REQUEST_BYTES);
        assert!(out.events <= tracklet_wire::MAX_EVENTS_PER_BATCH);
        requests += 1;
        now += 1;
        c.on_result(out.batch, ok(), now);
    }
    assert_eq!(c.pending(), 0);
    assert!(requests <= 3, "{requests} requests for 1,000 queued events");
}

/// The status before the wasm has loaded (and on the server) is `Status::default()`, written
/// for JavaScript into `npm/src/idle-status.js`, which the facade and the React binding
/// import: the shape has one definition, here. This test fails when the two differ;
/// `TRACKLET_WRITE_GENERATED=1 cargo test -p tracklet-core idle_status` rewrites the file.
#[test]
fn idle_status_js_is_generated_from_the_status_type() {
    let json = serde_json::to_string_pretty(&Status::default()).unwrap();
    let js = format!(
        "// Generated from `tracklet_core::Status::default()` by the sdk-core test\n\
         // `idle_status_js_is_generated_from_the_status_type`: do not edit. After changing\n\
         // `Status`, run `TRACKLET_WRITE_GENERATED=1 cargo test -p tracklet-core idle_status`.\n\
         export const IDLE_STATUS = Object.freeze({json});\n"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../npm/src/idle-status.js");
    if std::env::var_os("TRACKLET_WRITE_GENERATED").is_some() {
        std::fs::write(&path, &js).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        committed, js,
        "npm/src/idle-status.js differs from Status::default(): run \
         `TRACKLET_WRITE_GENERATED=1 cargo test -p tracklet-core idle_status`"
    );
}
