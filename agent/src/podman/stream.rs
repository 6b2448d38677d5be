//! Incremental decoding of libpod's streaming bodies: JSON lines (events, pull progress)
//! and the 8-byte-header multiplexed log format. Both hold at most one bounded line or
//! frame in memory, however long the stream runs.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_lite::Stream;

use super::http::Exchange;
use super::{ContainerEvent, PodmanError};

/// Longest JSON line accepted from the events or pull streams.
pub const MAX_LINE: usize = 64 * 1024;
/// Largest log frame accepted; Podman writes one frame per log line.
pub const MAX_LOG_FRAME: usize = 1024 * 1024;

/// Splits a body into newline-terminated lines of at most `max` bytes.
pub(crate) struct Lines {
    ex: Exchange,
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    max: usize,
    done: bool,
}

impl Lines {
    pub(crate) fn new(ex: Exchange, max: usize) -> Self {
        Lines {
            ex,
            buf: Vec::new(),
            scanned: 0,
            max,
            done: false,
        }
    }

    pub(crate) fn op(&self) -> &'static str {
        self.ex.op
    }

    /// Next line without its terminator. A final unterminated line is returned too.
    /// After an error the stream ends.
    pub(crate) fn poll_line(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Vec<u8>, PodmanError>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                return Poll::Ready(Some(Ok(line)));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                self.done = true;
                return Poll::Ready(Some(Err(PodmanError::Decode {
                    op: self.ex.op,
                    message: format!("line longer than {} bytes", self.max),
                })));
            }
            match ready!(self.ex.poll_chunk(cx)) {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    self.done = true;
                    if self.buf.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(std::mem::take(&mut self.buf))));
                }
            }
        }
    }

    pub(crate) async fn next_line(&mut self) -> Option<Result<Vec<u8>, PodmanError>> {
        std::future::poll_fn(|cx| self.poll_line(cx)).await
    }
}

/// Container events from `GET /libpod/events?stream=true`, filtered by label.
///
/// A line that does not decode yields one `Decode` error and the stream goes on. The
/// stream ends when Podman closes it (e.g. the service restarted), after a transport
/// error, or after a line longer than [`MAX_LINE`]; the caller then reconnects and
/// reconciles, since events may have been missed.
pub struct EventStream {
    pub(crate) lines: Lines,
}

impl Stream for EventStream {
    type Item = Result<ContainerEvent, PodmanError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let line = match ready!(this.lines.poll_line(cx)) {
                None => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                Some(Ok(line)) => line,
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match super::parse_event(&line) {
                Ok(Some(ev)) => return Poll::Ready(Some(Ok(ev))),
                Ok(None) => continue,
                Err(message) => {
                    return Poll::Ready(Some(Err(PodmanError::Decode {
                        op: this.lines.op(),
                        message,
                    })))
                }
            }
        }
    }
}

/// Which output of the container a log chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    Stdout,
    Stderr,
}

/// One frame of container output (usually one line, newline included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogChunk {
    pub stream: LogSource,
    pub data: Vec<u8>,
}

/// Reassembles lines from [`LogChunk`]s. Each output keeps its own partial line, so
/// stdout and stderr written between each other's newlines never splice into one line; a
/// line longer than `max` bytes is cut into pieces of `max`.
#[derive(Debug)]
pub struct LogLines {
    max: usize,
    /// Indexed by [`LogSource::index`].
    partial: [Vec<u8>; 2],
}

impl LogSource {
    /// `"stdout"` or `"stderr"`.
    pub fn name(self) -> &'static str {
        match self {
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
        }
    }

    fn index(self) -> usize {
        match self {
            LogSource::Stdout => 0,
            LogSource::Stderr => 1,
        }
    }
}

impl LogLines {
    pub fn new(max: usize) -> Self {
        LogLines {
            max: max.max(1),
            partial: [Vec::new(), Vec::new()],
        }
    }

    /// Calls `out` for every line `chunk` completes, without its newline.
    pub fn feed(&mut self, chunk: &LogChunk, mut out: impl FnMut(LogSource, &str)) {
        let max = self.max;
        let partial = &mut self.partial[chunk.stream.index()];
        for &b in &chunk.data {
            if b == b'\n' {
                out(chunk.stream, &String::from_utf8_lossy(partial));
                partial.clear();
            } else {
                partial.push(b);
                if partial.len() >= max {
                    out(chunk.stream, &String::from_utf8_lossy(partial));
                    partial.clear();
                }
            }
        }
    }

    /// Calls `out` for what is left without a final newline, stdout's first.
    pub fn finish(&mut self, mut out: impl FnMut(LogSource, &str)) {
        for source in [LogSource::Stdout, LogSource::Stderr] {
            let partial = &mut self.partial[source.index()];
            if !partial.is_empty() {
                out(source, &String::from_utf8_lossy(partial));
                partial.clear();
            }
        }
    }
}

/// Demultiplexes libpod's log body: frames of `[kind, 0, 0, 0, len_be32] ++ data`.
/// Only for containers without a TTY, which is all chuted creates.
pub struct LogStream {
    pub(crate) ex: Exchange,
    pub(crate) buf: Vec<u8>,
    pub(crate) done: bool,
}

/// Parses one frame from the front of `buf`: `Ok(None)` if incomplete, else the chunk and
/// how many bytes it used.
pub(crate) fn parse_log_frame(buf: &[u8]) -> Result<Option<(LogChunk, usize)>, String> {
    let Some(header) = buf.get(..8) else {
        return Ok(None);
    };
    let stream = match header[0] {
        // 0 is stdin, which libpod never sends here; treat like docker clients do.
        0 | 1 => LogSource::Stdout,
        2 => LogSource::Stderr,
        other => return Err(format!("unknown log stream kind {other}")),
    };
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > MAX_LOG_FRAME {
        return Err(format!(
            "log frame of {len} bytes exceeds {MAX_LOG_FRAME} bytes"
        ));
    }
    let Some(data) = buf.get(8..8 + len) else {
        return Ok(None);
    };
    Ok(Some((
        LogChunk {
            stream,
            data: data.to_vec(),
        },
        8 + len,
    )))
}

impl Stream for LogStream {
    type Item = Result<LogChunk, PodmanError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match parse_log_frame(&this.buf) {
                Ok(Some((chunk, used))) => {
                    this.buf.drain(..used);
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Ok(None) => {}
                Err(message) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(PodmanError::Decode {
                        op: this.ex.op,
                        message,
                    })));
                }
            }
            match ready!(this.ex.poll_chunk(cx)) {
                Some(Ok(chunk)) => this.buf.extend_from_slice(&chunk),
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    this.done = true;
                    if !this.buf.is_empty() {
                        return Poll::Ready(Some(Err(PodmanError::Decode {
                            op: this.ex.op,
                            message: format!(
                                "log stream ended inside a frame ({} bytes left)",
                                this.buf.len()
                            ),
                        })));
                    }
                }
            }
        }
    }
}
