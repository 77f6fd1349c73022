//! A minimal incremental parser for server-sent events, enough for
//! OpenAI-style streams: events separated by a blank line, `data:` lines
//! joined with newlines, comments and other fields ignored.

/// Feeds bytes in, gets complete events' data out.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

/// Largest event we accept, so a server that never sends a blank line
/// cannot grow our memory without bound.
pub const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

impl SseParser {
    /// Appends `chunk`; returns the data of every event it completed, or
    /// `Err` if an event grew past [`MAX_EVENT_BYTES`] or is not UTF-8.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<String>, String> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some((end, sep)) = find_blank_line(&self.buf) {
            let event: Vec<u8> = self.buf.drain(..end + sep).collect();
            let text = std::str::from_utf8(&event[..end])
                .map_err(|_| "event is not valid UTF-8".to_owned())?;
            let mut data: Option<String> = None;
            for line in text.split('\n') {
                let line = line.strip_suffix('\r').unwrap_or(line);
                if let Some(v) = line.strip_prefix("data:") {
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    match &mut data {
                        Some(d) => {
                            d.push('\n');
                            d.push_str(v);
                        }
                        None => data = Some(v.to_owned()),
                    }
                }
            }
            if let Some(d) = data {
                out.push(d);
            }
        }
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(format!("an event exceeded {MAX_EVENT_BYTES} bytes"));
        }
        Ok(out)
    }
}

/// Position of the first blank line (`\n\n` or `\r\n\r\n`) and its length.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"data: {\"a\"").unwrap().is_empty());
        assert_eq!(p.push(b":1}\n\nda").unwrap(), vec!["{\"a\":1}"]);
        assert_eq!(
            p.push(b"ta: [DONE]\r\n\r\n: comment\n\n").unwrap(),
            vec!["[DONE]"]
        );
        assert_eq!(p.push(b"data: a\ndata: b\n\n").unwrap(), vec!["a\nb"]);
    }

    #[test]
    fn unbounded_events_are_refused() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_EVENT_BYTES + 1];
        assert!(p.push(&big).is_err());
    }
}
