//! What became of one request, from its reply (JSON or original text) or
//! its absence.

use serde::Serialize;

use crate::protocol::{error_text, ErrorCode, Reply};

/// The final outcome of one stress request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Outcome {
    /// A successful reply.
    Ok,
    /// An error reply with this code.
    Error(ErrorCode),
    /// A text-format `Error: <reason>` reply: the original protocol does
    /// not say which code it was.
    OtherError,
    /// No reply before `--reply-timeout`.
    Lost,
}

impl Outcome {
    /// Every outcome, in the order the summary lists them.
    pub fn all() -> impl Iterator<Item = Outcome> {
        std::iter::once(Outcome::Ok)
            .chain(ErrorCode::ALL.into_iter().map(Outcome::Error))
            .chain([Outcome::OtherError, Outcome::Lost])
    }

    /// The name in the summary and the JSON output.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error(code) => code.as_str(),
            Outcome::OtherError => "other_error",
            Outcome::Lost => "lost",
        }
    }

    /// Whether a reply came back (whatever it said).
    pub fn answered(self) -> bool {
        self != Outcome::Lost
    }
}

/// Classifies a JSON reply. A reply that says `ok: false` without an error
/// object counts as [`Outcome::OtherError`].
pub fn classify_json(reply: &Reply) -> Outcome {
    match (&reply.error, reply.ok) {
        (_, true) => Outcome::Ok,
        (Some(e), false) => Outcome::Error(e.code),
        (None, false) => Outcome::OtherError,
    }
}

/// Classifies a text-format reply the way an original device would: the
/// daemon's three fixed strings map back to their codes, anything else
/// starting with `Error: ` is an unnamed error, the rest is an answer.
pub fn classify_text(text: &str) -> Outcome {
    for code in [
        ErrorCode::RateLimited,
        ErrorCode::SessionBusy,
        ErrorCode::Overloaded,
    ] {
        if let Some(fixed) = code.fixed_message() {
            if text == error_text(code, fixed) {
                return Outcome::Error(code);
            }
        }
    }
    if text.starts_with("Error: ") {
        Outcome::OtherError
    } else {
        Outcome::Ok
    }
}

/// Classifies a raw reply payload in the given format; a JSON-mode payload
/// that does not parse counts as [`Outcome::OtherError`].
pub fn classify_payload(payload: &[u8], json: bool) -> Outcome {
    if json {
        match serde_json::from_slice::<Reply>(payload) {
            Ok(r) => classify_json(&r),
            Err(_) => Outcome::OtherError,
        }
    } else {
        classify_text(&String::from_utf8_lossy(payload))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_replies_map_back_to_codes() {
        assert_eq!(
            classify_text("Error: Rate limit exceeded. Please slow down your requests."),
            Outcome::Error(ErrorCode::RateLimited)
        );
        assert_eq!(
            classify_text("Please wait, your previous message is still being processed..."),
            Outcome::Error(ErrorCode::SessionBusy)
        );
        assert_eq!(
            classify_text("Server is overloaded. Please try again in a moment."),
            Outcome::Error(ErrorCode::Overloaded)
        );
        assert_eq!(classify_text("Error: backend said no"), Outcome::OtherError);
        assert_eq!(classify_text("echo: hello"), Outcome::Ok);
        // A near miss is an answer, not an error.
        assert_eq!(classify_text("Server is overloaded."), Outcome::Ok);
    }

    #[test]
    fn json_replies() {
        let ok = br#"{"requestId":"r","sessionId":"s","ok":true,"text":"hi"}"#;
        let err = br#"{"requestId":"r","sessionId":"s","ok":false,"error":{"code":"overloaded","message":"m"}}"#;
        assert_eq!(classify_payload(ok, true), Outcome::Ok);
        assert_eq!(
            classify_payload(err, true),
            Outcome::Error(ErrorCode::Overloaded)
        );
        assert_eq!(classify_payload(b"plain", true), Outcome::OtherError);
        assert_eq!(
            classify_payload(br#"{"sessionId":"s","ok":false}"#, true),
            Outcome::OtherError
        );
    }

    #[test]
    fn labels_are_unique_and_cover_every_code() {
        let labels: std::collections::BTreeSet<_> = Outcome::all().map(Outcome::label).collect();
        assert_eq!(labels.len(), ErrorCode::ALL.len() + 3);
        assert!(labels.contains("backend_unavailable"));
        assert!(!Outcome::Lost.answered());
    }
}
