//! Transmission-phase replies: simple, structured and extended headers,
//! and the payloads of error and block-status chunks.

use super::codec::Put;
use super::wire::{chunk, EXT_REPLY_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Simple reply header length.
pub const SIMPLE_LEN: usize = 16;
/// Structured chunk header length.
pub const CHUNK_LEN: usize = 20;
/// Extended chunk header length.
pub const EXT_CHUNK_LEN: usize = 32;

/// Which reply format the connection negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Simple replies only.
    Simple,
    /// Structured replies.
    Structured,
    /// Extended headers.
    Extended,
}

/// Appends a simple reply header.
pub fn simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Appends a chunk header (structured, or extended when `mode` says so;
/// `offset` is the request's offset, echoed by extended headers).
pub fn chunk_header(out: &mut Vec<u8>, mode: Mode, flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) {
    if mode == Mode::Extended {
        out.put_u32(EXT_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(typ);
        out.put_u64(cookie);
        out.put_u64(offset);
        out.put_u64(len);
    } else {
        out.put_u32(STRUCTURED_REPLY_MAGIC);
        out.put_u16(flags);
        out.put_u16(typ);
        out.put_u64(cookie);
        out.put_u32(len as u32);
    }
}

/// Appends a reply for a command without payload: simple in simple and
/// structured mode, a NONE chunk with extended headers; errors as an
/// ERROR chunk when chunks are allowed and `chunked_errors` is set.
pub fn no_payload(out: &mut Vec<u8>, mode: Mode, error: u32, cookie: u64, offset: u64, chunked_errors: bool) {
    match mode {
        Mode::Extended => {
            if error == 0 {
                chunk_header(out, mode, chunk::FLAG_DONE, chunk::NONE, cookie, offset, 0);
            } else {
                error_chunk(out, mode, error, cookie, offset);
            }
        }
        Mode::Structured if error != 0 && chunked_errors => error_chunk(out, mode, error, cookie, offset),
        _ => simple(out, error, cookie),
    }
}

/// Appends an ERROR chunk (flagged DONE) with an empty message, as nbdkit.
pub fn error_chunk(out: &mut Vec<u8>, mode: Mode, error: u32, cookie: u64, offset: u64) {
    chunk_header(out, mode, chunk::FLAG_DONE, chunk::ERROR, cookie, offset, 6);
    out.put_u32(error);
    out.put_u16(0);
}

/// Appends the header of an OFFSET_DATA chunk flagged DONE for `len`
/// data bytes at `data_offset`; the data follow.
pub fn data_chunk_header(out: &mut Vec<u8>, mode: Mode, cookie: u64, offset: u64, len: u64) {
    chunk_header(out, mode, chunk::FLAG_DONE, chunk::OFFSET_DATA, cookie, offset, len + 8);
    out.put_u64(offset);
}

/// Appends an OFFSET_HOLE chunk (not DONE).
pub fn hole_chunk(out: &mut Vec<u8>, mode: Mode, cookie: u64, req_offset: u64, offset: u64, len: u32) {
    chunk_header(out, mode, 0, chunk::OFFSET_HOLE, cookie, req_offset, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// Appends an OFFSET_DATA chunk header (not DONE) for `len` bytes at `offset`.
pub fn data_piece_header(out: &mut Vec<u8>, mode: Mode, cookie: u64, req_offset: u64, offset: u64, len: u64) {
    chunk_header(out, mode, 0, chunk::OFFSET_DATA, cookie, req_offset, len + 8);
    out.put_u64(offset);
}

/// Appends a block status chunk (flagged DONE) for context `id` with
/// `(length, status)` descriptors.
pub fn block_status(out: &mut Vec<u8>, mode: Mode, cookie: u64, offset: u64, id: u32, descs: &[(u64, u32)]) {
    if mode == Mode::Extended {
        let len = 8 + 16 * descs.len() as u64;
        chunk_header(out, mode, chunk::FLAG_DONE, chunk::BLOCK_STATUS_EXT, cookie, offset, len);
        out.put_u32(id);
        out.put_u32(descs.len() as u32);
        for &(l, s) in descs {
            out.put_u64(l);
            out.put_u64(u64::from(s));
        }
    } else {
        let len = 4 + 8 * descs.len() as u64;
        chunk_header(out, mode, chunk::FLAG_DONE, chunk::BLOCK_STATUS, cookie, offset, len);
        out.put_u32(id);
        for &(l, s) in descs {
            out.put_u32(l as u32);
            out.put_u32(s);
        }
    }
}

/// Largest extent length sent in compact block status: 4 GiB − 64 KiB,
/// keeping 64K alignment (nbdkit's fix for CVE-2025-47711).
pub const MAX_EXTENT_32: u64 = 0xFFFF_0000;

/// Turns extents (absolute offset, length, type) starting at `offset` into
/// descriptors for a request of `count` bytes, per nbdkit 1.44: with
/// REQ_ONE one descriptor clamped to `count`; otherwise descriptors until
/// one reaches `offset+count` or had to be truncated. Lengths are clamped
/// to `MAX_EXTENT_32` unless `wide` (extended headers).
pub fn descriptors(extents: &[(u64, u64, u32)], offset: u64, count: u64, req_one: bool, wide: bool) -> Vec<(u64, u32)> {
    let end = offset.saturating_add(count);
    let mut out = Vec::new();
    let mut pos = offset;
    for &(o, l, t) in extents {
        let stop = o.saturating_add(l);
        if stop <= pos {
            continue;
        }
        let mut len = stop - pos.max(o);
        let mut truncated = false;
        if req_one {
            len = len.min(count);
        }
        let cap = if wide { u64::MAX } else { MAX_EXTENT_32 };
        if len > cap {
            len = cap;
            truncated = true;
        }
        out.push((len, t & 3));
        pos += len;
        if req_one || truncated || pos >= end {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_status_of_4g_minus_1_on_a_5g_disk() {
        // test-eval-extents.sh: extents 0 4G data; 4G 1G zero.
        let ext = [(0, 4 << 30, 1), (4 << 30, 1 << 30, 2)];
        for req_one in [false, true] {
            let d = descriptors(&ext, 0, (1 << 32) - 1, req_one, false);
            assert_eq!(d, vec![(4294901760, 1)]);
        }
    }

    #[test]
    fn req_one_is_clamped_to_the_request() {
        let d = descriptors(&[(0, 1 << 20, 3)], 0, 512, true, false);
        assert_eq!(d, vec![(512, 3)]);
        let d = descriptors(&[(0, 1024, 0), (1024, 4096, 3)], 0, 2048, false, false);
        assert_eq!(d, vec![(1024, 0), (4096, 3)]);
    }

    #[test]
    fn headers_have_their_sizes() {
        let mut v = Vec::new();
        simple(&mut v, 0, 1);
        assert_eq!(v.len(), SIMPLE_LEN);
        v.clear();
        chunk_header(&mut v, Mode::Structured, 1, 1, 1, 0, 9);
        assert_eq!(v.len(), CHUNK_LEN);
        v.clear();
        chunk_header(&mut v, Mode::Extended, 1, 1, 1, 0, 9);
        assert_eq!(v.len(), EXT_CHUNK_LEN);
    }
}
