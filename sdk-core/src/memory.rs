//! localStorage played by a map, for host tests, benchmarks and simulations of tabs.

use crate::{Action, Core};
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;

pub type Storage = BTreeMap<String, String>;

/// Carries out the core's storage actions, as the browser binding does at a task's end.
pub fn apply(storage: &mut Storage, core: &mut Core) {
    for a in core.take_actions() {
        match a {
            Action::Set(k, v) => {
                storage.insert(k, v);
            }
            Action::Remove(k) => {
                storage.remove(&k);
            }
        }
    }
}

/// What [`Core::restore`] and [`Core::refresh`] read: every key with its value.
pub fn entries(storage: &Storage) -> Vec<(&str, &str)> {
    storage
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}
