//! Decompresses one block with liblzma (statically linked from the
//! `liblzma-sys` crate): the block header's filter chain is decoded by
//! `lzma_block_header_decode`, the data by `lzma_block_decoder`, which also
//! checks the sizes the index gave and the block's check (CRC32, CRC64,
//! SHA-256). The compressed bytes are read in 1 MiB pieces, so memory is
//! the output buffer plus one piece plus the decoder's dictionary.

#![allow(unsafe_code)]

use liblzma_sys as lz;

use super::format::{check_size, padded, Block};
use crate::error::{Error, ErrorKind, Result};

/// Compressed bytes read at a time.
const CHUNK: usize = 1 << 20;

/// Frees the filter options `lzma_block_header_decode` allocated.
struct Filters([lz::lzma_filter; lz::LZMA_FILTERS_MAX as usize + 1]);

impl Drop for Filters {
    fn drop(&mut self) {
        for f in &mut self.0 {
            if f.id == lz::LZMA_VLI_UNKNOWN {
                break;
            }
            // SAFETY: liblzma allocated the options with malloc (no custom
            // allocator was given) and nothing else owns them.
            unsafe { libc::free(f.options) };
            f.options = std::ptr::null_mut();
        }
    }
}

/// Ends the decoder whatever happens.
struct Stream(lz::lzma_stream);

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: the stream was zero-initialized (LZMA_STREAM_INIT), and
        // lzma_end accepts a stream in any state.
        unsafe { lz::lzma_end(&mut self.0) };
    }
}

fn eio(msg: String) -> Error {
    Error::new(ErrorKind::Io, msg)
}

/// Decompresses block `b` into `out` (exactly `b.usize` bytes long).
/// `read(buf, offset)` reads the compressed file. `mem_limit` bounds the
/// memory the block's filter chain may ask for (a hostile header can ask
/// for a 4 GiB dictionary).
pub fn decode_block(read: &dyn Fn(&mut [u8], u64) -> Result<()>, b: &Block, out: &mut [u8], mem_limit: u64) -> Result<()> {
    debug_assert_eq!(out.len() as u64, b.usize);
    let mut first = [0u8; 1];
    read(&mut first, b.coffset)?;
    if first[0] == 0 {
        return Err(eio("xz: read: unexpected invalid block in file, header[0] = 0".into()));
    }
    let header_size = (u32::from(first[0]) + 1) * 4;
    if u64::from(header_size) + check_size(b.check) >= b.unpadded {
        return Err(eio(format!("invalid block header (header of {header_size} bytes in a block of {})", b.unpadded)));
    }
    let mut header = vec![0u8; header_size as usize];
    read(&mut header, b.coffset)?;

    let mut filters = Filters(
        // SAFETY: lzma_filter is a plain C struct (an id and a pointer);
        // all-zero is a valid value, overwritten by the header decoder.
        unsafe { std::mem::zeroed() },
    );
    filters.0[0].id = lz::LZMA_VLI_UNKNOWN;
    // SAFETY: as above, lzma_block is plain data; zero is its documented
    // initial state apart from the fields set below.
    let mut block: lz::lzma_block = unsafe { std::mem::zeroed() };
    block.version = 1;
    block.header_size = header_size;
    block.check = lz::lzma_check::from(b.check);
    block.filters = filters.0.as_mut_ptr();
    // SAFETY: `header` holds header_size bytes as the call requires;
    // `block.filters` points to LZMA_FILTERS_MAX + 1 entries.
    let r = unsafe { lz::lzma_block_header_decode(&mut block, std::ptr::null(), header.as_ptr()) };
    if r != lz::LZMA_OK {
        // The decoder leaves no options allocated on failure.
        filters.0[0].id = lz::LZMA_VLI_UNKNOWN;
        return Err(eio(format!("invalid block header (error {r})")));
    }
    // SAFETY: `block` was filled in by lzma_block_header_decode.
    let r = unsafe { lz::lzma_block_compressed_size(&mut block, b.unpadded) };
    if r != lz::LZMA_OK {
        return Err(eio(format!("cannot calculate compressed size (error {r})")));
    }
    if block.uncompressed_size != lz::LZMA_VLI_UNKNOWN && block.uncompressed_size != b.usize {
        return Err(eio(format!(
            "block header says {} uncompressed bytes, the index {}",
            block.uncompressed_size, b.usize
        )));
    }
    block.uncompressed_size = b.usize;
    // SAFETY: the filter chain was decoded above and is terminated.
    let mem = unsafe { lz::lzma_raw_decoder_memusage(filters.0.as_ptr()) };
    if mem == u64::MAX || mem > mem_limit {
        return Err(eio(format!("xz: block needs {mem} bytes of memory to decode, more than the limit of {mem_limit}")));
    }

    // SAFETY: LZMA_STREAM_INIT is all zeroes.
    let mut strm = Stream(unsafe { std::mem::zeroed() });
    // SAFETY: `strm` is initialized; `block` and its filters live until
    // the decoder is initialized (it copies what it needs).
    let r = unsafe { lz::lzma_block_decoder(&mut strm.0, &mut block) };
    if r != lz::LZMA_OK {
        return Err(if r == lz::LZMA_MEM_ERROR {
            Error::new(ErrorKind::NoMem, "xz: out of memory starting the block decoder")
        } else {
            eio(format!("could not parse block data (error {r})"))
        });
    }

    // Everything after the header: data, block padding, check.
    let mut left = padded(b.unpadded) - u64::from(header_size);
    let mut pos = b.coffset + u64::from(header_size);
    let mut inbuf = vec![0u8; (left as usize).min(CHUNK)];
    strm.0.next_out = out.as_mut_ptr();
    strm.0.avail_out = out.len();
    loop {
        if strm.0.avail_in == 0 && left > 0 {
            let n = (left as usize).min(inbuf.len());
            read(&mut inbuf[..n], pos)?;
            pos += n as u64;
            left -= n as u64;
            strm.0.next_in = inbuf.as_ptr();
            strm.0.avail_in = n;
        }
        let was_in = strm.0.avail_in;
        let was_out = strm.0.avail_out;
        // SAFETY: next_in/avail_in describe `inbuf` (alive, not moved);
        // next_out/avail_out the unwritten tail of `out`.
        let r = unsafe { lz::lzma_code(&mut strm.0, lz::LZMA_RUN) };
        match r {
            lz::LZMA_STREAM_END => break,
            lz::LZMA_OK => {}
            lz::LZMA_MEM_ERROR => return Err(Error::new(ErrorKind::NoMem, "xz: out of memory decoding a block")),
            _ => return Err(eio(format!("could not parse block data (error {r})"))),
        }
        if left == 0 && strm.0.avail_in == 0 && was_in == strm.0.avail_in && was_out == strm.0.avail_out {
            return Err(eio("could not parse block data: the block is truncated".into()));
        }
    }
    if strm.0.total_out != b.usize {
        return Err(eio(format!("block decoded to {} bytes, the index says {}", strm.0.total_out, b.usize)));
    }
    Ok(())
}
