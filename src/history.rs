//! Conversation history: which past turns go into the next prompt.
//!
//! The store keeps at most `history_messages` messages per session; this
//! module picks, newest first, as many as fit the token budget beside the
//! system prompt and the new message. Tokens are estimated as bytes / 4
//! (close enough for English with BPE tokenizers, and free to compute); a
//! context-length refusal from the backend is the backstop, answered by
//! [`shrink`] and one retry.

use std::collections::VecDeque;
use std::sync::Arc;

/// Who said it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation. The text is shared (`Arc<str>`): a
/// prompt is built from the stored history for every request, and copying
/// a pointer beats copying every past message each time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: Arc<str>,
}

impl Turn {
    pub fn new(role: Role, content: impl Into<Arc<str>>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Estimated tokens of a text.
pub fn estimate_tokens(text: &str) -> usize {
    text.len().div_ceil(4) + 1
}

/// Appends a user/assistant exchange, keeping at most `max_messages`
/// messages (whole exchanges are dropped from the front).
pub fn push_exchange(
    history: &mut VecDeque<Turn>,
    user: impl Into<Arc<str>>,
    assistant: impl Into<Arc<str>>,
    max_messages: usize,
) {
    history.push_back(Turn::new(Role::User, user));
    history.push_back(Turn::new(Role::Assistant, assistant));
    while history.len() > max_messages {
        history.pop_front();
        // Never start with an assistant message.
        if history.front().is_some_and(|t| t.role == Role::Assistant) {
            history.pop_front();
        }
    }
}

/// The prompt for a new message: system prompt, the newest history that
/// fits `budget` tokens, then the message. The system prompt and the new
/// message are always included.
pub fn build_prompt(
    system: &str,
    history: &[Turn],
    message: &Arc<str>,
    budget: usize,
) -> Vec<Turn> {
    let mut used = estimate_tokens(system) + estimate_tokens(message);
    let mut start = history.len();
    while start > 0 {
        let t = &history[start - 1];
        let cost = estimate_tokens(&t.content);
        if used + cost > budget {
            break;
        }
        used += cost;
        start -= 1;
    }
    // Start the kept history on a user message.
    while start < history.len() && history[start].role != Role::User {
        start += 1;
    }
    let mut out = Vec::with_capacity(history.len() - start + 2);
    if !system.is_empty() {
        out.push(Turn::new(Role::System, system));
    }
    out.extend_from_slice(&history[start..]);
    out.push(Turn::new(Role::User, message.clone()));
    out
}

/// After a context-length refusal: drop the older half of the history in
/// `prompt` (keeping the system prompt and the new message). Returns `false`
/// if there was no history left to drop.
pub fn shrink(prompt: &mut Vec<Turn>) -> bool {
    let first = usize::from(prompt.first().is_some_and(|t| t.role == Role::System));
    let last = prompt.len().saturating_sub(1);
    let hist = last.saturating_sub(first);
    if hist == 0 {
        return false;
    }
    let mut drop = hist.div_ceil(2);
    // Keep the remaining history starting on a user message.
    while first + drop < last && prompt[first + drop].role != Role::User {
        drop += 1;
    }
    prompt.drain(first..first + drop);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(n: usize) -> Vec<Turn> {
        (0..n)
            .map(|i| {
                let role = if i % 2 == 0 {
                    Role::User
                } else {
                    Role::Assistant
                };
                Turn::new(role, format!("m{i}"))
            })
            .collect()
    }

    #[test]
    fn keeps_at_most_max_messages() {
        let mut h = VecDeque::new();
        for i in 0..15 {
            push_exchange(&mut h, format!("u{i}"), format!("a{i}"), 20);
        }
        assert_eq!(h.len(), 20);
        assert_eq!(&*h[0].content, "u5");
        assert_eq!(h[0].role, Role::User);
    }

    #[test]
    fn budget_keeps_newest_whole_exchanges() {
        let h = hist(10);
        let all = build_prompt("sys", &h, &Arc::from("new"), 10_000);
        assert_eq!(all.len(), 12);
        assert_eq!(all[0].role, Role::System);
        assert_eq!(&*all.last().unwrap().content, "new");
        // Budget for system + message + 3 history messages -> 2 (one exchange).
        let per = estimate_tokens("m0");
        let budget = estimate_tokens("sys") + estimate_tokens("new") + 3 * per;
        let p = build_prompt("sys", &h, &Arc::from("new"), budget);
        assert_eq!(p.len(), 4);
        assert_eq!(&*p[1].content, "m8");
        assert_eq!(p[1].role, Role::User);
    }

    #[test]
    fn shrink_drops_older_half_then_stops() {
        let mut p = build_prompt("sys", &hist(8), &Arc::from("new"), 10_000);
        assert!(shrink(&mut p));
        assert_eq!(p.len(), 6);
        assert_eq!(&*p[1].content, "m4");
        while shrink(&mut p) {}
        assert_eq!(p.len(), 2);
        assert!(!shrink(&mut p));
    }
}
