//! A small `tracing` subscriber for the binary: text or JSON lines on stderr, filtered by a
//! spec like `info,ringcast_agent=debug`, with the fields of the enclosing spans (`device`,
//! `ring`, `rollout_id`) on every line.
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
        }
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
            for id in st.borrow().iter() {
                if let Some(s) = spans.get(id) {
                    names.push(s.name);
                    for (k, v) in &s.fields {
                        if !ctx.iter().any(|(k2, _)| k2 == k) {
                            ctx.push((k, v.clone()));
                        }
                    }
                }
            }
        });
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
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
}
