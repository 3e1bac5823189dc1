//! The re-read of every device's retained state, and its bookkeeping (no I/O: the MQTT task
//! performs the [`Action`]s; time is a parameter).
//!
//! Why it is more than "subscribe and wait": a broker sends every retained message matching a
//! new subscription at once, and drops what does not fit its per-client queue (Mosquitto's
//! `max_queued_messages`, EMQX's `max_mqueue_len`; rumqttd reads at most its
//! `max_outgoing_packet_count`). With 20,000 devices and a queue of 1,000, a restarted
//! controller once knew 1,020 devices. So a re-read is:
//! 1. **Wildcard**: subscribe to every device's `state` and `online` (QoS 0: no acks to wait
//!    for, and the retained copy is the truth anyway), then publish a *fence* on a topic the
//!    same subscription matches (`…/devices/@reread/state`; `@` is in no device name). A broker
//!    delivers a client's messages in order, so when the fence comes back every retained
//!    report the broker kept for us has arrived. A fence that never comes (dropped too) ends
//!    the phase after [`WILDCARD_IDLE`] of silence.
//! 2. **Paging**: every device the controller knew (from its database) that did not arrive is
//!    subscribed to by its exact topics, [`PAGE`] devices at a time, each page's retained
//!    messages read before the next page is asked for, then unsubscribed. No page can overflow
//!    a queue, so on any broker a restart re-reads every device it knew.
//! 3. Known devices still silent have no retained report on the broker (cleared, or the
//!    broker lost it): counted in [`Summary::unretained`], kept as they were.
//!
//! Live reports can be dropped too (a burst larger than the queue). Mosquitto counts the
//! messages it dropped in `$SYS/broker/publish/messages/dropped`; when that number grows, a
//! new re-read is started, no sooner than the rate limit allows (`next_allowed`).

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Devices per page of exact-topic subscriptions.
pub const PAGE: usize = 100;
/// Silence after which a wildcard phase whose fence never came is taken as finished.
pub const WILDCARD_IDLE: Duration = Duration::from_secs(5);
/// Silence after a page's SUBACK (or its last message) after which the page is finished.
pub const PAGE_IDLE: Duration = Duration::from_millis(1000);
/// Shortest pause between a re-read that drops started and the next one; it doubles while
/// drops keep coming, up to [`MAX_GAP`].
pub const MIN_GAP: Duration = Duration::from_secs(5);
/// Longest pause between drop-started re-reads.
pub const MAX_GAP: Duration = Duration::from_secs(600);

/// What the MQTT task must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Subscribe (again) to the `state` and `online` wildcards; the SUBACK goes to
    /// [`Reread::wildcard_acked`].
    SubscribeWildcards,
    /// Publish the fence, QoS 0, not retained, with this payload.
    PublishFence(String),
    /// Subscribe to these devices' exact `state` and `online` topics; the SUBACK goes to
    /// [`Reread::page_acked`] with the page's number.
    SubscribePage(u64, Vec<String>),
    /// Unsubscribe these devices' exact topics.
    UnsubscribePage(Vec<String>),
    /// The re-read is over.
    Finished(Summary),
}

/// Why a re-read ran and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `connect` or `broker_dropped`.
    pub reason: &'static str,
    /// Devices whose state arrived through the wildcard.
    pub by_wildcard: usize,
    /// Known devices the wildcard missed that paging recovered.
    pub by_paging: usize,
    /// Known devices with no retained report on the broker.
    pub unretained: usize,
    /// The fence never came back: the broker dropped messages during the wildcard phase.
    pub fence_lost: bool,
    /// How long it took.
    pub took: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    Wildcard { acked: bool },
    Paging { acked: bool, page: HashSet<String> },
}

/// The re-read state machine of one controller connection.
#[derive(Debug)]
pub struct Reread {
    phase: Phase,
    reason: &'static str,
    nonce: String,
    counter: u64,
    seen: HashSet<String>,
    started: Instant,
    last_activity: Instant,
    pages: VecDeque<Vec<String>>,
    /// The page in flight (all its devices, for the unsubscribe) and its number.
    current_page: Option<(u64, Vec<String>)>,
    page_no: u64,
    by_wildcard: usize,
    by_paging: usize,
    missing: usize,
    fence_lost: bool,
    /// A re-read asked for (by drops) that has not started yet.
    wanted: Option<&'static str>,
    next_allowed: Instant,
    gap: Duration,
    /// The broker's drop counter as last seen.
    dropped: Option<u64>,
}

impl Reread {
    /// A state machine with nothing under way.
    pub fn new(now: Instant) -> Reread {
        Reread {
            phase: Phase::Idle,
            reason: "connect",
            nonce: String::new(),
            counter: 0,
            seen: HashSet::new(),
            started: now,
            last_activity: now,
            pages: VecDeque::new(),
            current_page: None,
            page_no: 0,
            by_wildcard: 0,
            by_paging: 0,
            missing: 0,
            fence_lost: false,
            wanted: None,
            next_allowed: now,
            gap: MIN_GAP,
            dropped: None,
        }
    }

    /// Whether a re-read is under way.
    pub fn running(&self) -> bool {
        self.phase != Phase::Idle
    }

    /// The payload the current fence carries (empty when none is out).
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    fn begin(&mut self, reason: &'static str, now: Instant) {
        self.counter += 1;
        self.nonce = format!("{}-{}", std::process::id(), self.counter);
        self.phase = Phase::Wildcard { acked: false };
        self.reason = reason;
        self.seen.clear();
        self.pages.clear();
        self.current_page = None;
        self.started = now;
        self.last_activity = now;
        self.by_wildcard = 0;
        self.by_paging = 0;
        self.missing = 0;
        self.fence_lost = false;
        self.wanted = None;
    }

    /// A session was established and the caller subscribed to everything, wildcards
    /// included: the re-read of a (re)connect begins. Whatever ran before is abandoned.
    pub fn connected(&mut self, now: Instant) {
        self.gap = MIN_GAP;
        // A fresh session: the broker's counter is read anew (a restarted broker starts at 0).
        self.dropped = None;
        self.begin("connect", now);
    }

    /// The session was lost: nothing can complete; the next connect starts over.
    pub fn disconnected(&mut self) {
        self.phase = Phase::Idle;
        self.pages.clear();
        self.current_page = None;
        self.nonce.clear();
    }

    /// The SUBACK of the wildcard subscription: send the fence.
    pub fn wildcard_acked(&mut self, now: Instant) -> Vec<Action> {
        match self.phase {
            Phase::Wildcard { acked: false } => {
                self.phase = Phase::Wildcard { acked: true };
                self.last_activity = now;
                vec![Action::PublishFence(self.nonce.clone())]
            }
            _ => Vec::new(),
        }
    }

    /// A device's state message arrived (any time; only counted while a re-read runs).
    pub fn state_arrived(&mut self, device: &str, now: Instant) -> Vec<Action> {
        match &mut self.phase {
            Phase::Idle => Vec::new(),
            Phase::Wildcard { .. } => {
                self.last_activity = now;
                if self.seen.insert(device.to_owned()) {
                    self.by_wildcard += 1;
                }
                Vec::new()
            }
            Phase::Paging { page, acked } => {
                self.last_activity = now;
                if page.remove(device) {
                    self.by_paging += 1;
                    // Before its SUBACK the page is not done: unsubscribing now would leave
                    // that SUBACK to be taken for the next page's.
                    if page.is_empty() && *acked {
                        return self.next_page(now);
                    }
                }
                Vec::new()
            }
        }
    }

    /// The fence came back. `known` lists the devices the controller knew before.
    pub fn fence_arrived(
        &mut self,
        payload: &[u8],
        now: Instant,
        known: impl FnOnce() -> Vec<String>,
    ) -> Vec<Action> {
        if self.phase == (Phase::Wildcard { acked: true }) && payload == self.nonce.as_bytes() {
            self.wildcard_done(now, known())
        } else {
            // A fence of an abandoned re-read: its messages are counted by the current one.
            Vec::new()
        }
    }

    /// The SUBACK of page number `n`.
    pub fn page_acked(&mut self, n: u64, now: Instant) -> Vec<Action> {
        if self.current_page.as_ref().map(|(no, _)| *no) != Some(n) {
            return Vec::new();
        }
        if let Phase::Paging { acked, page } = &mut self.phase {
            *acked = true;
            self.last_activity = now;
            if page.is_empty() {
                return self.next_page(now);
            }
        }
        Vec::new()
    }

    /// The broker's count of dropped messages (`$SYS/broker/publish/messages/dropped`).
    /// Returns how many were dropped since the last reading.
    pub fn broker_dropped(&mut self, count: u64) -> u64 {
        let grew = match self.dropped {
            Some(before) if count > before => count - before,
            _ => 0,
        };
        self.dropped = Some(count);
        if grew > 0 {
            self.wanted = Some("broker_dropped");
        }
        grew
    }

    /// Timeouts and postponed re-reads; call a few times a second.
    pub fn tick(&mut self, now: Instant, known: impl FnOnce() -> Vec<String>) -> Vec<Action> {
        match &self.phase {
            Phase::Idle => match self.wanted {
                Some(reason) if now >= self.next_allowed => {
                    self.begin(reason, now);
                    vec![Action::SubscribeWildcards]
                }
                _ => Vec::new(),
            },
            Phase::Wildcard { acked: true }
                if now.duration_since(self.last_activity) >= WILDCARD_IDLE =>
            {
                self.fence_lost = true;
                self.wildcard_done(now, known())
            }
            Phase::Paging { acked: true, .. }
                if now.duration_since(self.last_activity) >= PAGE_IDLE =>
            {
                self.next_page(now)
            }
            _ => Vec::new(),
        }
    }

    fn wildcard_done(&mut self, now: Instant, known: Vec<String>) -> Vec<Action> {
        let missing: Vec<String> = known
            .into_iter()
            .filter(|d| !self.seen.contains(d))
            .collect();
        self.missing = missing.len();
        self.pages = missing.chunks(PAGE).map(<[String]>::to_vec).collect();
        self.phase = Phase::Paging {
            acked: false,
            page: HashSet::new(),
        };
        self.next_page_inner(now, None)
    }

    /// Finish the page in flight (unsubscribe it) and ask for the next, or finish.
    fn next_page(&mut self, now: Instant) -> Vec<Action> {
        if !matches!(self.phase, Phase::Paging { .. }) {
            return Vec::new();
        }
        let done = self.current_page.take().map(|(_, devices)| devices);
        self.next_page_inner(now, done)
    }

    fn next_page_inner(&mut self, now: Instant, done: Option<Vec<String>>) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(done) = done {
            out.push(Action::UnsubscribePage(done));
        }
        match self.pages.pop_front() {
            Some(page) => {
                self.last_activity = now;
                self.phase = Phase::Paging {
                    acked: false,
                    page: page.iter().cloned().collect(),
                };
                self.page_no += 1;
                self.current_page = Some((self.page_no, page.clone()));
                out.push(Action::SubscribePage(self.page_no, page));
            }
            None => {
                self.phase = Phase::Idle;
                self.nonce.clear();
                let took = now.duration_since(self.started);
                if self.reason == "broker_dropped" {
                    self.gap = (self.gap * 2).clamp(MIN_GAP, MAX_GAP).max(took * 2);
                }
                self.next_allowed = now + self.gap;
                out.push(Action::Finished(Summary {
                    reason: self.reason,
                    by_wildcard: self.by_wildcard,
                    by_paging: self.by_paging,
                    unretained: self.missing - self.by_paging,
                    fence_lost: self.fence_lost,
                    took,
                }));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("d{i}")).collect()
    }

    fn finished(actions: &[Action]) -> Option<&Summary> {
        actions.iter().find_map(|a| match a {
            Action::Finished(s) => Some(s),
            _ => None,
        })
    }

    /// Start a connect re-read and return the fence payload.
    fn start(r: &mut Reread, now: Instant) -> String {
        r.connected(now);
        match r.wildcard_acked(now).as_slice() {
            [Action::PublishFence(n)] => n.clone(),
            other => panic!("no fence: {other:?}"),
        }
    }

    #[test]
    fn a_complete_wildcard_read_finishes_at_the_fence_without_paging() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        let fence = start(&mut r, t0);
        for d in ids(0..5) {
            assert!(r.state_arrived(&d, t0).is_empty());
        }
        let acts = r.fence_arrived(fence.as_bytes(), t0, || ids(0..5));
        let s = finished(&acts).expect("finished at the fence");
        assert_eq!((s.by_wildcard, s.by_paging, s.unretained), (5, 0, 0));
        assert!(!s.fence_lost);
        assert!(!r.running());
    }

    #[test]
    fn known_devices_the_wildcard_missed_are_read_page_by_page() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        let fence = start(&mut r, t0);
        // The broker dropped all but the first 10 of 250 known devices.
        for d in ids(0..10) {
            r.state_arrived(&d, t0);
        }
        let acts = r.fence_arrived(fence.as_bytes(), t0, || ids(0..250));
        let (n1, page1) = match acts.as_slice() {
            [Action::SubscribePage(n, p)] => (*n, p.clone()),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            page1,
            ids(10..110),
            "first page: the first PAGE missing devices"
        );
        // Messages before the page's SUBACK do not finish it.
        for d in &page1 {
            assert!(r.state_arrived(d, t0).is_empty());
        }
        let acts = r.page_acked(n1, t0);
        let n2 = match acts.as_slice() {
            [Action::UnsubscribePage(done), Action::SubscribePage(n, p)] => {
                assert_eq!(done, &page1);
                assert_eq!(p, &ids(110..210));
                *n
            }
            other => panic!("{other:?}"),
        };
        assert!(
            r.page_acked(n1, t0).is_empty(),
            "an old page's SUBACK is not the new page's"
        );
        r.page_acked(n2, t0);
        let mut last = Vec::new();
        for d in ids(110..210) {
            last = r.state_arrived(&d, t0);
        }
        let n3 = match last.as_slice() {
            [Action::UnsubscribePage(_), Action::SubscribePage(n, p)] => {
                assert_eq!(p, &ids(210..250));
                *n
            }
            other => panic!("{other:?}"),
        };
        r.page_acked(n3, t0);
        // Five of the last page have no retained report: the page ends on silence.
        for d in ids(210..245) {
            r.state_arrived(&d, t0);
        }
        assert!(r.tick(t0 + PAGE_IDLE / 2, Vec::new).is_empty());
        let acts = r.tick(t0 + PAGE_IDLE, Vec::new);
        let s = finished(&acts).expect("finished after the last page");
        assert_eq!((s.by_wildcard, s.by_paging, s.unretained), (10, 235, 5));
        assert!(matches!(acts[0], Action::UnsubscribePage(_)));
    }

    #[test]
    fn a_lost_fence_ends_the_wildcard_phase_on_silence() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        start(&mut r, t0);
        r.state_arrived("d0", t0);
        assert!(r.tick(t0 + WILDCARD_IDLE / 2, || ids(0..1)).is_empty());
        let acts = r.tick(t0 + WILDCARD_IDLE, || ids(0..1));
        let s = finished(&acts).expect("finished");
        assert!(s.fence_lost);
        assert_eq!(s.by_wildcard, 1);
    }

    #[test]
    fn a_fence_from_an_abandoned_read_is_ignored() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        let old = start(&mut r, t0);
        r.disconnected();
        assert!(!r.running());
        let new = start(&mut r, t0);
        assert_ne!(old, new);
        assert!(r.fence_arrived(old.as_bytes(), t0, Vec::new).is_empty());
        assert!(r.running());
        assert!(finished(&r.fence_arrived(new.as_bytes(), t0, Vec::new)).is_some());
    }

    #[test]
    fn growing_broker_drops_start_a_rate_limited_reread() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        let fence = start(&mut r, t0);
        assert_eq!(r.broker_dropped(7), 0, "the first reading is the baseline");
        finished(&r.fence_arrived(fence.as_bytes(), t0, Vec::new)).expect("done");
        assert!(r.tick(t0, Vec::new).is_empty(), "no drops, no re-read");
        assert_eq!(r.broker_dropped(7), 0);
        assert_eq!(r.broker_dropped(19), 12);
        // Not before the gap since the last re-read ended.
        assert!(r.tick(t0 + MIN_GAP / 2, Vec::new).is_empty());
        let t1 = t0 + MIN_GAP;
        assert_eq!(r.tick(t1, Vec::new), vec![Action::SubscribeWildcards]);
        match r.wildcard_acked(t1).as_slice() {
            [Action::PublishFence(_)] => {}
            other => panic!("{other:?}"),
        }
        let fence = r.nonce().to_owned();
        let s = finished(&r.fence_arrived(fence.as_bytes(), t1, Vec::new))
            .expect("done")
            .clone();
        assert_eq!(s.reason, "broker_dropped");
        // Drops keep coming: the pause doubles.
        r.broker_dropped(30);
        assert!(r.tick(t1 + MIN_GAP, Vec::new).is_empty());
        assert_eq!(
            r.tick(t1 + MIN_GAP * 2, Vec::new),
            vec![Action::SubscribeWildcards]
        );
    }

    #[test]
    fn a_restarted_broker_resets_the_drop_baseline() {
        let t0 = Instant::now();
        let mut r = Reread::new(t0);
        start(&mut r, t0);
        r.broker_dropped(500);
        r.disconnected();
        start(&mut r, t0);
        assert_eq!(r.broker_dropped(3), 0, "a new session reads a new baseline");
    }
}
