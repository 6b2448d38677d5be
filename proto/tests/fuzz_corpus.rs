//! Replays the checked-in fuzz corpus (proto/fuzz/corpus/<target>/) through the same
//! entry points the fuzz targets call, so every seed and every crash the fuzzer ever
//! found (added to the corpus) runs in normal CI without a nightly toolchain.
//!
//! Reseed deliberately with `UPDATE_CORPUS=1 cargo test -p proto --test fuzz_corpus`:
//! golden frames plus truncations for `decode`, one CALL per verifier branch for
//! `verify`. Files the fuzzer added are kept.

use std::path::{Path, PathBuf};

use proto::{encode, testkit};

fn corpus(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn seed() {
    let decode_dir = corpus("decode");
    let verify_dir = corpus("verify");
    for (name, msg) in testkit::sample_messages() {
        let frame = encode(&msg).expect("sample encodes");
        std::fs::write(decode_dir.join(format!("golden-{name}")), &frame).expect("write seed");
        let mut cuts = vec![1, 2, frame.len() / 2, frame.len() - 1];
        cuts.dedup();
        for cut in cuts {
            std::fs::write(
                decode_dir.join(format!("golden-{name}-cut{cut}")),
                &frame[..cut],
            )
            .expect("write seed");
        }
    }
    for (name, frame) in testkit::verify_seeds() {
        std::fs::write(verify_dir.join(format!("seed-{name}")), &frame).expect("write seed");
    }
}

#[test]
fn every_corpus_file_replays_without_panic() {
    if std::env::var_os("UPDATE_CORPUS").is_some() {
        seed();
    }
    let decode_files = files(&corpus("decode"));
    let verify_files = files(&corpus("verify"));
    assert!(
        decode_files.len() >= 19 * 4,
        "decode corpus is missing seeds"
    );
    assert!(verify_files.len() >= 10, "verify corpus is missing seeds");
    for path in decode_files.iter().chain(&verify_files) {
        let bytes = std::fs::read(path).expect("read corpus file");
        // A panic names the file through the unwinding message below.
        let result = std::panic::catch_unwind(|| {
            testkit::fuzz_decode(&bytes);
            testkit::fuzz_verify(&bytes);
        });
        assert!(result.is_ok(), "corpus file {} panicked", path.display());
    }
}

#[test]
fn verify_seeds_reach_their_branches() {
    // The seeds are only useful if each one ends where its name says.
    let verifier = testkit::sample_verifier();
    for (name, frame) in testkit::verify_seeds() {
        let Ok(proto::Message::Call(call)) = proto::decode(&frame) else {
            panic!("seed {name} does not decode as CALL");
        };
        let outcome = verifier.verify(&call.command, testkit::NOW, &mut proto::ReplayWindow::new());
        let accepted = outcome.is_ok();
        assert_eq!(
            accepted,
            name == "accepted" || name == "status_all_rights",
            "{name}: {outcome:?}"
        );
    }
}
