//! Handshake messages: greetings, option headers and option replies.

use super::codec::{DecodeError, Put, Reader};
use super::wire::{gflag, IHAVEOPT, NBDMAGIC, OLD_VERSION, REP_MAGIC};

/// Newstyle greeting length.
pub const GREETING_LEN: usize = 18;
/// Oldstyle greeting length.
pub const OLDSTYLE_LEN: usize = 152;
/// Client option header length.
pub const OPTION_HEADER_LEN: usize = 16;

/// The newstyle greeting with handshake flags masked by `--mask-handshake`.
pub fn greeting(mask: u32) -> ([u8; GREETING_LEN], u16) {
    let gflags = (gflag::FIXED_NEWSTYLE | gflag::NO_ZEROES) & mask as u16;
    let mut v = Vec::with_capacity(GREETING_LEN);
    v.put_u64(NBDMAGIC);
    v.put_u64(IHAVEOPT);
    v.put_u16(gflags);
    (v.try_into().expect("18 bytes"), gflags)
}

/// The oldstyle greeting for an export of `size` bytes and flags `eflags`.
pub fn oldstyle(size: u64, eflags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(OLDSTYLE_LEN);
    v.put_u64(NBDMAGIC);
    v.put_u64(OLD_VERSION);
    v.put_u64(size);
    v.put_u16(0);
    v.put_u16(eflags);
    v.resize(OLDSTYLE_LEN, 0);
    v
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length.
    pub len: u32,
}

impl OptionHeader {
    /// Decodes the 16-byte header; a wrong magic breaks the protocol.
    pub fn decode(buf: &[u8]) -> Result<OptionHeader, DecodeError> {
        let mut r = Reader::new(buf);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic(magic));
        }
        Ok(OptionHeader { option: r.u32()?, len: r.u32()? })
    }
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, typ: u32, payload: &[u8]) {
    out.put_u64(REP_MAGIC);
    out.put_u32(option);
    out.put_u32(typ);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_masked() {
        let (g, f) = greeting(u32::MAX);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(f, 3);
        assert_eq!(greeting(2).1, 2);
    }

    #[test]
    fn oldstyle_is_152_bytes() {
        let v = oldstyle(1 << 20, 1);
        assert_eq!(v.len(), OLDSTYLE_LEN);
        assert_eq!(&v[16..24], &(1u64 << 20).to_be_bytes());
    }

    #[test]
    fn option_header_checks_magic() {
        let mut v = Vec::new();
        v.put_u64(IHAVEOPT);
        v.put_u32(7);
        v.put_u32(10);
        assert_eq!(OptionHeader::decode(&v), Ok(OptionHeader { option: 7, len: 10 }));
        assert_eq!(OptionHeader::decode(&v[..12]), Err(DecodeError::Short));
        v[0] = 0;
        assert!(matches!(OptionHeader::decode(&v), Err(DecodeError::BadMagic(_))));
    }
}
