//! Decoding refuses what it must, with errors that say why, and never panics.

use proto::testkit;
use proto::{
    decode, encode, BoundedBytes, BoundedString, Chunk, ErrorCode, FieldError, Message,
    MessageType, ProtoError, MAX_CHUNK, MAX_FRAME, VERSION,
};

fn frame(name: &str) -> Vec<u8> {
    let (_, msg) = testkit::sample_messages()
        .into_iter()
        .find(|(n, _)| *n == name)
        .expect("fixture exists");
    encode(&msg).expect("encodes")
}

#[test]
fn oversized_frame_is_refused_before_decoding() {
    let mut big = vec![VERSION, MessageType::Chunk.code()];
    big.resize(MAX_FRAME + 1, 0);
    assert_eq!(
        decode(&big),
        Err(ProtoError::FrameTooLarge {
            len: MAX_FRAME + 1,
            max: MAX_FRAME
        })
    );
}

#[test]
fn version_and_type_errors_are_clear() {
    assert_eq!(decode(&[]), Err(ProtoError::Empty));
    let err = decode(&[3, 1, 0]).expect_err("version 3");
    assert_eq!(
        err,
        ProtoError::UnsupportedVersion {
            got: 3,
            supported: 2
        }
    );
    assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
    assert!(err.to_string().contains("version 3"), "{err}");
    assert_eq!(decode(&[VERSION]), Err(ProtoError::MissingType));
    let err = decode(&[VERSION, 0x77, 0, 0]).expect_err("unknown type");
    assert_eq!(err, ProtoError::UnknownType { code: 0x77 });
    assert!(
        err.to_string().contains("unknown message type 119"),
        "{err}"
    );
}

#[test]
fn an_unknown_procedure_is_named_in_the_error() {
    let call = frame("call");
    // Find the procedure byte: it follows the 8-byte device id after the version,
    // type, varint request and varint request_id/issued/expires. Easier: re-encode with
    // each candidate position flipped to 0xEE and look for the clear error.
    let mut found = false;
    for i in 2..call.len().min(64) {
        let mut bad = call.clone();
        if bad[i] != 1 {
            continue; // the Deploy code is 1
        }
        bad[i] = 0xEE;
        if let Err(ProtoError::Field {
            kind: MessageType::Call,
            field:
                FieldError::UnknownCode {
                    what: "procedure",
                    code: 0xEE,
                },
        }) = decode(&bad)
        {
            let err = decode(&bad).expect_err("unknown procedure");
            assert_eq!(err.code(), ErrorCode::NoSuchProcedure);
            assert!(
                err.to_string().contains("unknown procedure code 238"),
                "{err}"
            );
            found = true;
            break;
        }
    }
    assert!(
        found,
        "no byte position produced the unknown-procedure error"
    );
}

#[test]
fn over_long_fields_are_refused_with_their_cap() {
    // A CHUNK whose length prefix claims one byte over the cap, with the bytes present
    // (the frame itself is under MAX_FRAME).
    let chunk = Chunk {
        image_sha256: [1; 32],
        total_size: 10,
        offset: 0,
        data: BoundedBytes::new(vec![7; MAX_CHUNK]).expect("exactly the cap"),
    };
    let mut bytes = encode(&Message::Chunk(chunk)).expect("at the cap encodes");
    assert!(decode(&bytes).is_ok());
    // Rewrite the varint length (MAX_CHUNK = 0x80000 -> 80 80 20) to MAX_CHUNK + 1.
    let pos = 2 + 32 + 1 + 1;
    assert_eq!(&bytes[pos..pos + 3], &[0x80, 0x80, 0x20]);
    bytes[pos] = 0x81;
    bytes.push(7);
    let err = decode(&bytes).expect_err("over the cap");
    assert_eq!(
        err,
        ProtoError::Field {
            kind: MessageType::Chunk,
            field: FieldError::TooLong {
                what: "byte string",
                len: MAX_CHUNK + 1,
                max: MAX_CHUNK
            }
        }
    );
    assert!(err.to_string().contains("the cap is 524288"), "{err}");
    // And the constructor refuses the same value.
    assert!(BoundedBytes::<MAX_CHUNK>::new(vec![0; MAX_CHUNK + 1]).is_err());
    assert!(BoundedString::<4>::new("hello").is_err());
}

#[test]
fn invalid_chute_names_are_refused_while_decoding() {
    let call = frame("subscribe");
    let name_at = call
        .windows(9)
        .position(|w| w == b"hello-web")
        .expect("name present");
    let mut bad = call.clone();
    bad[name_at] = b'H';
    let err = decode(&bad).expect_err("upper case");
    assert!(
        matches!(
            err,
            ProtoError::Field {
                field: FieldError::Invalid {
                    what: "chute name",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn encode_refuses_frames_the_peer_would_refuse() {
    let mut hb = testkit::heartbeat(0);
    hb.agent_version = BoundedString::new("x".repeat(128)).expect("fits");
    // A log batch at its caps is over the frame cap: encode says so instead of
    // producing a frame that would be refused.
    let line = proto::LogLine {
        ts_ms: 0,
        stream: proto::LogStream::Stdout,
        text: BoundedString::new("y".repeat(proto::MAX_LOG_LINE)).expect("fits"),
    };
    let batch = proto::LogBatch {
        chute: proto::ChuteName::new("a").expect("ok"),
        lines: proto::BoundedVec::new(vec![line; proto::MAX_LOG_LINES]).expect("fits"),
        dropped: 0,
    };
    let msg = Message::Publish(proto::Publish {
        request: 1,
        publication: proto::Publication::Logs(batch),
    });
    let len = encode(&msg).map(|f| f.len());
    assert!(
        len.is_ok_and(|l| l <= MAX_FRAME)
            || matches!(encode(&msg), Err(ProtoError::EncodeTooLarge { .. }))
    );
}

#[test]
fn trailing_bytes_and_every_truncation_are_errors_not_panics() {
    for (name, msg) in testkit::sample_messages() {
        let bytes = encode(&msg).expect("encodes");
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(
            matches!(
                decode(&extra),
                Err(ProtoError::TrailingBytes { extra: 1, .. })
            ),
            "{name}"
        );
        for cut in 0..bytes.len() {
            let err = decode(&bytes[..cut]).expect_err("truncated frame");
            assert_ne!(err.to_string(), "", "{name} cut at {cut}");
        }
    }
}

#[test]
fn error_codes_round_trip_and_unknown_codes_survive() {
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_u16(code.as_u16()), *code);
        assert!(code.uri().starts_with("chute."), "{}", code.uri());
    }
    assert_eq!(ErrorCode::from_u16(999), ErrorCode::Other(999));
    assert_eq!(ErrorCode::Other(999).uri(), "chute.error.unknown");
}
