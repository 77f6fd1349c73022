//! Rule 1 of admission: parse and validate a payload into a [`Request`].
//!
//! Fields are read one by one from a JSON map (not derived with serde) so a
//! `bad_request` names the field at fault, unknown fields are ignored, and
//! the reply address is resolved from whatever parts of a bad request are
//! sound: an error reply reaches the device whenever a topic can be found.
//!
//! Payload classes:
//! - a JSON object: the protocol's request;
//! - other valid JSON (a string, a number, an array): plain text, taken
//!   whole as the message, as the original daemon did;
//! - text that starts like JSON (`{` or `[`) but does not parse: a broken
//!   request, `bad_request` (sending it to the model would only waste GPU);
//! - any other UTF-8 text: plain text.

use std::time::Duration;

use rand::Rng;
use serde_json::{Map, Value};
use vllm_chat::protocol::{
    default_reply_topic, is_valid_session_id, validate_reply_topic, ErrorCode, ReplyFormat,
    MAX_REQUEST_ID_BYTES,
};

use crate::config::ProjectConfig;
use crate::request::{Failure, Inbound, ReplyTo, Request, Sampling, SessionKey};

/// Longest `clientId` echoed back, in bytes.
const MAX_CLIENT_ID_BYTES: usize = 256;

/// Limits validation needs, resolved once per project.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_payload_bytes: usize,
    pub request_timeout: Duration,
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
    let project_name = &inbound.project;
    // The v5 Response Topic is usable for errors even before the payload is
    // read, if it is in the project's namespace.
    let v5_topic = inbound
        .response_topic
        .as_deref()
        .filter(|t| validate_reply_topic(project_name, t).is_ok());
    let early_reply = |format: ReplyFormat| {
        v5_topic.map(|t| ReplyTo {
            topic: t.to_owned(),
            format,
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

    let Some(map) = map else {
        // Plain text: the whole payload is the message.
        if text.trim().is_empty() {
            // No session to answer on: only a v5 Response Topic can carry it.
            return Err(Box::new(bad(
                early_reply(project.format),
                "message is empty",
            )));
        }
        let session_id = generated_session_id();
        let reply = ReplyTo {
            topic: v5_topic
                .map(str::to_owned)
                .unwrap_or_else(|| default_reply_topic(project_name, &session_id)),
            format: project.format,
            correlation: inbound.correlation.clone(),
            session_id,
            request_id: None,
            client_id: None,
        };
        // As for JSON requests: a refused Response Topic is a bad_request,
        // answered on the (generated) session's default topic.
        if let Some(Err(e)) = inbound
            .response_topic
            .as_deref()
            .map(|t| validate_reply_topic(project_name, t))
        {
            return Err(Box::new(bad(
                Some(reply),
                format!("Response Topic refused: {e}"),
            )));
        }
        return Ok(finish(
            inbound,
            project,
            limits,
            reply,
            text.to_owned(),
            None,
            None,
            None,
            None,
            false,
        ));
    };

    parse_object(inbound, project, limits, v5_topic, &map)
}

/// Parses a JSON-object request. Addressing fields come first so that a
/// later field's error can still be answered.
fn parse_object(
    inbound: &Inbound,
    project: &ProjectConfig,
    limits: &Limits,
    v5_topic: Option<&str>,
    map: &Map<String, Value>,
) -> Result<Request, Box<Invalid>> {
    let project_name = &inbound.project;
    let mut first_error: Option<String> = None;
    let mut fail = |msg: String| {
        if first_error.is_none() {
            first_error = Some(msg);
        }
    };

    let format = match map.get("format") {
        None | Some(Value::Null) => project.format,
        Some(Value::String(s)) if s == "text" => ReplyFormat::Text,
        Some(Value::String(s)) if s == "json" => ReplyFormat::Json,
        Some(_) => {
            fail("`format` must be \"text\" or \"json\"".into());
            project.format
        }
    };

    let session_id = match map.get("sessionId") {
        None | Some(Value::Null) => Some(generated_session_id()),
        Some(Value::String(s)) if is_valid_session_id(s) => Some(s.clone()),
        Some(Value::String(_)) => {
            fail("`sessionId` must be 1..128 bytes of [A-Za-z0-9_.:@-]".into());
            None
        }
        Some(_) => {
            fail("`sessionId` must be a string".into());
            None
        }
    };

    let request_id = match map.get("requestId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_REQUEST_ID_BYTES => {
            Some(s.clone())
        }
        Some(Value::String(_)) => {
            fail("`requestId` must be 1..128 bytes".into());
            None
        }
        Some(_) => {
            fail("`requestId` must be a string".into());
            None
        }
    };

    let client_id = match map.get("clientId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.len() <= MAX_CLIENT_ID_BYTES => Some(s.clone()),
        Some(Value::String(_)) => {
            fail("`clientId` must be at most 256 bytes".into());
            None
        }
        Some(_) => {
            fail("`clientId` must be a string".into());
            None
        }
    };

    // Reply topic resolution: v5 Response Topic, then `replyTopic`, then the
    // session's default topic. A chosen topic that breaks the rules is an
    // error answered on the default topic.
    let mut topic_error = None;
    if let Some(raw) = inbound.response_topic.as_deref() {
        if let Err(e) = validate_reply_topic(project_name, raw) {
            topic_error = Some(format!("Response Topic refused: {e}"));
        }
    }
    let payload_topic = match map.get("replyTopic") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => match validate_reply_topic(project_name, t) {
            Ok(()) => Some(t.as_str()),
            Err(e) => {
                topic_error.get_or_insert_with(|| format!("`replyTopic` refused: {e}"));
                None
            }
        },
        Some(_) => {
            topic_error.get_or_insert_with(|| "`replyTopic` must be a string".into());
            None
        }
    };
    let chosen = if topic_error.is_some() {
        None
    } else {
        v5_topic.or(payload_topic)
    };
    let topic = match (chosen, &session_id) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(s)) => Some(default_reply_topic(project_name, s)),
        // No usable session id: only a valid v5 topic can carry the error.
        (None, None) => v5_topic.map(str::to_owned),
    };
    let reply = topic.map(|topic| ReplyTo {
        topic,
        format,
        correlation: inbound.correlation.clone(),
        session_id: session_id.clone().unwrap_or_default(),
        request_id: request_id.clone(),
        client_id: client_id.clone(),
    });
    if let Some(e) = topic_error {
        fail(e);
    }

    let message = match map.get("message") {
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            fail("`message` is empty".into());
            None
        }
        None | Some(Value::Null) => {
            fail("`message` is required".into());
            None
        }
        Some(_) => {
            fail("`message` must be a string".into());
            None
        }
    };

    let temperature = match map.get("temperature") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(t) if (0.0..=2.0).contains(&t) => Some(t),
            _ => {
                fail("`temperature` must be a number in [0, 2]".into());
                None
            }
        },
    };
    let top_p = match map.get("topP") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_f64() {
            Some(p) if p > 0.0 && p <= 1.0 => Some(p),
            _ => {
                fail("`topP` must be a number in (0, 1]".into());
                None
            }
        },
    };
    let max_tokens = match map.get("maxTokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(project.max_tokens_limit) => Some(n as u32),
            _ => {
                fail(format!(
                    "`maxTokens` must be an integer in [1, {}]",
                    project.max_tokens_limit
                ));
                None
            }
        },
    };
    let system_prompt = match map.get("systemPrompt") {
        None | Some(Value::Null) => None,
        Some(Value::String(_)) if !project.allow_system_prompt => {
            fail("`systemPrompt` is not allowed for this project".into());
            None
        }
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            fail("`systemPrompt` must be a string".into());
            None
        }
    };
    let reset = match map.get("reset") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            fail("`reset` must be a boolean".into());
            false
        }
    };

    match (first_error, reply, message) {
        (None, Some(reply), Some(message)) => Ok(finish(
            inbound,
            project,
            limits,
            reply,
            message,
            temperature,
            top_p,
            max_tokens,
            system_prompt,
            reset,
        )),
        (err, reply, _) => Err(Box::new(bad(
            reply,
            err.unwrap_or_else(|| "request cannot be answered".into()),
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    inbound: &Inbound,
    project: &ProjectConfig,
    limits: &Limits,
    reply: ReplyTo,
    message: String,
    temperature: Option<f64>,
    top_p: Option<f64>,
    max_tokens: Option<u32>,
    system_prompt: Option<String>,
    reset: bool,
) -> Request {
    let timeout = match inbound.expiry {
        Some(e) => e.min(limits.request_timeout),
        None => limits.request_timeout,
    };
    Request {
        key: SessionKey {
            project: inbound.project.clone(),
            session: reply.session_id.clone().into_boxed_str(),
        },
        message: message.into(),
        sampling: Sampling {
            temperature: temperature.unwrap_or(project.temperature),
            top_p: top_p.unwrap_or(project.top_p),
            max_tokens: max_tokens.unwrap_or(project.max_tokens),
        },
        system_prompt,
        reset,
        reply,
        ack: inbound.ack,
        dup: inbound.dup,
        received_at: inbound.received_at,
        deadline: inbound.received_at + timeout,
    }
}

/// An [`Inbound`] for tests.
#[cfg(test)]
pub(crate) fn inbound(project: &str, payload: impl Into<bytes::Bytes>) -> Inbound {
    Inbound {
        project: project.into(),
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
        }
    }

    fn ok(payload: &str) -> Request {
        parse(
            &inbound("maze", payload.to_owned()),
            &ProjectConfig::default(),
            &limits(),
        )
        .unwrap()
    }

    fn err(i: Inbound) -> Invalid {
        *parse(&i, &ProjectConfig::default(), &limits()).unwrap_err()
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

    /// Every reply address the parser produces stays in the namespace.
    fn assert_safe_topic(topic: &str) {
        assert!(topic.starts_with(&reply_prefix("maze")), "{topic}");
        assert!(!topic.contains(['+', '#', '\0']), "{topic}");
        assert!(
            topic.len() <= MAX_REPLY_TOPIC_BYTES.max("maze/assistant_response/".len() + 128),
            "{topic}"
        );
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
            rt in prop::option::of(".{0,300}"),
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
        ]) {
            let ok = validate_reply_topic("maze", &topic).is_ok();
            let expected = topic.len() <= MAX_REPLY_TOPIC_BYTES
                && !topic.contains(['+', '#', '\0'])
                && topic.starts_with("maze/assistant_response/")
                && topic.len() > "maze/assistant_response/".len();
            prop_assert_eq!(ok, expected);
        }
    }
}
