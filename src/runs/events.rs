//! A run's posts, numbered by one `seq` over every kind (retries and display
//! posts included), to the callback through the outbox or as lines of a live
//! NDJSON answer. The first closing post (`complete` or `error`) is the last:
//! anything emitted after it is dropped.
//!
//! Shared (behind a mutex) by the run thread and [`super::Runs::display`],
//! so a display post of a running session takes its place in the same order.

use crate::delivery::outbox::{Record, Stream};
use crate::text;
use crate::workspace::git::Change;
use crossbeam_channel::Sender;
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// One post of a run.
pub enum Kind<'a> {
    /// A piece of the agent's message text (or a raw line of a `command` agent).
    Output(&'a str),
    /// An ACP update other than message text (projects with `"events": true`).
    Event(&'a Value),
    /// A display URL set (or cleared, "") by the agent's MCP server; its token.
    Display {
        url: &'a str,
        token: &'a str,
    },
    Complete {
        summary: &'a str,
        changed: &'a [Change],
    },
    Error(&'a str),
}

impl Kind<'_> {
    fn name(&self) -> &'static str {
        match self {
            Kind::Output(_) => "output",
            Kind::Event(_) => "event",
            Kind::Display { .. } => "display",
            Kind::Complete { .. } => "complete",
            Kind::Error(_) => "error",
        }
    }

    fn path(&self) -> &'static str {
        match self {
            Kind::Output(_) => "/internal/agent-stream",
            Kind::Event(_) => "/internal/agent-event",
            Kind::Display { .. } => "/internal/agent-display",
            Kind::Complete { .. } => "/internal/agent-complete",
            Kind::Error(_) => "/internal/agent-error",
        }
    }

    fn closes(&self) -> bool {
        matches!(self, Kind::Complete { .. } | Kind::Error(_))
    }
}

/// A body in the Node connector's key order, `seq` last (`type` first in a live stream).
struct Body<'a> {
    live: bool,
    /// Without `token` (the run history's copy).
    tokenless: bool,
    kind: &'a Kind<'a>,
    session: &'a str,
    token: &'a str,
    seq: u64,
}

impl Serialize for Body<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        if self.live {
            m.serialize_entry("type", self.kind.name())?;
        }
        match self.kind {
            Kind::Display { url, token } => {
                m.serialize_entry("url", url)?;
                if !self.tokenless {
                    m.serialize_entry("token", token)?;
                }
                m.serialize_entry("sessionId", self.session)?;
                m.serialize_entry("seq", &self.seq)?;
                return m.end();
            }
            Kind::Output(text) => {
                m.serialize_entry("sessionId", self.session)?;
                m.serialize_entry("text", text)?;
            }
            Kind::Event(event) => {
                m.serialize_entry("sessionId", self.session)?;
                m.serialize_entry("event", event)?;
            }
            Kind::Complete { summary, changed } => {
                m.serialize_entry("sessionId", self.session)?;
                m.serialize_entry("summary", summary)?;
                m.serialize_entry("changed", changed)?;
            }
            Kind::Error(message) => {
                m.serialize_entry("sessionId", self.session)?;
                m.serialize_entry("error", message)?;
            }
        }
        if !self.tokenless {
            m.serialize_entry("token", self.token)?;
        }
        m.serialize_entry("seq", &self.seq)?;
        m.end()
    }
}

/// The body of a display post outside any run's stream, as the Node
/// connector's MCP server sends it: `{"url","token","sessionId"}` (no `seq`:
/// it is no post of a run).
pub fn display_body(url: &str, token: &str, session: &str) -> String {
    #[derive(serde::Serialize)]
    struct Display<'a> {
        url: &'a str,
        token: &'a str,
        #[serde(rename = "sessionId")]
        session: &'a str,
    }
    serde_json::to_string(&Display { url, token, session }).expect("a body serializes")
}

/// Where a run's posts go.
pub enum Sink {
    Outbox(Stream),
    /// The live NDJSON answer; the connection thread owns the receiver.
    Live(Sender<Vec<u8>>),
    Nowhere,
}

pub struct Events {
    sink: Sink,
    seq: u64,
    session: String,
    token: String,
    /// The project id: names the signing key.
    key: String,
    /// The callback base URL, without a trailing slash ("" without one).
    base: String,
    closed: bool,
    /// Values replaced by `[redacted]` in every post (see [`text::redact`]).
    secrets: Vec<String>,
    /// The end of the text posted last that could be the start of a secret
    /// (see [`text::held_tail`]): posted with the next piece, or alone
    /// before any other post.
    held: String,
    /// The run history's copy of each post (None: not kept).
    history: Option<super::history::Recorder>,
}

/// `v` with each string (keys kept) redacted.
fn redact_value(v: &Value, secrets: &[String]) -> Value {
    match v {
        Value::String(s) => Value::String(text::redact(s, secrets).into_owned()),
        Value::Array(items) => Value::Array(items.iter().map(|i| redact_value(i, secrets)).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), redact_value(v, secrets))).collect())
        }
        other => other.clone(),
    }
}

impl Events {
    pub fn new(sink: Sink, session: &str, token: &str, key: &str, base: &str) -> Events {
        Events {
            sink,
            seq: 0,
            session: session.to_string(),
            token: token.to_string(),
            key: key.to_string(),
            base: base.to_string(),
            closed: false,
            secrets: Vec::new(),
            held: String::new(),
            history: None,
        }
    }

    /// Redacts `secrets` (from [`text::secrets`]) in every post: the text,
    /// events, summary and error of a run (and so in the run history). A
    /// secret split across text pieces is caught too: the end of a piece that
    /// could begin a secret is held back until the next piece (or until any
    /// other post, before which it goes alone); text that cannot is posted
    /// at once.
    pub fn redacting(mut self, secrets: Vec<String>) -> Events {
        self.secrets = secrets;
        self
    }

    /// `text` as a post or a log line may show it.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        text::redact(text, &self.secrets)
    }

    /// Keeps a copy of each post from now on in the run history.
    pub fn record(&mut self, recorder: super::history::Recorder) {
        self.history = Some(recorder);
    }

    /// The history's recorder, once the run is over (to close its file).
    pub fn take_history(&mut self) -> Option<super::history::Recorder> {
        self.history.take()
    }

    /// Posts emitted so far.
    pub fn posts(&self) -> u64 {
        self.seq
    }

    /// Whether the posts go to a callback through the outbox.
    pub fn to_outbox(&self) -> bool {
        matches!(self.sink, Sink::Outbox(_))
    }

    /// Whether the closing post has been emitted.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// Whether a display post for `callback` belongs in this stream: it is
    /// open, and it goes to that callback (or to a live answer).
    pub fn takes_display(&self, callback: &str) -> bool {
        !self.closed
            && match self.sink {
                Sink::Outbox(_) => !self.base.is_empty() && self.base == callback.trim_end_matches('/'),
                Sink::Live(_) => true,
                Sink::Nowhere => false,
            }
    }

    /// Emits one post with the next `seq`; nothing once the run is closed.
    /// Text that could begin a secret waits for what follows (see
    /// [`Events::redacting`]).
    pub fn emit(&mut self, kind: Kind<'_>) {
        if self.closed {
            return;
        }
        if self.secrets.is_empty() {
            return self.send(kind);
        }
        if let Kind::Output(t) = kind {
            if self.held.is_empty() {
                // Nothing waits: cut the piece itself, copying only its held end.
                let cut = text::held_tail(t, &self.secrets);
                self.held.push_str(&t[cut..]);
                if cut > 0 {
                    let redacted = self.redact(&t[..cut]);
                    self.send(Kind::Output(&redacted));
                }
                return;
            }
            let mut text = std::mem::take(&mut self.held);
            text.push_str(t);
            let cut = text::held_tail(&text, &self.secrets);
            self.held = text.split_off(cut);
            if !text.is_empty() {
                let redacted = self.redact(&text);
                self.send(Kind::Output(&redacted));
            }
            return;
        }
        self.flush();
        self.send(kind);
    }

    /// Posts the held text, if any.
    fn flush(&mut self) {
        if !self.held.is_empty() {
            let text = std::mem::take(&mut self.held);
            let redacted = self.redact(&text);
            self.send(Kind::Output(&redacted));
        }
    }

    /// Posts `kind` (redacted, but for text, which comes redacted) with the next `seq`.
    fn send(&mut self, kind: Kind<'_>) {
        self.closed = kind.closes();
        let redacted;
        let event;
        let kind = if self.secrets.is_empty() {
            kind
        } else {
            match kind {
                text @ Kind::Output(_) => text,
                Kind::Event(v) => {
                    event = redact_value(v, &self.secrets);
                    Kind::Event(&event)
                }
                Kind::Complete { summary, changed } => {
                    redacted = self.redact(summary).into_owned();
                    Kind::Complete { summary: &redacted, changed }
                }
                Kind::Error(m) => {
                    redacted = self.redact(m).into_owned();
                    Kind::Error(&redacted)
                }
                display @ Kind::Display { .. } => display,
            }
        };
        let seq = self.seq;
        self.seq += 1;
        if let Some(h) = &mut self.history {
            let body =
                Body { live: true, tokenless: true, kind: &kind, session: &self.session, token: "", seq };
            h.post(&serde_json::to_vec(&body).expect("a body serializes"));
        }
        match &mut self.sink {
            Sink::Outbox(stream) => {
                let body = Body {
                    live: false,
                    tokenless: false,
                    kind: &kind,
                    session: &self.session,
                    token: &self.token,
                    seq,
                };
                let record = Record {
                    url: format!("{}{}", self.base, kind.path()),
                    key: self.key.clone(),
                    seq,
                    last: kind.closes(),
                    body: serde_json::to_string(&body).expect("a body serializes"),
                };
                stream.push(&record);
            }
            Sink::Live(tx) => {
                let body = Body {
                    live: true,
                    tokenless: false,
                    kind: &kind,
                    session: &self.session,
                    token: &self.token,
                    seq,
                };
                let mut line = serde_json::to_vec(&body).expect("a body serializes");
                line.push(b'\n');
                if tx.send(line).is_err() {
                    // The client went away; the run goes on, unwatched.
                    self.sink = Sink::Nowhere;
                }
            }
            Sink::Nowhere => {}
        }
    }

    pub fn output(&mut self, text: &str) {
        self.emit(Kind::Output(text));
    }

    pub fn complete(&mut self, summary: &str, changed: &[Change]) {
        self.emit(Kind::Complete { summary, changed });
    }

    pub fn error(&mut self, message: &str) {
        self.emit(Kind::Error(message));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn live() -> (Events, crossbeam_channel::Receiver<Vec<u8>>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Events::new(Sink::Live(tx), "s", "t", "p", ""), rx)
    }

    #[test]
    fn one_seq_over_every_kind_and_nothing_after_the_close() {
        let (mut ev, rx) = live();
        ev.output("a");
        ev.emit(Kind::Event(&json!({"sessionUpdate": "plan"})));
        ev.emit(Kind::Display { url: "https://x", token: "t2" });
        ev.complete("a", &[]);
        ev.error("late");
        ev.output("late");
        let lines: Vec<String> = rx.try_iter().map(|l| String::from_utf8(l).unwrap()).collect();
        assert_eq!(
            lines,
            [
                "{\"type\":\"output\",\"sessionId\":\"s\",\"text\":\"a\",\"token\":\"t\",\"seq\":0}\n",
                "{\"type\":\"event\",\"sessionId\":\"s\",\"event\":{\"sessionUpdate\":\"plan\"},\"token\":\"t\",\"seq\":1}\n",
                "{\"type\":\"display\",\"url\":\"https://x\",\"token\":\"t2\",\"sessionId\":\"s\",\"seq\":2}\n",
                "{\"type\":\"complete\",\"sessionId\":\"s\",\"summary\":\"a\",\"changed\":[],\"token\":\"t\",\"seq\":3}\n",
            ]
        );
        assert!(ev.closed() && !ev.takes_display(""));
    }

    #[test]
    fn a_held_tail_keeps_its_place_and_goes_before_the_close() {
        let (ev, rx) = live();
        let mut ev = ev.redacting(text::secrets(["sk-live-1234"]));
        ev.output("a sk-li");
        ev.output("ve-1234 b sk");
        ev.emit(Kind::Event(&json!({"title": "sk-live-1234"})));
        ev.output("c s");
        ev.complete("done", &[]);
        let posts: Vec<Value> = rx.try_iter().map(|l| serde_json::from_slice(&l).unwrap()).collect();
        let got: Vec<String> = posts
            .iter()
            .map(|p| {
                format!("{}:{}:{}", p["seq"], p["type"].as_str().unwrap(), p["text"].as_str().unwrap_or(""))
            })
            .collect();
        assert_eq!(
            got,
            [
                "0:output:a ",
                "1:output:[redacted] b ",
                "2:output:sk",
                "3:event:",
                "4:output:c ",
                "5:output:s",
                "6:complete:"
            ]
        );
        assert_eq!(posts[3]["event"]["title"], "[redacted]");
    }
}
