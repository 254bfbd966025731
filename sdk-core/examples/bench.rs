//! The core's own costs on the host (`cargo xtask bench core`): the work a page does when
//! a burst of events is tracked in one task and acknowledged, and when a tab restores or
//! refreshes a large stored queue. Prints a markdown table; never fails on speed. The
//! browser runs the same code as wasm, some 2-3 times slower.

use std::time::Instant;
use tracklet_core::memory::{apply, entries, Storage};
use tracklet_core::{Config, Core, Outcome};

fn tab(storage: &mut Storage, seed: u64) -> Core {
    let cfg = Config {
        max_queue_events: 100_000,
        ..Config::default()
    };
    let mut core = Core::new(cfg, seed);
    core.set_context(Some(
        r#"{"url":"https://shop.example.com/products/shoes-42","path":"/products/shoes-42","title":"Shoes","screen":"1920x1080","viewport":"1280x720","language":"en-US","timezone":"Europe/Paris","sdk":"tracklet/0.1.0"}"#.into(),
    ));
    let snapshot = storage.clone();
    core.restore(entries(&snapshot));
    apply(storage, &mut core);
    core
}

fn ms(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1000.0
}

/// Tracks `tasks * per_task` events, `per_task` per task (one storage record each).
fn fill(storage: &mut Storage, core: &mut Core, tasks: usize, per_task: usize) {
    for t in 0..tasks {
        for i in 0..per_task {
            let props = format!(r#"{{"songId":{t},"seq":{i},"title":"Song {t}","duration":180}}"#);
            let _ = core.track("Song Played", Some(&props), 1_000 + t as u64);
        }
        apply(storage, core);
    }
}

fn main() {
    println!("| events | track() them all | one batch acknowledged, then a second tab restores the rest (keys in random order) | the first tab refreshes | then sends and acknowledges the rest |");
    println!("| --- | --- | --- | --- | --- |");
    for (tasks, per_task) in [(1, 5_000), (1, 20_000), (1_000, 5), (5_000, 1)] {
        let mut storage = Storage::new();
        let mut a = tab(&mut storage, 1);
        let track = ms(|| fill(&mut storage, &mut a, tasks, per_task));
        let out = a.poll_send(2_000_000, true).expect("a batch");
        a.on_result(out.batch, Outcome::Accepted { rejected: vec![] }, 2_000_000);
        apply(&mut storage, &mut a);
        // localStorage lists keys in no particular order.
        let mut shuffled = entries(&storage);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for i in (1..shuffled.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            shuffled.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        let restore = ms(|| {
            let mut b = Core::new(
                Config {
                    max_queue_events: 100_000,
                    ..Config::default()
                },
                2,
            );
            b.restore(shuffled.iter().copied());
        });
        let refresh = ms(|| a.refresh(shuffled.iter().copied()));
        let send = ms(|| {
            while let Some(out) = a.poll_send(3_000_000, true) {
                a.on_result(out.batch, Outcome::Accepted { rejected: vec![] }, 3_000_000);
                apply(&mut storage, &mut a);
            }
        });
        assert_eq!(a.pending(), 0, "every event acknowledged");
        println!(
            "| {} in {tasks} task(s) | {track:.1} ms | {restore:.1} ms | {refresh:.1} ms | {send:.1} ms |",
            tasks * per_task
        );
    }
}
