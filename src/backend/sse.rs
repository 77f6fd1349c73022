//! A minimal incremental parser for server-sent events, enough for
//! OpenAI-style streams: events separated by a blank line, `data:` lines
//! joined with newlines, comments and other fields ignored.
//!
//! It looks at each byte once: complete lines are consumed as they arrive
//! and only the unfinished line is kept, so a chunk holding many events
//! costs time linear in its size (the first version rescanned the buffer
//! for every event, which dominated the daemon's CPU profile).

/// Feeds bytes in, gets complete events' data out.
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line, not yet ended by `\n`.
    line: Vec<u8>,
    /// `data:` of the current event so far (reused between events).
    data: String,
    has_data: bool,
}

/// Largest event we accept, so a server that never sends a blank line
/// cannot grow our memory without bound.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

impl SseParser {
    /// Appends `chunk` and calls `on_event` with the data of every event it
    /// completes, in order, until `on_event` returns `Ok(false)` (stop:
    /// the rest of the chunk is ignored) or an error. Fails if an event
    /// grows past [`MAX_EVENT_BYTES`] or is not UTF-8.
    pub fn push<E>(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(&str) -> Result<bool, E>,
    ) -> Result<bool, SseError<E>> {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (head, tail) = rest.split_at(nl);
            rest = &tail[1..];
            let go = if self.line.is_empty() {
                self.line_done(head, &mut on_event)?
            } else {
                self.line.extend_from_slice(head);
                let line = std::mem::take(&mut self.line);
                let go = self.line_done(&line, &mut on_event);
                // Keep the allocation for the next partial line.
                self.line = line;
                self.line.clear();
                go?
            };
            if !go {
                return Ok(false);
            }
        }
        self.line.extend_from_slice(rest);
        if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(true)
    }

    fn line_done<E>(
        &mut self,
        line: &[u8],
        on_event: &mut impl FnMut(&str) -> Result<bool, E>,
    ) -> Result<bool, SseError<E>> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            // A blank line ends the event.
            if !std::mem::take(&mut self.has_data) {
                return Ok(true);
            }
            let go = on_event(&self.data).map_err(SseError::Handler)?;
            self.data.clear();
            return Ok(go);
        }
        if let Some(v) = line.strip_prefix(b"data:") {
            let v = v.strip_prefix(b" ").unwrap_or(v);
            let v = std::str::from_utf8(v).map_err(|_| SseError::NotUtf8)?;
            if self.has_data {
                self.data.push('\n');
            }
            self.data.push_str(v);
            self.has_data = true;
            if self.data.len() > MAX_EVENT_BYTES {
                return Err(SseError::TooLarge);
            }
        }
        Ok(true)
    }
}

/// Why a stream could not be parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum SseError<E> {
    TooLarge,
    NotUtf8,
    /// The event handler's own error.
    Handler(E),
}

impl<E: std::fmt::Display> std::fmt::Display for SseError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SseError::TooLarge => write!(f, "an event exceeded {MAX_EVENT_BYTES} bytes"),
            SseError::NotUtf8 => f.write_str("event is not valid UTF-8"),
            SseError::Handler(e) => e.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(p: &mut SseParser, chunk: &[u8]) -> Result<Vec<String>, SseError<()>> {
        let mut out = Vec::new();
        p.push(chunk, |d| {
            out.push(d.to_owned());
            Ok::<_, ()>(true)
        })?;
        Ok(out)
    }

    #[test]
    fn events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(events(&mut p, b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(events(&mut p, b":1}\n\nda").unwrap(), vec!["{\"a\":1}"]);
        assert_eq!(
            events(&mut p, b"ta: [DONE]\r\n\r\n: comment\n\n").unwrap(),
            vec!["[DONE]"]
        );
        assert_eq!(
            events(&mut p, b"data: a\ndata: b\n\n").unwrap(),
            vec!["a\nb"]
        );
        // Split inside "\r\n" and between the two newlines.
        assert!(events(&mut p, b"data: x\r").unwrap().is_empty());
        assert!(events(&mut p, b"\n").unwrap().is_empty());
        assert_eq!(events(&mut p, b"\n").unwrap(), vec!["x"]);
        // An empty data line is an event with empty data.
        assert_eq!(events(&mut p, b"data:\n\n").unwrap(), vec![""]);
    }

    #[test]
    fn many_events_in_one_chunk_and_stopping() {
        let mut p = SseParser::default();
        let chunk: Vec<u8> = (0..1000)
            .flat_map(|i| format!("data: {i}\n\n").into_bytes())
            .collect();
        let got = events(&mut p, &chunk).unwrap();
        assert_eq!(got.len(), 1000);
        assert_eq!(got[999], "999");
        let mut seen = 0;
        let go = SseParser::default()
            .push(&chunk, |_| {
                seen += 1;
                Ok::<_, ()>(seen < 3)
            })
            .unwrap();
        assert!(!go);
        assert_eq!(seen, 3);
    }

    #[test]
    fn unbounded_events_are_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert_eq!(events(&mut p, &big), Err(SseError::TooLarge));
        let mut p = SseParser::default();
        let mut data = b"data: ".to_vec();
        data.extend(vec![b'y'; MAX_EVENT_BYTES + 1]);
        data.push(b'\n');
        assert_eq!(events(&mut p, &data), Err(SseError::TooLarge));
    }
}
