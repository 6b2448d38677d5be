//! Log streaming to the cloud: a bounded per-chute ring between the container's output
//! (read from Podman only while someone is subscribed) and the link, which drains it in
//! batches. A slow or absent link costs at most the ring's bytes; the oldest lines are
//! dropped first and the next batch says how many were lost.

use std::collections::VecDeque;

use proto::{BoundedString, BoundedVec, ChuteName, LogBatch, LogLine, LogStream, MAX_LOG_LINES};

/// Lines kept per chute while the link cannot keep up.
pub const RING_LINES: usize = 512;
/// Bytes of line text kept per chute.
pub const RING_BYTES: usize = 64 * 1024;
/// Text bytes in one published batch (keeps a batch well under the frame cap).
pub const BATCH_BYTES: usize = 48 * 1024;

/// A fixed-budget queue of log lines.
#[derive(Debug)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    dropped: u32,
    max_lines: usize,
    max_bytes: usize,
}

impl LogRing {
    pub fn new(max_lines: usize, max_bytes: usize) -> Self {
        Self {
            lines: VecDeque::new(),
            bytes: 0,
            dropped: 0,
            max_lines: max_lines.max(1),
            max_bytes,
        }
    }

    /// Appends a line (cut to the protocol's line cap), dropping the oldest to fit.
    pub fn push(&mut self, ts_ms: u64, stream: LogStream, text: &str) {
        let text = BoundedString::truncating(text);
        self.bytes += text.len();
        self.lines.push_back(LogLine {
            ts_ms,
            stream,
            text,
        });
        while self.lines.len() > self.max_lines
            || (self.bytes > self.max_bytes && self.lines.len() > 1)
        {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.text.len();
                self.dropped = self.dropped.saturating_add(1);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    /// Takes the next batch (up to the protocol's line cap and [`BATCH_BYTES`]), with
    /// the count of lines lost since the previous batch.
    pub fn take_batch(&mut self, chute: &ChuteName) -> Option<LogBatch> {
        if self.lines.is_empty() && self.dropped == 0 {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(line) = self.lines.front() {
            if out.len() == MAX_LOG_LINES
                || (!out.is_empty() && bytes + line.text.len() > BATCH_BYTES)
            {
                break;
            }
            bytes += line.text.len();
            self.bytes -= line.text.len();
            out.extend(self.lines.pop_front());
        }
        let dropped = std::mem::take(&mut self.dropped);
        Some(LogBatch {
            chute: chute.clone(),
            lines: BoundedVec::new(out).expect("batch is cut at MAX_LOG_LINES"),
            dropped,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> ChuteName {
        ChuteName::new("web").unwrap()
    }

    #[test]
    fn ring_drops_oldest_and_reports_it() {
        let mut r = LogRing::new(3, 1 << 20);
        for i in 0..5 {
            r.push(i, LogStream::Stdout, &format!("line {i}"));
        }
        let b = r.take_batch(&name()).unwrap();
        let texts: Vec<&str> = b.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["line 2", "line 3", "line 4"]);
        assert_eq!(b.dropped, 2);
        assert!(
            r.take_batch(&name()).is_none(),
            "nothing left, nothing dropped"
        );
    }

    #[test]
    fn ring_respects_byte_budget_and_batch_caps() {
        let mut r = LogRing::new(10_000, 1000);
        for i in 0..100 {
            r.push(i, LogStream::Stderr, &"x".repeat(100));
        }
        assert_eq!(r.len(), 10, "1000 bytes hold ten 100-byte lines");
        let mut r = LogRing::new(10_000, 1 << 20);
        for i in 0..300 {
            r.push(i, LogStream::Stdout, "y");
        }
        let b = r.take_batch(&name()).unwrap();
        assert_eq!(b.lines.len(), MAX_LOG_LINES);
        assert_eq!(r.len(), 300 - MAX_LOG_LINES);
    }
}
