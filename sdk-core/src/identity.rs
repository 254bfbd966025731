//! Who the events are about: the anonymous id (`tl1:anon`), the user id from `identify()`
//! (`tl1:user`), the session (`tl1:sess`, ended by inactivity) and the opt-out
//! (`tl1:optout`). The tabs of an origin share them through storage: a change made here is
//! also written (as [`Action`]s), and what other tabs wrote is adopted.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use crate::ids::{self, Rng};
use crate::{storage, Action, Config};

/// The session's last activity is written at most this often (ms): every `track()`
/// touches the session, and a burst of events should not rewrite the key at each one.
const SESSION_PERSIST_EVERY_MS: u64 = 5_000;

#[derive(Default)]
pub(crate) struct Identity {
    anon: String,
    user: Option<String>,
    session: Session,
    opted_out: bool,
}

#[derive(Default)]
struct Session {
    id: String,
    /// Its last activity (ms).
    last: u64,
    /// The last activity storage holds.
    persisted_last: u64,
}

impl Identity {
    /// Reads the stored identity, session and opt-out (another tab may have changed them).
    pub fn adopt<'a>(&mut self, entries: impl Iterator<Item = (&'a str, &'a str)>) {
        let mut opted_out = false;
        let mut user = None;
        for (key, value) in entries {
            match key {
                storage::ANON => self.anon = value.into(),
                storage::USER => user = Some(value.to_string()),
                storage::SESSION => {
                    if let Some((id, last)) = storage::split_pair(value) {
                        if last > self.session.last {
                            self.session = Session {
                                id: id.into(),
                                last,
                                persisted_last: last,
                            };
                        }
                    }
                }
                storage::OPT_OUT => opted_out = true,
                _ => {}
            }
        }
        self.opted_out = opted_out;
        self.user = user;
    }

    /// Creates the anonymous id when storage had none (a browser seen the first time).
    pub fn ensure_anonymous_id(&mut self, rng: &mut Rng, actions: &mut Vec<Action>) {
        if self.anon.is_empty() {
            self.anon = ids::uuid_v4(rng);
            actions.push(Action::Set(storage::ANON.into(), self.anon.clone()));
        }
    }

    /// Sets the user id for this and later events (persisted, shared by tabs).
    pub fn identify(&mut self, user_id: &str, actions: &mut Vec<Action>) {
        self.user = Some(user_id.into());
        actions.push(Action::Set(storage::USER.into(), user_id.into()));
    }

    /// New anonymous id and session, no user id (for logout).
    pub fn reset(&mut self, now: u64, cfg: &Config, rng: &mut Rng, actions: &mut Vec<Action>) {
        self.anon = ids::uuid_v4(rng);
        self.user = None;
        self.session = Session::default();
        actions.push(Action::Set(storage::ANON.into(), self.anon.clone()));
        actions.push(Action::Remove(storage::USER.into()));
        self.touch_session(now, cfg, rng, actions);
    }

    /// Stops tracking (persisted).
    pub fn opt_out(&mut self, actions: &mut Vec<Action>) {
        self.opted_out = true;
        actions.push(Action::Set(storage::OPT_OUT.into(), "1".into()));
    }

    pub fn opt_in(&mut self, actions: &mut Vec<Action>) {
        self.opted_out = false;
        actions.push(Action::Remove(storage::OPT_OUT.into()));
    }

    pub fn opted_out(&self) -> bool {
        self.opted_out
    }

    /// Activity at `now`: continues the session, or starts a new one after
    /// `session_idle_ms` without activity.
    pub fn touch_session(
        &mut self,
        now: u64,
        cfg: &Config,
        rng: &mut Rng,
        actions: &mut Vec<Action>,
    ) {
        let s = &mut self.session;
        let fresh = s.id.is_empty() || now.saturating_sub(s.last) > cfg.session_idle_ms;
        if fresh {
            *s = Session {
                id: ids::uuid_v4(rng),
                last: now,
                persisted_last: 0,
            };
        }
        s.last = s.last.max(now);
        if fresh || s.last.saturating_sub(s.persisted_last) >= SESSION_PERSIST_EVERY_MS {
            s.persisted_last = s.last;
            actions.push(Action::Set(
                storage::SESSION.into(),
                storage::join_pair(&s.id, s.last),
            ));
        }
    }

    /// Another tab wrote the session key (the binding listens for `storage` events).
    pub fn adopt_session(&mut self, value: &str) {
        if let Some((id, last)) = storage::split_pair(value) {
            if last >= self.session.last {
                self.session = Session {
                    id: id.into(),
                    last,
                    persisted_last: last,
                };
            }
        }
    }

    pub fn anonymous_id(&self) -> &str {
        &self.anon
    }

    pub fn user_id(&self) -> Option<&str> {
        self.user.as_deref()
    }

    pub fn session_id(&self) -> &str {
        &self.session.id
    }
}
