//! Resumable image transfer: in-order chunks, resends after reconnect, resume after a
//! restart, and the digest check against the signed command.

use proto::{BoundedBytes, Chunk, Transfer, TransferError, MAX_CHUNK};
use sha2::{Digest, Sha256};

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn chunk(sha: [u8; 32], data: &[u8], offset: usize, len: usize) -> Chunk {
    let end = (offset + len).min(data.len());
    Chunk {
        image_sha256: sha,
        total_size: data.len() as u64,
        offset: offset as u64,
        data: BoundedBytes::new(data[offset..end].to_vec()).expect("under cap"),
    }
}

fn archive() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

#[test]
fn known_digest_matches_sha256() {
    // sha256("abc")
    let want = proto::hex_decode::<32>(
        "sha",
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    )
    .expect("hex");
    assert_eq!(sha256(b"abc"), want);
}

#[test]
fn in_order_transfer_with_resends_completes_and_verifies() {
    let data = archive();
    let sha = sha256(&data);
    let mut t = Transfer::new(sha, data.len() as u64);
    let mut written: Vec<u8> = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let c = chunk(sha, &data, offset, 65_536);
        let a = t.accept(&c).expect("in order");
        written.extend(&c.data[c.data.len() - a.new_bytes..]);
        // The same chunk again (a resend after reconnect) changes nothing.
        let again = t.accept(&c).expect("resend tolerated");
        assert_eq!(again.new_bytes, 0);
        offset += 65_536;
        assert_eq!(a.ack.next_offset, offset.min(data.len()) as u64);
        assert_eq!(a.ack.complete, offset >= data.len());
    }
    assert!(t.is_complete());
    assert_eq!(written, data);
}

#[test]
fn resume_after_restart_from_kept_bytes() {
    let data = archive();
    let sha = sha256(&data);
    let kept = &data[..100_000];
    let mut t = Transfer::new(sha, data.len() as u64);
    assert_eq!(t.absorb(kept), 100_000);
    assert_eq!(t.ack().next_offset, 100_000);
    // The sender resumes at the ack; an overlapping chunk contributes only new bytes.
    let a = t
        .accept(&chunk(sha, &data, 90_000, 20_000))
        .expect("overlap");
    assert_eq!((a.write_offset, a.new_bytes), (100_000, 10_000));
    let a = t
        .accept(&chunk(sha, &data, 110_000, MAX_CHUNK))
        .expect("rest");
    assert!(a.ack.complete);
}

#[test]
fn gaps_other_images_wrong_sizes_and_bad_digests_are_refused() {
    let data = archive();
    let sha = sha256(&data);
    let mut t = Transfer::new(sha, data.len() as u64);
    assert!(matches!(
        t.accept(&chunk(sha, &data, 1000, 10)),
        Err(TransferError::Gap { next: 0, .. })
    ));
    assert!(matches!(
        t.accept(&chunk([7; 32], &data, 0, 10)),
        Err(TransferError::OtherImage { .. })
    ));
    let mut wrong_total = chunk(sha, &data, 0, 10);
    wrong_total.total_size += 1;
    assert!(matches!(
        t.accept(&wrong_total),
        Err(TransferError::SizeMismatch { .. })
    ));
    let mut past = chunk(sha, &data, 0, 10);
    past.offset = data.len() as u64 - 5;
    assert!(matches!(
        t.accept(&past),
        Err(TransferError::PastEnd { .. })
    ));
    assert_eq!(t.next_offset(), 0, "refusals do not advance the transfer");

    // Right size, wrong bytes: refused at the end.
    let mut tampered = data.clone();
    tampered[12_345] ^= 1;
    let mut t = Transfer::new(sha, data.len() as u64);
    t.accept(&chunk(sha, &tampered, 0, 200_000))
        .expect("not yet complete");
    let err = t
        .accept(&chunk(sha, &tampered, 200_000, 200_000))
        .expect_err("digest mismatch");
    assert!(matches!(err, TransferError::DigestMismatch { .. }), "{err}");
}
