//! Every magic number, flag, option, command and reply type of the NBD
//! protocol (see nbd-protocol.md §1).

/// "NBDMAGIC": first 8 bytes of both handshakes.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Oldstyle second field.
pub const OLD_VERSION: u64 = 0x0000_4202_8186_1253;
/// "IHAVEOPT": newstyle greeting and start of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Start of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Extended request.
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Extended reply chunk.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake (global) flags, server side.
pub mod gflag {
    /// Fixed newstyle.
    pub const FIXED_NEWSTYLE: u16 = 1;
    /// No 124 zero bytes after EXPORT_NAME.
    pub const NO_ZEROES: u16 = 2;
}

/// Client flags.
pub mod cflag {
    /// Client speaks fixed newstyle.
    pub const FIXED_NEWSTYLE: u32 = 1;
    /// Client wants no zeroes.
    pub const NO_ZEROES: u32 = 2;
}

/// Transmission (export) flags.
pub mod eflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Read-only export.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational media.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// DF supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Multi-conn safe.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers.
pub mod opt {
    /// NBD_OPT_EXPORT_NAME.
    pub const EXPORT_NAME: u32 = 1;
    /// NBD_OPT_ABORT.
    pub const ABORT: u32 = 2;
    /// NBD_OPT_LIST.
    pub const LIST: u32 = 3;
    /// NBD_OPT_STARTTLS.
    pub const STARTTLS: u32 = 5;
    /// NBD_OPT_INFO.
    pub const INFO: u32 = 6;
    /// NBD_OPT_GO.
    pub const GO: u32 = 7;
    /// NBD_OPT_STRUCTURED_REPLY.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// NBD_OPT_LIST_META_CONTEXT.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// NBD_OPT_SET_META_CONTEXT.
    pub const SET_META_CONTEXT: u32 = 10;
    /// NBD_OPT_EXTENDED_HEADERS.
    pub const EXTENDED_HEADERS: u32 = 11;

    /// nbdkit's name for an option (debug lines), `None` if unknown.
    pub fn name(o: u32) -> Option<&'static str> {
        Some(match o {
            EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
            ABORT => "NBD_OPT_ABORT",
            LIST => "NBD_OPT_LIST",
            STARTTLS => "NBD_OPT_STARTTLS",
            INFO => "NBD_OPT_INFO",
            GO => "NBD_OPT_GO",
            STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
            LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
            SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
            EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS",
            _ => return None,
        })
    }
}

/// Option reply types.
pub mod rep {
    /// ACK.
    pub const ACK: u32 = 1;
    /// An export in a LIST reply.
    pub const SERVER: u32 = 2;
    /// An NBD_INFO item.
    pub const INFO: u32 = 3;
    /// A meta context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = 0x8000_0001;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = 0x8000_0002;
    /// Malformed or not valid now.
    pub const ERR_INVALID: u32 = 0x8000_0003;
    /// Not on this platform.
    pub const ERR_PLATFORM: u32 = 0x8000_0004;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = 0x8000_0005;
    /// Export not available.
    pub const ERR_UNKNOWN: u32 = 0x8000_0006;
    /// Shutting down.
    pub const ERR_SHUTDOWN: u32 = 0x8000_0007;
    /// Block size required.
    pub const ERR_BLOCK_SIZE_REQD: u32 = 0x8000_0008;
    /// Too big.
    pub const ERR_TOO_BIG: u32 = 0x8000_0009;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = 0x8000_000a;

    /// nbdkit's name for a reply type (debug lines), `None` if unknown.
    pub fn name(r: u32) -> Option<&'static str> {
        Some(match r {
            ACK => "NBD_REP_ACK",
            SERVER => "NBD_REP_SERVER",
            INFO => "NBD_REP_INFO",
            META_CONTEXT => "NBD_REP_META_CONTEXT",
            ERR_UNSUP => "NBD_REP_ERR_UNSUP",
            ERR_POLICY => "NBD_REP_ERR_POLICY",
            ERR_INVALID => "NBD_REP_ERR_INVALID",
            ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
            ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
            ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
            ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
            ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
            ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
            ERR_EXT_HEADER_REQD => "NBD_REP_ERR_EXT_HEADER_REQD",
            _ => return None,
        })
    }
}

/// Displays an option or reply number as nbdkit's debug lines do: its
/// name, or `unknown (0xN)`.
#[derive(Debug, Clone, Copy)]
pub struct Named(pub Option<&'static str>, pub u32);

impl Named {
    /// An option.
    pub fn opt(o: u32) -> Named {
        Named(opt::name(o), o)
    }
    /// A reply type.
    pub fn rep(r: u32) -> Named {
        Named(rep::name(r), r)
    }
}

impl std::fmt::Display for Named {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(n) => f.write_str(n),
            None => write!(f, "unknown (0x{:x})", self.1),
        }
    }
}

/// NBD_INFO types.
pub mod info {
    /// Size and flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Commands.
pub mod cmd {
    /// READ.
    pub const READ: u16 = 0;
    /// WRITE.
    pub const WRITE: u16 = 1;
    /// DISC.
    pub const DISC: u16 = 2;
    /// FLUSH.
    pub const FLUSH: u16 = 3;
    /// TRIM.
    pub const TRIM: u16 = 4;
    /// CACHE.
    pub const CACHE: u16 = 5;
    /// WRITE_ZEROES.
    pub const WRITE_ZEROES: u16 = 6;
    /// BLOCK_STATUS.
    pub const BLOCK_STATUS: u16 = 7;

    /// The name libnbd and nbdkit's debug output use.
    pub fn name(c: u16) -> &'static str {
        match c {
            READ => "NBD_CMD_READ",
            WRITE => "NBD_CMD_WRITE",
            DISC => "NBD_CMD_DISC",
            FLUSH => "NBD_CMD_FLUSH",
            TRIM => "NBD_CMD_TRIM",
            CACHE => "NBD_CMD_CACHE",
            WRITE_ZEROES => "NBD_CMD_WRITE_ZEROES",
            BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
            _ => "unknown",
        }
    }
}

/// Command flags.
pub mod cmdflag {
    /// FUA.
    pub const FUA: u16 = 1 << 0;
    /// NO_HOLE (WRITE_ZEROES).
    pub const NO_HOLE: u16 = 1 << 1;
    /// DF (READ).
    pub const DF: u16 = 1 << 2;
    /// REQ_ONE (BLOCK_STATUS).
    pub const REQ_ONE: u16 = 1 << 3;
    /// FAST_ZERO (WRITE_ZEROES).
    pub const FAST_ZERO: u16 = 1 << 4;
    /// PAYLOAD_LEN (extended headers).
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    /// NONE.
    pub const NONE: u16 = 0;
    /// OFFSET_DATA.
    pub const OFFSET_DATA: u16 = 1;
    /// OFFSET_HOLE.
    pub const OFFSET_HOLE: u16 = 2;
    /// BLOCK_STATUS.
    pub const BLOCK_STATUS: u16 = 5;
    /// BLOCK_STATUS_EXT.
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// ERROR.
    pub const ERROR: u16 = 0x8001;
    /// DONE flag.
    pub const FLAG_DONE: u16 = 1;
}

/// NBD error numbers.
pub mod errno {
    /// EPERM.
    pub const EPERM: u32 = 1;
    /// EIO.
    pub const EIO: u32 = 5;
    /// ENOMEM.
    pub const ENOMEM: u32 = 12;
    /// EINVAL.
    pub const EINVAL: u32 = 22;
    /// ENOSPC.
    pub const ENOSPC: u32 = 28;
    /// EOVERFLOW.
    pub const EOVERFLOW: u32 = 75;
    /// ENOTSUP.
    pub const ENOTSUP: u32 = 95;
    /// ESHUTDOWN.
    pub const ESHUTDOWN: u32 = 108;
}

/// Longest export name, description or meta-context name.
pub const MAX_STRING: usize = 4096;
/// Largest READ or WRITE payload served (nbdkit's MAX_REQUEST_SIZE).
pub const MAX_REQUEST_SIZE: u32 = 64 * 1024 * 1024;
/// Context id of `base:allocation` when selected.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// The one meta context served.
pub const BASE_ALLOCATION: &str = "base:allocation";

use crate::error::ErrorKind;

/// nbdkit's `nbd_errno`: the NBD error for a failed call. ENOTSUP only
/// when the client asked for a fast zero, EOVERFLOW only with DF.
pub fn nbd_errno(kind: ErrorKind, flags: u16) -> u32 {
    match kind {
        ErrorKind::Perm | ErrorKind::ReadOnly => errno::EPERM,
        ErrorKind::Io => errno::EIO,
        ErrorKind::NoMem => errno::ENOMEM,
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::Shutdown => errno::ESHUTDOWN,
        ErrorKind::NotSupported if flags & cmdflag::FAST_ZERO != 0 => errno::ENOTSUP,
        ErrorKind::Overflow if flags & cmdflag::DF != 0 => errno::EOVERFLOW,
        _ => errno::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_follows_nbdkit() {
        assert_eq!(nbd_errno(ErrorKind::ReadOnly, 0), errno::EPERM);
        assert_eq!(nbd_errno(ErrorKind::NotSupported, 0), errno::EINVAL);
        assert_eq!(nbd_errno(ErrorKind::NotSupported, cmdflag::FAST_ZERO), errno::ENOTSUP);
        assert_eq!(nbd_errno(ErrorKind::Overflow, 0), errno::EINVAL);
        assert_eq!(nbd_errno(ErrorKind::Overflow, cmdflag::DF), errno::EOVERFLOW);
        assert_eq!(nbd_errno(ErrorKind::NotFound, 0), errno::EINVAL);
    }
}
