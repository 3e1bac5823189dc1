//! A small `tracing` subscriber for the binary: text or JSON lines on stderr, filtered by a
//! spec like `info,ringcast_agent=debug`, with the fields of the enclosing spans (`device`,
//! `ring`, `rollout_id`, `release`) on every line, so grepping for a rollout id finds every
//! line of its download, verify, stage, activate, probation, commit or revert step.
//!
//! A field named by several enclosing spans is printed once, with the innermost span's value;
//! an event's own field of the same name wins over both (so a JSON line never repeats a key).
//!
//! Why not `tracing-subscriber`: the agent's 4 MB binary budget; swapping it for this module
//! saved 84 KB of the stripped binary (BENCHMARKS.md "Agent footprint").

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Which levels are shown: a default plus per-target-prefix overrides.
#[derive(Debug, Clone)]
pub struct Filter {
    default: Level,
    targets: Vec<(String, Level)>,
    off: bool,
}

fn parse_level(s: &str) -> Option<Option<Level>> {
    Some(Some(match s.trim().to_ascii_lowercase().as_str() {
        "trace" => Level::TRACE,
        "debug" => Level::DEBUG,
        "info" => Level::INFO,
        "warn" => Level::WARN,
        "error" => Level::ERROR,
        "off" => return Some(None),
        _ => return None,
    }))
}

impl Filter {
    /// Parse `level` or `level,target=level,…`; unknown parts are ignored.
    pub fn parse(spec: &str) -> Filter {
        let mut f = Filter {
            default: Level::INFO,
            targets: Vec::new(),
            off: false,
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((t, l)) => {
                    if let Some(Some(l)) = parse_level(l) {
                        f.targets.push((t.trim().to_owned(), l));
                    }
                }
                None => match parse_level(part) {
                    Some(Some(l)) => f.default = l,
                    Some(None) => f.off = true,
                    None => {}
                },
            }
        }
        // Longest prefix first, so the most specific rule wins.
        f.targets.sort_by_key(|t| std::cmp::Reverse(t.0.len()));
        f
    }

    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        let max = self
            .targets
            .iter()
            .find(|(t, _)| meta.target().starts_with(t.as_str()))
            .map(|(_, l)| *l);
        match max {
            Some(l) => *meta.level() <= l,
            None => !self.off && *meta.level() <= self.default,
        }
    }
}

/// The subscriber.
#[derive(Debug)]
pub struct Logger {
    filter: Filter,
    json: bool,
    next: AtomicU64,
    spans: Mutex<HashMap<u64, SpanData>>,
    sink: Sink,
}

/// Where lines go: stderr, or a writer (tests capture the output through it).
enum Sink {
    Stderr,
    Writer(Mutex<Box<dyn std::io::Write + Send>>),
}

/// An in-memory sink for [`Logger::with_writer`]: clones share one buffer, so tests and
/// simulators can read back what was logged.
#[derive(Debug, Clone, Default)]
pub struct Buffer(std::sync::Arc<Mutex<Vec<u8>>>);

impl Buffer {
    /// Everything written so far (invalid UTF-8 replaced).
    pub fn contents(&self) -> String {
        let b = self.0.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&b).into_owned()
    }
}

impl std::io::Write for Buffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut buf = self.0.lock().unwrap_or_else(|p| p.into_inner());
        buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sink::Stderr => "stderr",
            Sink::Writer(_) => "writer",
        })
    }
}

#[derive(Debug)]
struct SpanData {
    name: &'static str,
    fields: Vec<(&'static str, String)>,
    refs: usize,
}

thread_local! {
    static STACK: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

struct Fields<'a>(&'a mut Vec<(&'static str, String)>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push((field.name(), value.to_owned()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push((field.name(), format!("{value:?}")));
    }
}

fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

impl Logger {
    /// A logger with `filter`, writing JSON lines when `json`.
    pub fn new(filter: Filter, json: bool) -> Logger {
        Logger {
            filter,
            json,
            next: AtomicU64::new(1),
            spans: Mutex::new(HashMap::new()),
            sink: Sink::Stderr,
        }
    }

    /// Write lines to `w` instead of stderr.
    pub fn with_writer(mut self, w: impl std::io::Write + Send + 'static) -> Logger {
        self.sink = Sink::Writer(Mutex::new(Box::new(w)));
        self
    }

    /// Install as the global default (once per process).
    pub fn install(self) {
        let _ = tracing::subscriber::set_global_default(self);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SpanData>> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Subscriber for Logger {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        // Spans are always tracked so their fields reach enabled events.
        meta.is_span() || self.filter.enabled(meta)
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fields = Vec::new();
        attrs.record(&mut Fields(&mut fields));
        self.lock().insert(
            id,
            SpanData {
                name: attrs.metadata().name(),
                fields,
                refs: 1,
            },
        );
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(s) = self.lock().get_mut(&span.into_u64()) {
            values.record(&mut Fields(&mut s.fields));
        }
    }

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut fields = Vec::new();
        event.record(&mut Fields(&mut fields));
        let mut ctx: Vec<(&'static str, String)> = Vec::new();
        let mut names: Vec<&'static str> = Vec::new();
        STACK.with(|st| {
            let spans = self.lock();
            // Outermost first, so `device ring rollout_id …` keep a stable order; an inner
            // span's value replaces an outer one's (it is the more specific context).
            for id in st.borrow().iter() {
                if let Some(s) = spans.get(id) {
                    names.push(s.name);
                    for (k, v) in &s.fields {
                        match ctx.iter_mut().find(|(k2, _)| k2 == k) {
                            Some(slot) => slot.1.clone_from(v),
                            None => ctx.push((k, v.clone())),
                        }
                    }
                }
            }
        });
        ctx.retain(|(k, _)| !fields.iter().any(|(k2, _)| k2 == k));
        let now = jiff::Timestamp::now();
        let mut line = String::with_capacity(160);
        let message = fields
            .iter()
            .find(|(k, _)| *k == "message")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if self.json {
            let _ = write!(
                line,
                "{{\"timestamp\":\"{now}\",\"level\":\"{}\",\"target\":",
                meta.level()
            );
            json_str(&mut line, meta.target());
            line.push_str(",\"message\":");
            json_str(&mut line, message);
            for (k, v) in ctx
                .iter()
                .chain(fields.iter())
                .filter(|(k, _)| *k != "message")
            {
                line.push(',');
                json_str(&mut line, k);
                line.push(':');
                json_str(&mut line, v);
            }
            line.push('}');
        } else {
            let _ = write!(line, "{now} {:>5} ", meta.level());
            if !names.is_empty() {
                let _ = write!(line, "{}: ", names.join(":"));
            }
            let _ = write!(line, "{}: {message}", meta.target());
            for (k, v) in ctx
                .iter()
                .chain(fields.iter())
                .filter(|(k, _)| *k != "message")
            {
                let _ = write!(line, " {k}={v}");
            }
        }
        line.push('\n');
        match &self.sink {
            Sink::Stderr => {
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Writer(w) => {
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.write_all(line.as_bytes());
            }
        }
    }

    fn enter(&self, span: &Id) {
        STACK.with(|st| st.borrow_mut().push(span.into_u64()));
    }

    fn exit(&self, span: &Id) {
        let id = span.into_u64();
        STACK.with(|st| {
            let mut st = st.borrow_mut();
            if let Some(pos) = st.iter().rposition(|x| *x == id) {
                st.remove(pos);
            }
        });
    }

    fn clone_span(&self, id: &Id) -> Id {
        if let Some(s) = self.lock().get_mut(&id.into_u64()) {
            s.refs += 1;
        }
        id.clone()
    }

    fn try_close(&self, id: Id) -> bool {
        let mut spans = self.lock();
        let key = id.into_u64();
        let gone = match spans.get_mut(&key) {
            Some(s) => {
                s.refs = s.refs.saturating_sub(1);
                s.refs == 0
            }
            None => false,
        };
        if gone {
            spans.remove(&key);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_spec_picks_the_most_specific_rule() {
        let f = Filter::parse("warn,ringcast_agent=debug,ringcast_agent::transport=error");
        assert_eq!(f.default, Level::WARN);
        assert_eq!(f.targets[0].0, "ringcast_agent::transport");
        let f = Filter::parse("nonsense");
        assert_eq!(f.default, Level::INFO);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\nd\u{1}");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    /// Log the way the agent does: an `agent` span, a rollout step span around async work
    /// (instrumented, polled on a runtime), and lines inside it.
    fn log_a_step(json: bool) -> Vec<String> {
        let out = Buffer::default();
        let logger = Logger::new(Filter::parse("info"), json).with_writer(out.clone());
        tracing::subscriber::with_default(logger, || {
            use tracing::Instrument;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let agent = tracing::info_span!("agent", device = "dev-1", ring = "canary");
            let _a = agent.enter();
            let step = tracing::info_span!(
                "download",
                device = "dev-1",
                ring = "canary",
                rollout_id = "roll-7",
                release = "app@1.2.0"
            );
            rt.block_on(
                async {
                    tokio::task::yield_now().await;
                    tracing::info!(attempt = 1, "downloading");
                    // The event's own field replaces the span's, once.
                    tracing::info!(rollout_id = "roll-7", "event");
                }
                .instrument(step),
            );
            tracing::info!("outside the step");
        });
        out.contents().lines().map(str::to_owned).collect()
    }

    #[test]
    fn text_line_inside_a_rollout_step_carries_its_span_fields() {
        let lines = log_a_step(false);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        let l = &lines[0];
        assert!(l.contains("agent:download: "), "{l}");
        assert!(l.contains("downloading"), "{l}");
        for f in [
            "device=dev-1",
            "ring=canary",
            "rollout_id=roll-7",
            "release=app@1.2.0",
            "attempt=1",
        ] {
            assert!(l.contains(f), "{f} missing from {l}");
            assert_eq!(l.matches(f).count(), 1, "{f} repeated in {l}");
        }
        assert_eq!(lines[1].matches("rollout_id=").count(), 1, "{}", lines[1]);
        // Once the step is left, its fields are gone.
        assert!(!lines[2].contains("rollout_id"), "{}", lines[2]);
        assert!(lines[2].contains("ring=canary"), "{}", lines[2]);
    }

    #[test]
    fn json_line_inside_a_rollout_step_carries_its_span_fields_once() {
        let lines = log_a_step(true);
        assert_eq!(lines.len(), 3, "{lines:#?}");
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(v["message"], "downloading");
        assert_eq!(v["rollout_id"], "roll-7");
        assert_eq!(v["ring"], "canary");
        assert_eq!(v["device"], "dev-1");
        assert_eq!(v["release"], "app@1.2.0");
        for l in &lines[..2] {
            assert_eq!(l.matches("\"rollout_id\"").count(), 1, "{l}");
            assert_eq!(l.matches("\"ring\"").count(), 1, "{l}");
        }
        let outside: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
        assert!(outside.get("rollout_id").is_none(), "{outside}");
    }
}
