//! Rule 1 of admission: parse and validate a payload into a [`Request`].
//!
//! A request object is read by a field cursor (`Fields`, after mini-redis's
//! `Parse`) into `RequestParts`, one line per protocol rule in
//! `parse_object`. Not serde derive: it stops at the first bad field, names
//! no rule a device can act on, and loses the sound fields with the bad one.
//! The cursor reads every field whatever the others hold, so a `bad_request`
//! names the field and the rule, unknown fields are ignored, and the reply
//! address is resolved from whatever parts of a bad request are sound: an
//! error reply reaches the device whenever a topic can be found.
//!
//! Payload classes:
//! - a JSON object: the protocol's request;
//! - other valid JSON (a string, a number, an array): plain text, taken
//!   whole as the message, as the original daemon did;
//! - text that starts like JSON (`{` or `[`) but does not parse: a broken
//!   request, `bad_request` (sending it to the model would only waste GPU);
//! - any other UTF-8 text: plain text.
//!
//! Plain text and requests without a `sessionId` get a generated
//! `default-<8 hex>` session.

use std::fmt::Display;
use std::ops::{Bound, RangeBounds, RangeInclusive};
use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use vllm_chat::protocol::{
    default_reply_topic, is_valid_session_id, reply_prefix, validate_reply_topic, ErrorCode,
    ReplyFormat, MAX_REQUEST_ID_BYTES,
};

use crate::admission::quota::Held;
use crate::config::ProjectConfig;
use crate::request::{Failure, Inbound, ReplyTo, Request, Sampling, SessionKey, StreamBy};

/// Longest `clientId` echoed back, in bytes.
const MAX_CLIENT_ID_BYTES: usize = 256;

/// Limits validation needs, resolved once per project.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub request_timeout: Duration,
    /// Longest `systemPrompt`, in bytes.
    pub max_system_prompt_bytes: usize,
}

/// A request that failed validation: the error, and where to send it if a
/// topic could be resolved at all.
#[derive(Debug)]
pub struct Invalid {
    pub reply: Option<ReplyTo>,
    pub failure: Failure,
}

fn bad(reply: Option<ReplyTo>, msg: impl Into<String>) -> Invalid {
    Invalid {
        reply,
        failure: Failure::new(ErrorCode::BadRequest, msg),
    }
}

fn generated_session_id() -> String {
    format!("default-{:08x}", rand::rng().random::<u32>())
}

/// Parses and validates `inbound` for `project`.
pub fn parse(
    inbound: &Inbound,
    project: &ProjectConfig,
    limits: &Limits,
) -> Result<Request, Box<Invalid>> {
    let scope = Scope::of(inbound);
    // The v5 Response Topic, checked first: a valid one can carry an error
    // even before the payload is read.
    let v5 = inbound
        .response_topic
        .as_deref()
        .map(|t| match scope.check(t) {
            Ok(()) => Ok(t),
            Err(e) => Err(FieldError(format!("Response Topic refused: {e}"))),
        })
        .transpose();
    let v5_topic = v5.clone().unwrap_or(None);
    let early_reply = |format: ReplyFormat| {
        v5_topic.map(|t| ReplyTo {
            topic: t.to_owned(),
            format,
            stream: None,
            seq: None,
            correlation: inbound.correlation.clone(),
            session_id: String::new(),
            request_id: None,
            client_id: None,
        })
    };

    if inbound.payload.len() > limits.max_payload_bytes {
        return Err(Box::new(bad(
            early_reply(project.format),
            format!(
                "payload is {} bytes, over the {}-byte limit",
                inbound.payload.len(),
                limits.max_payload_bytes
            ),
        )));
    }
    let Ok(text) = std::str::from_utf8(&inbound.payload) else {
        return Err(Box::new(bad(
            early_reply(project.format),
            "payload is not valid UTF-8",
        )));
    };

    let trimmed = text.trim_start();
    let map = if trimmed.starts_with('{') || trimmed.starts_with('[') {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Some(map),
            Ok(_) => None,
            Err(e) => {
                return Err(Box::new(bad(
                    early_reply(project.format),
                    format!("payload is not valid JSON: {e}"),
                )))
            }
        }
    } else {
        None
    };

    let (parts, error) = match &map {
        Some(map) => parse_object(map, project, &scope, v5, limits),
        // No session to answer on: only a v5 Response Topic can carry it.
        None if text.trim().is_empty() => {
            return Err(Box::new(bad(
                early_reply(project.format),
                "message is empty",
            )))
        }
        // Plain text: the whole payload is the message, on a generated
        // session; a refused Response Topic is a bad_request, as for objects.
        None => {
            let parts = RequestParts {
                session_id: Some(generated_session_id()),
                reply_topic: v5_topic,
                message: text,
                ephemeral: true,
                ..Default::default()
            };
            (parts, v5.err())
        }
    };
    let reply = parts.reply_to(inbound, &scope, project, v5_topic);
    match (error, reply) {
        (None, Some(reply)) => Ok(finish(inbound, project, limits, reply, parts)),
        (error, reply) => Err(Box::new(bad(
            reply,
            error.map_or_else(|| "request cannot be answered".into(), |e| e.0),
        ))),
    }
}

/// The protocol's request fields, one rule a line. They are read in this
/// order (addressing first) and the first one refused is the request's
/// error; a refused field reads as absent, so the address is still resolved
/// from the sound ones.
fn parse_object<'a>(
    map: &'a Map<String, Value>,
    project: &ProjectConfig,
    scope: &Scope<'_>,
    v5: Result<Option<&'a str>, FieldError>,
    limits: &Limits,
) -> (RequestParts<'a>, Option<FieldError>) {
    use Bound::{Excluded, Included};
    let formats = [("text", ReplyFormat::Text), ("json", ReplyFormat::Json)];
    let topic_rule = |t: &str| scope.check(t);
    let mut f = Fields::new(map);
    let parts = RequestParts {
        format: f.keep(f.opt_enum("format", &formats)),
        session_id: f.keep(
            f.opt_str_where("sessionId", SESSION_ID_RULE, is_valid_session_id)
                .map(or_generated),
        ),
        request_id: f.keep(f.opt_str("requestId", 1..=MAX_REQUEST_ID_BYTES)),
        client_id: f.keep(f.opt_str("clientId", 0..=MAX_CLIENT_ID_BYTES)),
        reply_topic: f.keep(v5_first(v5, f.opt_str_checked("replyTopic", topic_rule))),
        message: f.keep(f.text("message")),
        temperature: f.keep(f.opt_f64_in("temperature", 0.0..=2.0)),
        top_p: f.keep(f.opt_f64_in("topP", (Excluded(0.0), Included(1.0)))),
        max_tokens: f.keep(f.opt_u32_in("maxTokens", 1..=project.max_tokens_limit)),
        system_prompt: f.keep(f.opt_str_if(
            "systemPrompt",
            project.allow_system_prompt,
            limits.max_system_prompt_bytes,
        )),
        reset: f.keep(f.opt_bool("reset")),
        stream: {
            let by = [("time", StreamBy::Time), ("sentence", StreamBy::Sentence)];
            let on = f.keep(f.opt_bool("stream")).unwrap_or(false);
            let by = f.keep(f.opt_enum("streamBy", &by));
            on.then_some(by.unwrap_or(StreamBy::Time))
        },
        ephemeral: false,
    };
    (parts, f.first_error)
}

const SESSION_ID_RULE: &str = "1..128 bytes of [A-Za-z0-9_.:@-]";

/// A sound or absent `sessionId` as the session's id, generated when absent
/// (a refused one reads as `None`: it has no default topic).
fn or_generated(id: Option<&str>) -> Option<String> {
    Some(id.map_or_else(generated_session_id, str::to_owned))
}

/// The client-chosen reply topic: the v5 Response Topic wins over
/// `replyTopic`. If either is refused (the Response Topic's error first),
/// neither is used and the error is answered on the default topic.
fn v5_first<'a>(
    v5: Result<Option<&'a str>, FieldError>,
    payload: Result<Option<&'a str>, FieldError>,
) -> Result<Option<&'a str>, FieldError> {
    Ok(v5?.or(payload?))
}

/// What a request says, before the project's defaults: `None` is absent.
#[derive(Debug, Default)]
struct RequestParts<'a> {
    /// The project's format if absent.
    format: Option<ReplyFormat>,
    /// The session's id (generated if the request had none); `None` only if
    /// the request's was refused.
    session_id: Option<String>,
    request_id: Option<&'a str>,
    client_id: Option<&'a str>,
    /// The client-chosen reply topic, already checked.
    reply_topic: Option<&'a str>,
    /// Not blank, unless refused.
    message: &'a str,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    system_prompt: Option<&'a str>,
    reset: Option<bool>,
    /// v1.1 `stream` (with `streamBy`).
    stream: Option<StreamBy>,
    /// Plain text on a generated session: nothing of it is stored.
    ephemeral: bool,
}

impl RequestParts<'_> {
    /// Where to answer, from whatever parts are sound: the client-chosen
    /// topic, else the session's default topic, else (no sound session) a
    /// valid v5 Response Topic, else nowhere.
    fn reply_to(
        &self,
        inbound: &Inbound,
        scope: &Scope<'_>,
        project: &ProjectConfig,
        v5_topic: Option<&str>,
    ) -> Option<ReplyTo> {
        let topic = match (self.reply_topic, &self.session_id) {
            (Some(t), _) => t.to_owned(),
            // No control character or noncharacter (brokers drop a
            // connection that publishes one) comes in with the session: its
            // id is ASCII `[A-Za-z0-9_.:@-]` (`is_valid_session_id`, or
            // `default-<8 hex>`). The project name is the operator's,
            // checked when the configuration is validated; a device id is
            // checked by ingress (`is_valid_device_id`).
            (None, Some(session)) => scope.default_topic(session),
            (None, None) => v5_topic?.to_owned(),
        };
        Some(ReplyTo {
            topic,
            // A streamed answer is JSON whatever `format` says.
            format: match self.stream {
                Some(_) => ReplyFormat::Json,
                None => self.format.unwrap_or(project.format),
            },
            stream: self.stream,
            seq: None,
            correlation: inbound.correlation.clone(),
            session_id: self.session_id.clone().unwrap_or_default(),
            request_id: self.request_id.map(str::to_owned),
            client_id: self.client_id.map(str::to_owned),
        })
    }
}

/// The request, with the project's defaults for what `parts` leave out.
fn finish(
    inbound: &Inbound,
    project: &ProjectConfig,
    limits: &Limits,
    reply: ReplyTo,
    parts: RequestParts<'_>,
) -> Request {
    let timeout = match inbound.expiry {
        Some(e) => e.min(limits.request_timeout),
        None => limits.request_timeout,
    };
    Request {
        key: SessionKey {
            project: inbound.project.clone(),
            device: inbound.device.clone(),
            session: reply.session_id.clone().into_boxed_str(),
            ephemeral: parts.ephemeral,
        },
        message: parts.message.into(),
        sampling: Sampling {
            temperature: parts.temperature.unwrap_or(project.temperature),
            top_p: parts.top_p.unwrap_or(project.top_p),
            max_tokens: parts.max_tokens.unwrap_or(project.max_tokens),
        },
        system_prompt: parts.system_prompt.map(str::to_owned),
        reset: parts.reset.unwrap_or(false),
        reply,
        ack: inbound.ack,
        dup: inbound.dup,
        received_at: inbound.received_at,
        deadline: inbound.received_at + timeout,
        held: Held::default(),
        cancel: None,
    }
}

/// Where a request's replies may go: under `{project}/assistant_response/`,
/// or with a device identity under `{project}/assistant_response/{device}/`,
/// which the broker's ACL lets only that device read.
struct Scope<'a> {
    project: &'a str,
    device: Option<&'a str>,
}

impl<'a> Scope<'a> {
    fn of(inbound: &'a Inbound) -> Self {
        Self {
            project: &inbound.project,
            device: inbound.device.as_deref(),
        }
    }

    /// A client-chosen reply topic's rule.
    fn check(&self, topic: &str) -> Result<(), String> {
        validate_reply_topic(self.project, topic).map_err(|e| e.to_string())?;
        let Some(device) = self.device else {
            return Ok(());
        };
        let own = topic
            .strip_prefix(&reply_prefix(self.project))
            .and_then(|rest| rest.strip_prefix(device))
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|rest| !rest.is_empty());
        if own {
            Ok(())
        } else {
            Err(format!(
                "reply topic must start with {}{device}/ (this device's replies)",
                reply_prefix(self.project)
            ))
        }
    }

    fn default_topic(&self, session: &str) -> String {
        match self.device {
            Some(device) => default_reply_topic(self.project, &format!("{device}/{session}")),
            None => default_reply_topic(self.project, session),
        }
    }
}

/// A device id (the last level of `{project}/user_input/{deviceId}`) that
/// can head a reply topic: 1 to 128 bytes, no wildcard, separator, control
/// character or Unicode noncharacter (brokers drop a connection that
/// publishes one).
pub fn is_valid_device_id(project: &str, device: &str) -> bool {
    !device.is_empty()
        && device.len() <= 128
        && !device.contains('/')
        && validate_reply_topic(project, &default_reply_topic(project, device)).is_ok()
}

/// A field refused by its rule; the message names both, e.g.
/// "`temperature` must be a number in [0, 2]".
#[derive(Debug, Clone)]
struct FieldError(String);

impl FieldError {
    fn new(field: &str, rule: impl Display) -> Self {
        Self(format!("`{field}` {rule}"))
    }
}

/// A cursor over a request object's fields: each accessor reads one field
/// by one rule, `Ok(None)` when it is absent (`null` counts as absent).
/// Fields the protocol does not name are never looked at.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// The first field refused, in reading order: the request's error.
    first_error: Option<FieldError>,
}

impl<'a> Fields<'a> {
    fn new(map: &'a Map<String, Value>) -> Self {
        Self {
            map,
            first_error: None,
        }
    }

    /// `read`'s value; a refused field reads as absent (`T::default()`) and
    /// its error is kept if it is the first.
    fn keep<T: Default>(&mut self, read: Result<T, FieldError>) -> T {
        read.unwrap_or_else(|e| {
            self.first_error.get_or_insert(e);
            T::default()
        })
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A string.
    fn opt_string(&self, name: &str) -> Result<Option<&'a str>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(FieldError::new(name, "must be a string")),
        }
    }

    /// A string whose length in bytes is in `bytes`.
    fn opt_str(
        &self,
        name: &str,
        bytes: RangeInclusive<usize>,
    ) -> Result<Option<&'a str>, FieldError> {
        match self.opt_string(name)? {
            Some(s) if !bytes.contains(&s.len()) => Err(FieldError::new(
                name,
                match bytes.start() {
                    0 => format!("must be at most {} bytes", bytes.end()),
                    min => format!("must be {min}..{} bytes", bytes.end()),
                },
            )),
            s => Ok(s),
        }
    }

    /// A string `ok` accepts; `rule` says which ("must be {rule}").
    fn opt_str_where(
        &self,
        name: &str,
        rule: &str,
        ok: impl Fn(&str) -> bool,
    ) -> Result<Option<&'a str>, FieldError> {
        match self.opt_string(name)? {
            Some(s) if !ok(s) => Err(FieldError::new(name, format_args!("must be {rule}"))),
            s => Ok(s),
        }
    }

    /// A string `check` accepts; its error says why not ("refused: {e}").
    fn opt_str_checked<E: Display>(
        &self,
        name: &str,
        check: impl Fn(&str) -> Result<(), E>,
    ) -> Result<Option<&'a str>, FieldError> {
        match self.opt_string(name)? {
            Some(s) => match check(s) {
                Ok(()) => Ok(Some(s)),
                Err(e) => Err(FieldError::new(name, format_args!("refused: {e}"))),
            },
            None => Ok(None),
        }
    }

    /// A string, if the project allows the field at all.
    fn opt_str_if(
        &self,
        name: &str,
        allowed: bool,
        max_bytes: usize,
    ) -> Result<Option<&'a str>, FieldError> {
        match self.opt_string(name)? {
            Some(_) if !allowed => Err(FieldError::new(name, "is not allowed for this project")),
            Some(s) if s.len() > max_bytes => Err(FieldError::new(
                name,
                format!("must be at most {max_bytes} bytes"),
            )),
            s => Ok(s),
        }
    }

    /// A required string, not blank after trim.
    fn text(&self, name: &str) -> Result<&'a str, FieldError> {
        match self.opt_string(name)? {
            None => Err(FieldError::new(name, "is required")),
            Some(s) if s.trim().is_empty() => Err(FieldError::new(name, "is empty")),
            Some(s) => Ok(s),
        }
    }

    /// A number in `range`, e.g. `0.0..=2.0` or `(Excluded(0.0), Included(1.0))`.
    fn opt_f64_in(
        &self,
        name: &str,
        range: impl RangeBounds<f64>,
    ) -> Result<Option<f64>, FieldError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_f64() {
            Some(x) if range.contains(&x) => Ok(Some(x)),
            _ => Err(FieldError::new(
                name,
                format_args!("must be a number in {}", interval(&range)),
            )),
        }
    }

    /// An integer in `range`.
    fn opt_u32_in(
        &self,
        name: &str,
        range: RangeInclusive<u32>,
    ) -> Result<Option<u32>, FieldError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(n) if range.contains(&n) => Ok(Some(n)),
            _ => Err(FieldError::new(
                name,
                format_args!("must be an integer in [{}, {}]", range.start(), range.end()),
            )),
        }
    }

    /// A boolean.
    fn opt_bool(&self, name: &str) -> Result<Option<bool>, FieldError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(FieldError::new(name, "must be a boolean")),
        }
    }

    /// One of the names in `choices`, read as its value.
    fn opt_enum<T: Copy>(
        &self,
        name: &str,
        choices: &[(&str, T)],
    ) -> Result<Option<T>, FieldError> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        match v
            .as_str()
            .and_then(|s| choices.iter().find(|(n, _)| *n == s))
        {
            Some(&(_, value)) => Ok(Some(value)),
            None => Err(FieldError::new(
                name,
                format_args!("must be {}", one_of(choices)),
            )),
        }
    }
}

/// `[0, 2]`, `(0, 1]`: a range as the protocol writes it.
fn interval(range: &impl RangeBounds<f64>) -> String {
    let start = match range.start_bound() {
        Bound::Included(x) => format!("[{x}"),
        Bound::Excluded(x) => format!("({x}"),
        Bound::Unbounded => "(-inf".into(),
    };
    let end = match range.end_bound() {
        Bound::Included(x) => format!("{x}]"),
        Bound::Excluded(x) => format!("{x})"),
        Bound::Unbounded => "inf)".into(),
    };
    format!("{start}, {end}")
}

/// The names of `choices`: `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
fn one_of<T>(choices: &[(&str, T)]) -> String {
    let quoted: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
    match quoted.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// An [`Inbound`] for tests.
#[cfg(test)]
pub(crate) fn inbound(project: &str, payload: impl Into<bytes::Bytes>) -> Inbound {
    Inbound {
        project: project.into(),
        device: None,
        payload: payload.into(),
        response_topic: None,
        correlation: None,
        expiry: None,
        ack: None,
        dup: false,
        received_at: tokio::time::Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 1024,
            request_timeout: Duration::from_secs(120),
            max_system_prompt_bytes: 8192,
        }
    }

    /// A project that lets requests set their system prompt.
    fn trusting() -> ProjectConfig {
        ProjectConfig {
            allow_system_prompt: true,
            ..ProjectConfig::default()
        }
    }

    fn ok(payload: &str) -> Request {
        parse(&inbound("maze", payload.to_owned()), &trusting(), &limits()).unwrap()
    }

    fn err(i: Inbound) -> Invalid {
        *parse(&i, &trusting(), &limits()).unwrap_err()
    }

    fn err_of(payload: &str) -> Invalid {
        err(inbound("maze", payload.to_owned()))
    }

    #[tokio::test]
    async fn full_request() {
        let r = ok(
            r#"{"message":"hi","sessionId":"s1","requestId":"r1","clientId":"c","replyTopic":"maze/assistant_response/s1/c/r1","temperature":0,"topP":1,"maxTokens":5,"systemPrompt":"be brief","format":"json","reset":true,"extra":[1]}"#,
        );
        assert_eq!(&*r.message, "hi");
        assert_eq!(&*r.key.session, "s1");
        assert_eq!(r.reply.topic, "maze/assistant_response/s1/c/r1");
        assert_eq!(r.reply.format, ReplyFormat::Json);
        assert_eq!(r.reply.request_id.as_deref(), Some("r1"));
        assert_eq!(r.sampling.max_tokens, 5);
        assert_eq!(r.sampling.temperature, 0.0);
        assert!(r.reset);
        assert_eq!(r.system_prompt.as_deref(), Some("be brief"));
    }

    #[tokio::test]
    async fn plain_text_and_non_objects_are_messages() {
        let r = ok("hello robot");
        assert_eq!(&*r.message, "hello robot");
        assert!(r.key.session.starts_with("default-"));
        assert_eq!(
            r.reply.topic,
            format!("maze/assistant_response/{}", r.key.session)
        );
        assert_eq!(&*ok("\"quoted\"").message, "\"quoted\"");
        assert_eq!(&*ok("42").message, "42");
    }

    #[tokio::test]
    async fn bad_inputs_name_the_field_and_keep_the_address() {
        let e = err_of(r#"{"sessionId":"s1","message":"hi","temperature":"hot"}"#);
        assert!(e.failure.message.contains("temperature"));
        assert_eq!(e.reply.unwrap().topic, "maze/assistant_response/s1");

        let e = err_of(r#"{"sessionId":"s1","message":"  "}"#);
        assert!(e.failure.message.contains("empty"));

        let e = err_of(
            r#"{"sessionId":"s1","message":"hi","replyTopic":"other/assistant_response/x"}"#,
        );
        assert!(e.failure.message.contains("replyTopic"));
        assert_eq!(e.reply.unwrap().topic, "maze/assistant_response/s1");

        let e = err_of(r#"{"sessionId":"a/b","message":"hi"}"#);
        assert!(e.failure.message.contains("sessionId"));
        assert!(e.reply.is_none());

        let e = err_of(r#"{"sessionId":"s1","message":"hi","maxTokens":1.5}"#);
        assert!(e.failure.message.contains("maxTokens"));
        let e = err_of(r#"{"sessionId":"s1","message":"hi","maxTokens":-1}"#);
        assert!(e.failure.message.contains("maxTokens"));
        let e = err_of(r#"{"sessionId":"s1","message":"hi","topP":0}"#);
        assert!(e.failure.message.contains("topP"));
        let e = err_of(r#"{"sessionId":"s1","message":"hi","format":"xml"}"#);
        assert!(e.failure.message.contains("format"));
        let e = err_of(r#"{"sessionId":"s1"}"#);
        assert!(e.failure.message.contains("required"));
        let e = err_of(r#"{"message":"hi""#);
        assert!(e.failure.message.contains("not valid JSON"));
        assert!(e.reply.is_none());
        let deep = "[".repeat(1000);
        assert!(err_of(&deep).failure.message.contains("JSON"));
        assert_eq!(err_of("   ").failure.code, ErrorCode::BadRequest);
    }

    #[tokio::test]
    async fn size_and_utf8_limits() {
        let e = err_of(&"x".repeat(2000));
        assert!(e.failure.message.contains("limit"));
        let e = err(inbound("maze", vec![0xff, 0xfe]));
        assert!(e.failure.message.contains("UTF-8"));
    }

    #[tokio::test]
    async fn a_device_identity_scopes_the_session_and_the_reply_topics() {
        let mut i = inbound("maze", r#"{"message":"hi","sessionId":"s1"}"#);
        i.device = Some("robot-7".into());
        let r = parse(&i, &trusting(), &limits()).unwrap();
        assert_eq!(r.reply.topic, "maze/assistant_response/robot-7/s1");
        assert_eq!(r.key.device.as_deref(), Some("robot-7"));
        assert_eq!(r.key.to_string(), "maze/robot-7/s1");
        // Under its own namespace: accepted; another device's: refused and
        // answered on its own default topic.
        for (topic, ok) in [
            ("maze/assistant_response/robot-7/s1/x", true),
            ("maze/assistant_response/robot-7/", false),
            ("maze/assistant_response/robot-70/x", false),
            ("maze/assistant_response/robot-8/s1", false),
            ("maze/assistant_response/s1", false),
        ] {
            let mut i = inbound(
                "maze",
                format!(r#"{{"message":"hi","sessionId":"s1","replyTopic":"{topic}"}}"#),
            );
            i.device = Some("robot-7".into());
            match parse(&i, &trusting(), &limits()) {
                Ok(_) => assert!(ok, "{topic} accepted"),
                Err(e) => {
                    assert!(!ok, "{topic} refused: {}", e.failure.message);
                    assert_eq!(e.reply.unwrap().topic, "maze/assistant_response/robot-7/s1");
                }
            }
        }
        assert!(is_valid_device_id("maze", "robot-7"));
        for bad in ["", "a/b", "x\u{1}", "\u{ffff}", &"d".repeat(129)] {
            assert!(!is_valid_device_id("maze", bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn v5_response_topic_wins_and_is_checked() {
        let mut i = inbound(
            "maze",
            r#"{"message":"hi","sessionId":"s1","replyTopic":"maze/assistant_response/p"}"#,
        );
        i.response_topic = Some("maze/assistant_response/v5".into());
        i.correlation = Some(Bytes::from_static(b"corr"));
        let r = parse(&i, &ProjectConfig::default(), &limits()).unwrap();
        assert_eq!(r.reply.topic, "maze/assistant_response/v5");
        assert_eq!(r.reply.correlation.as_deref(), Some(&b"corr"[..]));

        i.response_topic = Some("$SYS/x".into());
        let e = err(i);
        assert!(e.failure.message.contains("Response Topic"));
        assert_eq!(e.reply.unwrap().topic, "maze/assistant_response/s1");

        // The same for a plain-text payload, on its generated session.
        let mut i = inbound("maze", "plain words");
        i.response_topic = Some("other/assistant_response/x".into());
        let e = err(i);
        assert!(e.failure.message.contains("Response Topic"));
        let to = e.reply.unwrap();
        assert!(
            to.topic.starts_with("maze/assistant_response/default-"),
            "{}",
            to.topic
        );
    }

    #[tokio::test]
    async fn expiry_shortens_the_deadline() {
        let mut i = inbound("maze", "hi");
        i.expiry = Some(Duration::from_secs(3));
        let r = parse(&i, &ProjectConfig::default(), &limits()).unwrap();
        assert_eq!(r.deadline - r.received_at, Duration::from_secs(3));
    }

    #[tokio::test]
    async fn system_prompt_switch() {
        let p = ProjectConfig {
            allow_system_prompt: false,
            ..Default::default()
        };
        let i = inbound(
            "maze",
            r#"{"message":"hi","sessionId":"s","systemPrompt":"x"}"#,
        );
        let e = parse(&i, &p, &limits()).unwrap_err();
        assert!(e.failure.message.contains("systemPrompt"));
        // Off unless the project says so.
        assert!(!ProjectConfig::default().allow_system_prompt);
        // Allowed, it is still capped.
        let long = "x".repeat(limits().max_system_prompt_bytes + 1);
        let i = inbound(
            "maze",
            format!(r#"{{"message":"hi","sessionId":"s","systemPrompt":"{long}"}}"#),
        );
        let roomy = Limits {
            max_payload_bytes: 64 * 1024,
            ..limits()
        };
        let e = parse(&i, &trusting(), &roomy).unwrap_err();
        assert!(
            e.failure.message.contains("at most 8192 bytes"),
            "{}",
            e.failure.message
        );
    }

    #[tokio::test]
    async fn plain_text_sessions_are_ephemeral_and_json_ones_are_not() {
        assert!(ok("hello robot").key.ephemeral);
        assert!(!ok(r#"{"message":"hi"}"#).key.ephemeral);
        assert!(!ok(r#"{"message":"hi","sessionId":"s"}"#).key.ephemeral);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use vllm_chat::protocol::{reply_prefix, MAX_REPLY_TOPIC_BYTES};

    fn limits() -> Limits {
        Limits {
            max_payload_bytes: 4096,
            request_timeout: Duration::from_secs(120),
            max_system_prompt_bytes: 8192,
        }
    }

    fn run(payload: Vec<u8>, response_topic: Option<String>) -> Result<Request, Box<Invalid>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut i = inbound("maze", payload);
            i.response_topic = response_topic;
            parse(&i, &ProjectConfig::default(), &limits())
        })
    }

    /// Every reply address the parser produces stays in the namespace and
    /// is one a broker accepts.
    fn assert_safe_topic(topic: &str) {
        assert!(topic.starts_with(&reply_prefix("maze")), "{topic}");
        assert!(!topic.contains(['+', '#', '\0']), "{topic}");
        assert!(!topic.contains(is_unprintable), "{topic:?}");
        assert!(
            topic.len() <= MAX_REPLY_TOPIC_BYTES.max("maze/assistant_response/".len() + 128),
            "{topic}"
        );
    }

    /// PROTOCOL.md v1.1, written out apart from `validate_reply_topic`:
    /// control characters (Cc) and Unicode noncharacters.
    fn is_unprintable(c: char) -> bool {
        let u = u32::from(c);
        u <= 0x1f
            || (0x7f..=0x9f).contains(&u)
            || (0xfdd0..=0xfdef).contains(&u)
            || [0xfffe, 0xffff].contains(&(u & 0xffff))
    }

    /// Mostly the edges of the forbidden ranges, where an off-by-one hides.
    fn unprintable_char() -> impl Strategy<Value = char> {
        let edges = vec![
            0x00, 0x01, 0x1f, 0x7f, 0x85, 0x9f, 0xfdd0, 0xfdef, 0xfffe, 0xffff, 0x1fffe, 0x10ffff,
        ];
        prop_oneof![
            3 => prop::sample::select(edges),
            1 => 0u32..=0x1f,
            1 => 0x7fu32..=0x9f,
            1 => 0xfdd0u32..=0xfdef,
            1 => (0u32..=0x10, 0xfffeu32..=0xffff).prop_map(|(plane, low)| plane << 16 | low),
        ]
        .prop_map(|u| char::from_u32(u).unwrap())
    }

    /// A reply topic in the namespace, now and then with one unprintable
    /// character in it.
    fn topic_like() -> impl Strategy<Value = String> {
        (
            r"[ -~\u{a0}-\u{2ff}]{0,20}",
            prop::option::of(unprintable_char()),
            "[a-z]{0,8}",
        )
            .prop_map(|(head, c, tail)| {
                let c = c.map(String::from).unwrap_or_default();
                format!("maze/assistant_response/{head}{c}{tail}")
            })
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            topic_like().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::hash_map(".{0,8}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic_and_replies_stay_in_namespace(
            payload in prop::collection::vec(any::<u8>(), 0..600),
            rt in prop::option::of(prop_oneof![".{0,300}", topic_like()]),
        ) {
            match run(payload, rt) {
                Ok(r) => assert_safe_topic(&r.reply.topic),
                Err(e) => {
                    prop_assert_eq!(e.failure.code, ErrorCode::BadRequest);
                    if let Some(to) = e.reply {
                        assert_safe_topic(&to.topic);
                    }
                }
            }
        }

        #[test]
        fn request_objects_with_arbitrary_fields(
            fields in prop::collection::hash_map(
                prop_oneof![
                    Just("message".to_owned()), Just("sessionId".to_owned()),
                    Just("requestId".to_owned()), Just("replyTopic".to_owned()),
                    Just("temperature".to_owned()), Just("topP".to_owned()),
                    Just("maxTokens".to_owned()), Just("format".to_owned()),
                    Just("reset".to_owned()), Just("systemPrompt".to_owned()),
                    ".{0,10}",
                ],
                json_value(),
                0..8,
            ),
        ) {
            let obj = serde_json::Value::Object(fields.into_iter().collect());
            match run(obj.to_string().into_bytes(), None) {
                Ok(r) => {
                    assert_safe_topic(&r.reply.topic);
                    prop_assert!(!r.message.trim().is_empty());
                    prop_assert!((0.0..=2.0).contains(&r.sampling.temperature));
                    prop_assert!(r.sampling.top_p > 0.0 && r.sampling.top_p <= 1.0);
                    prop_assert!(r.sampling.max_tokens >= 1);
                    prop_assert!(is_valid_session_id(&r.key.session));
                }
                Err(e) => {
                    prop_assert_eq!(e.failure.code, ErrorCode::BadRequest);
                    prop_assert!(!e.failure.message.is_empty());
                }
            }
        }

        #[test]
        fn valid_requests_round_trip(
            session in "[A-Za-z0-9_.:@-]{1,128}",
            request in "[ -~]{1,128}",
            // Not blank by `str::trim`: Unicode White_Space, as `\S` is.
            message in ".*\\S.*",
            temperature in 0.0f64..=2.0,
            max_tokens in 1u32..=4096,
        ) {
            let obj = serde_json::json!({
                "sessionId": session, "requestId": request, "message": message,
                "temperature": temperature, "maxTokens": max_tokens, "format": "json",
            });
            let r = run(obj.to_string().into_bytes(), None).map_err(|e| TestCaseError::fail(e.failure.message))?;
            prop_assert_eq!(&*r.key.session, session.as_str());
            prop_assert_eq!(r.reply.request_id.as_deref(), Some(request.as_str()));
            prop_assert_eq!(&*r.message, message.as_str());
            prop_assert_eq!(r.sampling.max_tokens, max_tokens);
            prop_assert_eq!(r.reply.topic, default_reply_topic("maze", &session));
        }

        #[test]
        fn reply_topic_validation_is_exact(topic in prop_oneof![
            ".{0,300}",
            "maze/assistant_response/.{0,260}",
            "maze/assistant_response/[a-z/+#]{0,12}",
            "(maze|mazes|general|\\$SYS)/(assistant_response|user_input)/?[a-z]{0,4}",
            topic_like(),
        ]) {
            let ok = validate_reply_topic("maze", &topic).is_ok();
            let expected = topic.len() <= MAX_REPLY_TOPIC_BYTES
                && !topic.contains(['+', '#', '\0'])
                && !topic.contains(is_unprintable)
                && topic.starts_with("maze/assistant_response/")
                && topic.len() > "maze/assistant_response/".len();
            prop_assert_eq!(ok, expected);
        }

        /// A chosen reply topic (v5 or `replyTopic`) with a control character
        /// or noncharacter is a bad_request, answered on the default topic.
        #[test]
        fn unprintable_reply_topics_are_refused(
            v5 in prop::option::of(topic_like()),
            reply_topic in prop::option::of(topic_like()),
        ) {
            let mut obj = serde_json::json!({"sessionId": "s1", "message": "hi"});
            if let Some(t) = &reply_topic {
                obj["replyTopic"] = t.as_str().into();
            }
            let unprintable = [&v5, &reply_topic]
                .into_iter()
                .flatten()
                .any(|t| t.contains(is_unprintable));
            match run(obj.to_string().into_bytes(), v5) {
                Ok(r) => {
                    prop_assert!(!unprintable, "{:?}", r.reply.topic);
                    assert_safe_topic(&r.reply.topic);
                }
                Err(e) => {
                    prop_assert_eq!(e.failure.code, ErrorCode::BadRequest);
                    let to = e.reply.expect("the session's default topic");
                    assert_safe_topic(&to.topic);
                    if unprintable {
                        prop_assert_eq!(to.topic, "maze/assistant_response/s1");
                        prop_assert!(e.failure.message.contains("refused"));
                    }
                }
            }
        }
    }
}
