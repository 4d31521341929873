//! A checked reader over a borrowed byte slice, and big-endian writers.

/// The peer sent bytes that break the protocol: the connection closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer bytes than the structure needs.
    Short,
    /// A magic number that is not the expected one.
    BadMagic(u64),
    /// A length beyond what this server accepts.
    TooLong(u64),
    /// Anything else, with a reason for the log.
    Invalid(&'static str),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short => f.write_str("message too short"),
            DecodeError::BadMagic(m) => write!(f, "bad magic 0x{m:x}"),
            DecodeError::TooLong(n) => write!(f, "length {n} too large"),
            DecodeError::Invalid(why) => f.write_str(why),
        }
    }
}

/// Reads big-endian values off the front of a slice; never panics.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Short);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (a, b) = self.buf.split_first_chunk::<N>().ok_or(DecodeError::Short)?;
        self.buf = b;
        Ok(*a)
    }
    /// A u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }
}

/// Big-endian appends.
pub trait Put {
    /// Append a u16.
    fn put_u16(&mut self, v: u16);
    /// Append a u32.
    fn put_u32(&mut self, v: u32);
    /// Append a u64.
    fn put_u64(&mut self, v: u64);
}

impl Put for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_reads_are_short_not_panics() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), Err(DecodeError::Short));
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.take(2), Err(DecodeError::Short));
        assert_eq!(r.take(1), Ok(&[3][..]));
        assert_eq!(r.remaining(), 0);
    }
}
