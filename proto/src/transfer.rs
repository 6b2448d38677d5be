//! Receiving side of a resumable image transfer, as pure state: which chunk comes
//! next, hashing as bytes arrive, and the digest check at the end. The caller writes
//! the bytes wherever it likes (this module does no I/O).
//!
//! Chunks must arrive in order; a chunk that repeats bytes already held (a resend after
//! reconnect) is acknowledged without being applied. After a restart the caller feeds
//! the bytes it kept through [`Transfer::absorb`] and resumes from the returned offset.

use sha2::{Digest, Sha256};

use crate::keys::hex_encode;
use crate::message::{Chunk, ChunkAck};

/// Why a chunk or the finished archive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransferError {
    #[error("chunk is for image {got}, this transfer is {expected}")]
    OtherImage { expected: String, got: String },
    #[error("image {image}: chunk says total {got} bytes, the signed command says {expected}")]
    SizeMismatch {
        image: String,
        expected: u64,
        got: u64,
    },
    #[error(
        "image {image}: chunk at offset {offset} leaves a gap; next expected offset is {next}"
    )]
    Gap {
        image: String,
        offset: u64,
        next: u64,
    },
    #[error("image {image}: chunk {offset}+{len} runs past the total size {total}")]
    PastEnd {
        image: String,
        offset: u64,
        len: usize,
        total: u64,
    },
    #[error("image archive digest is {actual}, the signed command says {expected}")]
    DigestMismatch { expected: String, actual: String },
}

/// What applying a chunk produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Offset in the archive where the new bytes go, and how many (0 for a resend).
    pub write_offset: u64,
    pub new_bytes: usize,
    /// Reply to send back.
    pub ack: ChunkAck,
}

/// An image archive being received.
#[derive(Debug, Clone)]
pub struct Transfer {
    expected: [u8; 32],
    total: u64,
    received: u64,
    hasher: Sha256,
}

impl Transfer {
    /// A transfer of `total` bytes that must hash to `expected` (both from the signed
    /// deploy command).
    pub fn new(expected: [u8; 32], total: u64) -> Self {
        Self {
            expected,
            total,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Feeds bytes already held (e.g. a partial file kept across a restart). Extra
    /// bytes past the total are ignored.
    pub fn absorb(&mut self, bytes: &[u8]) -> u64 {
        let room = usize::try_from(self.total - self.received).unwrap_or(usize::MAX);
        let take = bytes.len().min(room);
        self.hasher.update(&bytes[..take]);
        self.received += take as u64;
        self.received
    }

    pub fn next_offset(&self) -> u64 {
        self.received
    }

    pub fn is_complete(&self) -> bool {
        self.received == self.total
    }

    /// The acknowledgement for the current position (send it on reconnect).
    pub fn ack(&self) -> ChunkAck {
        ChunkAck {
            image_sha256: self.expected,
            next_offset: self.received,
            complete: false,
        }
    }

    /// Applies one chunk. When the last byte arrives the digest is checked; on a
    /// mismatch the caller must discard what it wrote.
    pub fn accept(&mut self, chunk: &Chunk) -> Result<Accepted, TransferError> {
        let image = hex_encode(&self.expected);
        if chunk.image_sha256 != self.expected {
            return Err(TransferError::OtherImage {
                expected: image,
                got: hex_encode(&chunk.image_sha256),
            });
        }
        if chunk.total_size != self.total {
            return Err(TransferError::SizeMismatch {
                image,
                expected: self.total,
                got: chunk.total_size,
            });
        }
        let len = chunk.data.len() as u64;
        let end = chunk
            .offset
            .checked_add(len)
            .filter(|end| *end <= self.total);
        let Some(end) = end else {
            return Err(TransferError::PastEnd {
                image,
                offset: chunk.offset,
                len: chunk.data.len(),
                total: self.total,
            });
        };
        if chunk.offset > self.received {
            return Err(TransferError::Gap {
                image,
                offset: chunk.offset,
                next: self.received,
            });
        }
        let write_offset = self.received;
        let new_bytes = if end > self.received {
            let skip = usize::try_from(self.received - chunk.offset).unwrap_or(usize::MAX);
            let fresh = &chunk.data[skip.min(chunk.data.len())..];
            self.hasher.update(fresh);
            self.received = end;
            fresh.len()
        } else {
            0
        };
        let mut ack = self.ack();
        if self.is_complete() {
            let actual: [u8; 32] = self.hasher.clone().finalize().into();
            if actual != self.expected {
                return Err(TransferError::DigestMismatch {
                    expected: image,
                    actual: hex_encode(&actual),
                });
            }
            ack.complete = true;
        }
        Ok(Accepted {
            write_offset,
            new_bytes,
            ack,
        })
    }
}
