//! Server-sent events, framed without copying.
//!
//! The relay must forward each upstream event exactly as it arrived (byte for byte,
//! comments and odd spacing included) while reading its `data` to meter it. A
//! general SSE parser such as `eventsource-stream` decodes events into owned strings
//! and drops the original bytes, so Warden frames the stream itself: upstream chunks
//! are appended to one buffer, and each complete event is split off as a `Bytes`
//! that shares the buffer's memory.

use bytes::{Bytes, BytesMut};

/// Splits a byte stream into raw SSE events, each including its blank-line terminator.
///
/// Events can be read one at a time ([`Framer::next_event`]) or, as the relay does,
/// found in place ([`Framer::event_end`]) and handed on several at once
/// ([`Framer::take`]): events that arrived together leave together, as one write.
#[derive(Debug, Default)]
pub struct Framer {
    buf: BytesMut,
    /// Where the last unsuccessful search stopped, so a partly received event is not
    /// rescanned from its start on every read.
    resume: usize,
}

impl Framer {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The bytes received and not yet taken.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The end offset of the complete event that starts at `from`, if it has arrived.
    pub fn event_end(&mut self, from: usize) -> Option<usize> {
        let start = if self.resume > from {
            self.resume
        } else {
            from
        };
        match find_boundary(&self.buf, start) {
            Some(end) => {
                self.resume = 0;
                Some(end)
            }
            None => {
                // A terminator may straddle this read and the next.
                self.resume = self.buf.len().saturating_sub(3).max(from);
                None
            }
        }
    }

    /// Splits off the first `len` bytes, which must end on an event boundary.
    pub fn take(&mut self, len: usize) -> Bytes {
        self.resume = self.resume.saturating_sub(len);
        self.buf.split_to(len).freeze()
    }

    /// Drops the event at `range` (a chunk the client must not see), keeping the rest.
    pub fn remove(&mut self, range: std::ops::Range<usize>) {
        let tail = self.buf.split_off(range.end);
        self.buf.truncate(range.start);
        self.buf.unsplit(tail);
        self.resume = 0;
    }

    /// The next complete event, if the buffer holds one.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let end = self.event_end(0)?;
        Some(self.take(end))
    }

    /// Whatever is left after the stream ended: a final event with no terminator.
    pub fn take_rest(&mut self) -> Option<Bytes> {
        self.resume = 0;
        if self.buf.iter().all(u8::is_ascii_whitespace) {
            self.buf.clear();
            return None;
        }
        Some(self.buf.split().freeze())
    }
}

/// Finds the end of the first event at or after `start`: a line end followed by an
/// empty line, where lines end in `\n`, `\r\n` or `\r`. A resumed search starts three
/// bytes before the previous end, which is before any terminator that was still
/// incomplete then (the longest, `\r\n\r\n`, is four bytes).
fn find_boundary(buf: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    while let Some(offset) = memchr::memchr2(b'\n', b'\r', &buf[i..]) {
        let at = i + offset;
        let line_end = match (buf[at], buf.get(at + 1)) {
            (b'\r', Some(b'\n')) => at + 2,
            (b'\r', None) => return None, // a `\n` may still follow
            _ => at + 1,
        };
        match (buf.get(line_end), buf.get(line_end + 1)) {
            (Some(b'\n'), _) => return Some(line_end + 1),
            (Some(b'\r'), Some(b'\n')) => return Some(line_end + 2),
            (Some(b'\r'), Some(_)) => return Some(line_end + 1),
            (Some(_), _) => i = line_end,
            (None, _) => return None,
        }
    }
    None
}

/// The fields of one raw event that the relay needs.
#[derive(Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// The `data` field: borrowed when it is one line, as it is for every provider
    /// seen so far; several data lines are joined into an owned buffer.
    pub data: Data<'a>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Data<'a> {
    None,
    Line(&'a [u8]),
    Joined(Vec<u8>),
}

impl Data<'_> {
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Data::None => None,
            Data::Line(line) => Some(line),
            Data::Joined(joined) => Some(joined),
        }
    }
}

/// Reads the `data` field of a raw event. Comment lines and other fields are skipped.
pub fn parse(raw: &[u8]) -> Event<'_> {
    let mut data = Data::None;

    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(value) = line.strip_prefix(b"data:") else {
            continue;
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);

        data = match data {
            Data::None => Data::Line(value),
            Data::Line(first) => Data::Joined([first, b"\n", value].concat()),
            Data::Joined(mut joined) => {
                joined.push(b'\n');
                joined.extend_from_slice(value);
                Data::Joined(joined)
            }
        };
    }
    Event { data }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(chunks: &[&[u8]]) -> Vec<Bytes> {
        let mut framer = Framer::default();
        let mut events = Vec::new();
        for chunk in chunks {
            framer.push(chunk);
            while let Some(event) = framer.next_event() {
                events.push(event);
            }
        }
        events.extend(framer.take_rest());
        events
    }

    #[test]
    fn splits_on_blank_lines_keeping_bytes() {
        let events = frame_all(&[b"data: a\n\ndata: b\n", b"\ndata: c\n\n"]);
        assert_eq!(
            events,
            vec![&b"data: a\n\n"[..], b"data: b\n\n", b"data: c\n\n"]
        );
    }

    #[test]
    fn handles_crlf_split_across_chunks() {
        let events = frame_all(&[b"event: x\r\ndata: 1\r\n\r", b"\ndata: 2\r\n\r\n"]);
        assert_eq!(
            events,
            vec![&b"event: x\r\ndata: 1\r\n\r\n"[..], b"data: 2\r\n\r\n"]
        );
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let body = b": comment\n\nevent: e\ndata: {\"a\":1}\n\ndata: [DONE]\n\n";
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        let events = frame_all(&bytes);
        assert_eq!(events.concat(), body.to_vec());
        assert_eq!(events.len(), 3);
    }

    #[test]
    fn unterminated_tail_is_returned() {
        let events = frame_all(&[b"data: a\n\ndata: cut"]);
        assert_eq!(events[1], &b"data: cut"[..]);
    }

    #[test]
    fn events_found_in_place_leave_together() {
        let mut framer = Framer::default();
        framer.push(b"data: a\n\ndata: usage\n\ndata: b\n\ndata: c");
        let first = framer.event_end(0).unwrap();
        let second = framer.event_end(first).unwrap();
        framer.remove(first..second);
        let third = framer.event_end(first).unwrap();
        assert_eq!(framer.event_end(third), None);
        assert_eq!(framer.take(third), &b"data: a\n\ndata: b\n\n"[..]);
        framer.push(b"\n\n");
        assert_eq!(framer.next_event().unwrap(), &b"data: c\n\n"[..]);
    }

    #[test]
    fn parses_data_and_skips_comments() {
        let event = parse(b": keep-alive\nevent: response.completed\ndata: {\"x\":1}\n\n");
        assert_eq!(event.data.as_bytes(), Some(&b"{\"x\":1}"[..]));
        let joined = parse(b"data: a\ndata: b\n\n");
        assert_eq!(joined.data.as_bytes(), Some(&b"a\nb"[..]));
    }
}
