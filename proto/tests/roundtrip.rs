//! Property tests: whatever we encode decodes to the same value, and arbitrary or
//! mutated bytes never panic the decoder.

use proptest::prelude::*;
use proto::testkit;
use proto::*;

fn chute_name() -> impl Strategy<Value = ChuteName> {
    "[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?".prop_map(|s| ChuteName::new(s).expect("matches the rule"))
}

fn text() -> impl Strategy<Value = Text> {
    ".{0,60}".prop_map(|s| Text::truncating(&s))
}

fn short() -> impl Strategy<Value = ShortText> {
    ".{0,40}".prop_map(|s| ShortText::truncating(&s))
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    any::<u16>().prop_map(ErrorCode::from_u16)
}

fn args() -> impl Strategy<Value = Args> {
    prop_oneof![
        (
            chute_name(),
            ".{0,200}",
            proptest::option::of(any::<[u8; 32]>()),
            any::<u64>()
        )
            .prop_map(
                |(chute, m, image_sha256, image_size)| Args::Deploy(DeployArgs {
                    chute,
                    manifest_toml: BoundedString::truncating(&m),
                    image_sha256,
                    image_size,
                })
            ),
        chute_name().prop_map(|chute| Args::Start(ChuteArgs { chute })),
        (chute_name(), any::<u32>()).prop_map(|(chute, timeout_secs)| Args::Stop(StopArgs {
            chute,
            timeout_secs
        })),
        chute_name().prop_map(|chute| Args::Restart(ChuteArgs { chute })),
        chute_name().prop_map(|chute| Args::Remove(ChuteArgs { chute })),
        (chute_name(), any::<u32>(), any::<bool>()).prop_map(|(chute, tail, follow)| Args::Logs(
            LogsArgs {
                chute,
                tail,
                follow
            }
        )),
        chute_name().prop_map(|chute| Args::Inspect(ChuteArgs { chute })),
        Just(Args::Status),
        any::<u32>().prop_map(|r| Args::UpdateGrant(UpdateGrantArgs {
            grant: Grant {
                developer: testkit::stranger().public(),
                rights: Rights::from_bits(r & Rights::all().bits()).expect("known bits"),
                chute_patterns: BoundedVec::default(),
                devices: BoundedVec::default(),
                issued_at: 1,
                expires_at: 2,
            }
            .sign(&testkit::owner())
        })),
    ]
}

fn usage() -> impl Strategy<Value = ChuteUsage> {
    (
        chute_name(),
        0usize..6,
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(name, s, cpu, mem, pids, rx, tx)| ChuteUsage {
            name,
            state: [
                ChuteState::Booting,
                ChuteState::Running,
                ChuteState::Stopped,
                ChuteState::Zombie,
                ChuteState::Dead,
                ChuteState::Failed,
            ][s],
            cpu_millicores: cpu,
            memory_bytes: mem,
            pids,
            rx_bytes: rx,
            tx_bytes: tx,
            restarts: pids / 3,
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (short(), any::<[u8; 32]>(), short()).prop_map(|(realm, k, v)| Message::Hello(Hello {
            realm,
            pubkey: PublicKey(k),
            agent_version: v,
            auth_method: AuthMethod::Cryptosign
        })),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(session_id, nonce)| Message::Challenge(Challenge { session_id, nonce })),
        (any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(|(a, b)| {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&a);
            sig[32..].copy_from_slice(&b);
            Message::Authenticate(Authenticate {
                signature: SignatureBytes(sig),
            })
        }),
        (any::<u64>(), any::<u32>()).prop_map(|(session_id, heartbeat_secs)| Message::Welcome(
            Welcome {
                session_id,
                heartbeat_secs
            }
        )),
        (error_code(), text()).prop_map(|(code, message)| Message::Abort(Abort { code, message })),
        (error_code(), text())
            .prop_map(|(code, message)| Message::Goodbye(Goodbye { code, message })),
        (any::<u8>(), any::<u64>(), error_code(), text()).prop_map(
            |(request_type, request, code, message)| {
                Message::Error(ErrorMsg {
                    request_type,
                    request,
                    code,
                    message,
                })
            }
        ),
        (any::<u64>(), any::<u64>(), any::<u64>(), args()).prop_map(
            |(request, request_id, t, args)| {
                let cmd = testkit::signed_command(
                    &testkit::owner(),
                    &testkit::developer(),
                    testkit::device().device_id(),
                    request_id,
                    t % 4_000_000_000 + 100_000,
                    args,
                );
                Message::Call(Box::new(Call {
                    request,
                    command: cmd,
                }))
            }
        ),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
            error_code(),
            text(),
            any::<bool>()
        )
            .prop_map(|(request, payload, code, message, ok)| {
                let cmd = testkit::sample_command();
                let outcome = if ok {
                    Outcome::Ok(BoundedBytes::new(payload).expect("small"))
                } else {
                    Outcome::Err { code, message }
                };
                Message::Result(CallResult {
                    request,
                    result: SignedResult::sign(&testkit::device(), &cmd.command, outcome),
                })
            }),
        (
            any::<u64>(),
            proptest::option::of(chute_name()),
            any::<bool>()
        )
            .prop_map(|(request, chute, all)| {
                Message::Subscribe(Subscribe {
                    request,
                    topic: Topic {
                        device: if all { None } else { Some(DeviceId([3; 8])) },
                        kind: TopicKind::Logs(chute),
                    },
                })
            }),
        (any::<u64>(), any::<u64>()).prop_map(|(request, subscription)| Message::Subscribed(
            Subscribed {
                request,
                subscription
            }
        )),
        (any::<u64>(), any::<u64>()).prop_map(|(request, subscription)| Message::Unsubscribe(
            Unsubscribe {
                request,
                subscription
            }
        )),
        any::<u64>().prop_map(|request| Message::Unsubscribed(Unsubscribed { request })),
        (
            any::<u64>(),
            any::<u64>(),
            short(),
            proptest::collection::vec(usage(), 0..20)
        )
            .prop_map(
                |(request, seq, agent_version, chutes)| Message::Publish(Publish {
                    request,
                    publication: Publication::Heartbeat(Heartbeat {
                        seq,
                        uptime_secs: seq / 2,
                        agent_version,
                        resources: Resources::default(),
                        chutes: BoundedVec::new(chutes).expect("under cap"),
                        clock_secs: seq / 3,
                        clock: proto::ClockState::BehindFloor,
                        state_dir_bytes: seq / 5,
                    })
                })
            ),
        (
            any::<u64>(),
            chute_name(),
            proptest::collection::vec((any::<u64>(), ".{0,80}"), 0..10)
        )
            .prop_map(|(subscription, chute, lines)| Message::Event(Event {
                subscription,
                publication_id: subscription ^ 1,
                device: DeviceId([3; 8]),
                publication: Publication::Logs(LogBatch {
                    chute,
                    lines: BoundedVec::new(
                        lines
                            .into_iter()
                            .map(|(ts_ms, t)| LogLine {
                                ts_ms,
                                stream: LogStream::Stderr,
                                text: BoundedString::truncating(&t),
                            })
                            .collect()
                    )
                    .expect("under cap"),
                    dropped: 3,
                }),
            })),
        (
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(
                |(image_sha256, total_size, offset, data)| Message::Chunk(Chunk {
                    image_sha256,
                    total_size,
                    offset,
                    data: BoundedBytes::new(data).expect("under cap"),
                })
            ),
        (any::<[u8; 32]>(), any::<u64>(), any::<bool>()).prop_map(
            |(image_sha256, next_offset, complete)| {
                Message::ChunkAck(ChunkAck {
                    image_sha256,
                    next_offset,
                    complete,
                })
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let frame = encode(&msg).expect("encodes");
        prop_assert!(frame.len() <= MAX_FRAME);
        prop_assert_eq!(frame[0], VERSION);
        prop_assert_eq!(frame[1], msg.message_type().code());
        prop_assert_eq!(decode(&frame), Ok(msg));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        testkit::fuzz_decode(&bytes);
        let mut framed = vec![VERSION, 48];
        framed.extend(&bytes);
        testkit::fuzz_decode(&framed);
    }

    #[test]
    fn mutated_fixtures_never_panic_and_never_verify_when_the_command_changed(
        idx in 0usize..19, pos in any::<prop::sample::Index>(), xor in 1u8..=255
    ) {
        let samples = testkit::sample_messages();
        let (_, msg) = &samples[idx % samples.len()];
        let mut frame = encode(msg).expect("encodes");
        let at = pos.index(frame.len());
        frame[at] ^= xor;
        testkit::fuzz_decode(&frame);
        testkit::fuzz_verify(&frame);
        // A mutated CALL that still decodes must not verify unless the command itself
        // is unchanged (the mutation hit the session-level request number).
        if let (Ok(Message::Call(call)), Message::Call(orig)) = (decode(&frame), msg) {
            let ok = testkit::sample_verifier()
                .verify(&call.command, testkit::NOW, &mut ReplayWindow::new())
                .is_ok();
            prop_assert!(!ok || call.command == orig.command);
        }
    }

    #[test]
    fn replay_window_never_accepts_an_id_twice_even_across_persistence(
        ops in proptest::collection::vec((0u8..20, 0u64..200, 0u64..100), 1..400),
        persist_every in 1usize..50,
    ) {
        // Few signers and ids so collisions, evictions and the floor all happen.
        let mut w = ReplayWindow::new();
        let mut accepted = std::collections::HashMap::new();
        for (i, (signer, id, t)) in ops.into_iter().enumerate() {
            let key = PublicKey([signer; 32]);
            let before = w.clone();
            match w.accept(&key, id, 1000 + t, 1000 + i as u64) {
                Ok(()) => {
                    // A replay is the same signed command: same signer, id and issue
                    // time. (After an eviction the same id with a later issue time is
                    // a new command the developer signed again, and may pass.)
                    prop_assert!(accepted.insert((signer, id, t), ()).is_none(), "({signer}, {id}, {t}) accepted twice");
                }
                Err(_) => prop_assert_eq!(&w, &before, "a refusal changed the window"),
            }
            if i % persist_every == 0 {
                w = ReplayWindow::from_bytes(&w.to_bytes()).expect("window reloads");
            }
        }
        // Every accepted pair is still refused after a final restore.
        let restored = ReplayWindow::from_bytes(&w.to_bytes()).expect("window reloads");
        prop_assert!(w.to_bytes().len() < 16 * 1024);
        for (signer, id, t) in accepted.into_keys() {
            prop_assert!(restored.check(&PublicKey([signer; 32]), id, 1000 + t).is_err());
        }
    }
}
