//! The NBD wire protocol, pure: bytes in, values and bytes out. No I/O,
//! no `async`; every decoder takes `&[u8]` and never panics.

pub mod codec;
pub mod handshake;
pub mod negotiate;
pub mod reply;
pub mod request;
pub mod wire;
