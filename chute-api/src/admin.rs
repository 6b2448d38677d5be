//! The local admin socket's framing: newline-delimited JSON over a root-only (0600) Unix
//! socket, one [`Request`](crate::Request) per connection.
//!
//! The agent answers with zero or more `{"progress": "..."}` / `{"log": LogLine}` lines and
//! then exactly one final line, `{"ok": <answer>}` or `{"error": {"code", "message"}}`.

use serde::{Deserialize, Serialize};

use crate::{ApiError, LogLine};

/// Longest request line the agent reads; a manifest is a few KB.
pub const MAX_REQUEST: usize = 256 * 1024;

/// One line from the agent. `T` is the answer: the agent sends a
/// [`Response`](crate::Response); a reader decodes the type its request's
/// [`kind`](crate::Request::kind) names (`DeployResult`, `Vec<ChuteSummary>`, ...), or
/// `serde_json::Value` to take any.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply<T> {
    Progress(String),
    Log(LogLine),
    Ok(T),
    Error(ApiError),
}

impl<T> Reply<T> {
    /// The final line for an answer.
    pub fn answer(result: Result<T, ApiError>) -> Self {
        match result {
            Ok(r) => Reply::Ok(r),
            Err(e) => Reply::Error(e),
        }
    }
}

impl<T: Serialize> Reply<T> {
    /// The line as sent: JSON and a newline.
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing these types to JSON cannot fail (string keys, finite numbers).
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChuteAck, ChuteState, ErrorCode, LogStream, Request, Response};

    #[test]
    fn lines_keep_their_documented_shape() {
        let log: Reply<()> = Reply::Log(LogLine {
            stream: LogStream::Stderr,
            line: "oops".into(),
        });
        assert_eq!(
            serde_json::to_string(&log).expect("json"),
            r#"{"log":{"stream":"stderr","line":"oops"}}"#
        );
        let err: Reply<()> =
            Reply::Error(ApiError::new(ErrorCode::NoSuchChute, "no chute named `x`"));
        assert_eq!(
            serde_json::to_string(&err).expect("json"),
            r#"{"error":{"code":"no-such-chute","message":"no chute named `x`"}}"#
        );
        let req: Request = serde_json::from_str(r#"{"op":"stop","name":"web"}"#).expect("reads");
        assert_eq!(
            req,
            Request::Stop {
                name: "web".into(),
                timeout_secs: None
            }
        );
    }

    #[test]
    fn an_answer_decodes_by_the_request_kind() {
        let ack = ChuteAck {
            name: "web".parse().expect("valid"),
            state: ChuteState::Stopped,
            container_id: Some("abc".into()),
            restarts: 2,
        };
        let line = Reply::answer(Ok(Response::Chute(ack.clone()))).to_line();
        // Decoded as the type the request names, or as any JSON.
        let typed: Reply<ChuteAck> = serde_json::from_slice(&line).expect("reads");
        assert_eq!(typed, Reply::Ok(ack.clone()));
        let Reply::Ok(v) =
            serde_json::from_slice::<Reply<serde_json::Value>>(&line).expect("reads")
        else {
            panic!("not an ok line");
        };
        let kind = Request::Restart { name: "web".into() }.kind();
        assert_eq!(
            Response::from_json(kind, v).expect("decodes"),
            Response::Chute(ack)
        );
    }
}
