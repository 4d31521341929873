//! Directory tables: the 32-byte records of one FAT directory (volume
//! label, `.`, `..`, LFN slots and 8.3 entries), and DOS timestamps.
//!
//! Pure functions; the only outside input is the local-time conversion,
//! which [`Clock`] takes from libc as nbdkit does (so the
//! same TZ gives nbdkit's bytes).

use super::names::{lfn_slots, push_lfn, ShortName};

/// Size of one directory record.
pub const RECORD: usize = 32;
/// Attribute bits.
pub const ATTR_VOLUME: u8 = 0x08;
pub const ATTR_DIR: u8 = 0x10;
pub const ATTR_ARCHIVE: u8 = 0x20;

/// The timestamps of a directory entry, already in DOS format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DosTimes {
    pub ctime_10ms: u8,
    pub ctime: u16,
    pub cdate: u16,
    pub adate: u16,
    pub mtime: u16,
    pub mdate: u16,
}

/// A broken-down local time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tm {
    pub year: i32, // e.g. 2026
    pub mon: u32,  // 1..=12
    pub mday: u32,
    pub hour: u32,
    pub min: u32,
    pub sec: u32,
}

/// DOS date and time of `tm`, clamped to what FAT can hold (1980–2107;
/// nbdkit writes garbage outside that range).
pub fn dos_date_time(tm: Tm) -> (u16, u16) {
    if tm.year < 1980 {
        return ((1 << 5) | 1, 0);
    }
    if tm.year > 2107 {
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29);
    }
    let date = (((tm.year - 1980) as u16) << 9) | ((tm.mon as u16) << 5) | tm.mday as u16;
    let time = ((tm.hour as u16) << 11) | ((tm.min as u16) << 5) | (tm.sec as u16 / 2);
    (date, time)
}

/// localtime_r(3): the TZ-dependent conversion nbdkit uses.
#[allow(unsafe_code)]
pub fn localtime(t: i64) -> Tm {
    // SAFETY: localtime_r only writes the struct we pass; zeroed is a valid tm.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // time_t is 64 bits on x86_64 with glibc and musl alike (the libc
    // crate marks the musl alias deprecated while 32-bit targets change).
    #[allow(deprecated)]
    let tt = t as libc::time_t;
    // SAFETY: both pointers are valid for the call.
    let ok = !unsafe { libc::localtime_r(&tt, &mut tm) }.is_null();
    if !ok {
        return Tm { year: 1980, mon: 1, mday: 1, hour: 0, min: 0, sec: 0 };
    }
    Tm {
        year: tm.tm_year + 1900,
        mon: (tm.tm_mon + 1) as u32,
        mday: tm.tm_mday as u32,
        hour: tm.tm_hour as u32,
        min: tm.tm_min as u32,
        // A leap second (60) would overflow the 5-bit field.
        sec: (tm.tm_sec as u32).min(59),
    }
}

/// [`localtime`] with a memo of the last few seconds converted: the
/// entries of a tree often share their times (written by one script,
/// unpacked by one tar, atime = mtime = ctime), and each conversion takes
/// libc's lock and walks the zone's rules. Exact: only equal seconds hit.
#[derive(Default)]
pub struct Clock {
    memo: [Option<(i64, Tm)>; 4],
    next: usize,
}

impl Clock {
    pub fn local(&mut self, t: i64) -> Tm {
        if let Some((_, tm)) = self.memo.iter().flatten().find(|(k, _)| *k == t) {
            return *tm;
        }
        let tm = localtime(t);
        self.memo[self.next] = Some((t, tm));
        self.next = (self.next + 1) % self.memo.len();
        tm
    }

    /// The DOS times of an entry with these atime, mtime and ctime
    /// (seconds since the epoch).
    pub fn times(&mut self, atime: i64, mtime: i64, ctime: i64) -> DosTimes {
        let c = self.local(ctime);
        let (cdate, ctime_) = dos_date_time(c);
        let (mdate, mtime_) = dos_date_time(self.local(mtime));
        let (adate, _) = dos_date_time(self.local(atime));
        DosTimes { ctime_10ms: if c.year >= 1980 { 100 * (c.sec % 2) as u8 } else { 0 }, ctime: ctime_, cdate, adate, mtime: mtime_, mdate }
    }
}

/// One 8.3 directory record.
pub fn short_record(name: &ShortName, attr: u8, times: &DosTimes, cluster: u32, size: u32) -> [u8; RECORD] {
    let mut e = [0u8; RECORD];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[13] = times.ctime_10ms;
    e[14..16].copy_from_slice(&times.ctime.to_le_bytes());
    e[16..18].copy_from_slice(&times.cdate.to_le_bytes());
    e[18..20].copy_from_slice(&times.adate.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&times.mtime.to_le_bytes());
    e[24..26].copy_from_slice(&times.mdate.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// One entry of a directory table (a subdirectory or a file).
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub short: ShortName,
    pub is_dir: bool,
    pub times: DosTimes,
    /// First cluster; 0 for an empty file.
    pub cluster: u32,
    pub size: u32,
}

/// What a table starts with.
#[derive(Debug, Clone)]
pub enum Head {
    /// The root: the volume label.
    Root { label: [u8; 11] },
    /// A subdirectory: `.` and `..`.
    Sub { own: u32, own_times: DosTimes, parent: u32, parent_times: DosTimes },
}

/// How many records the table of a directory with entries `names` has
/// (the root's label, or a subdirectory's `.` and `..`, then LFN slots and
/// an 8.3 record per entry), known before clusters are given out.
pub fn record_count(root: bool, names: &[&str]) -> usize {
    let head = if root { 1 } else { 2 };
    head + names.iter().map(|n| lfn_slots(n.encode_utf16().count()) + 1).sum::<usize>()
}

/// The bytes of a directory table (without padding to a cluster).
pub fn table(head: &Head, entries: &[Entry<'_>]) -> Vec<u8> {
    let mut t = Vec::with_capacity(RECORD * (2 + entries.len() * 2));
    match head {
        Head::Root { label } => {
            let mut e = [0u8; RECORD];
            e[..11].copy_from_slice(label);
            e[11] = ATTR_VOLUME;
            t.extend_from_slice(&e);
        }
        Head::Sub { own, own_times, parent, parent_times } => {
            t.extend_from_slice(&short_record(b".          ", ATTR_DIR, own_times, *own, 0));
            t.extend_from_slice(&short_record(b"..         ", ATTR_DIR, parent_times, *parent, 0));
        }
    }
    for e in entries {
        push_lfn(&mut t, e.name, &e.short);
        let attr = if e.is_dir { ATTR_DIR } else { ATTR_ARCHIVE };
        t.extend_from_slice(&short_record(&e.short, attr, &e.times, e.cluster, e.size));
    }
    t
}

/// A volume label: nbdkit's truncation to 11 bytes, space padded.
pub fn label_bytes(label: &str) -> [u8; 11] {
    let mut l = [b' '; 11];
    for (o, &c) in l.iter_mut().zip(label.as_bytes()) {
        *o = c;
    }
    l
}

#[cfg(test)]
mod tests {
    use super::super::names::{decode_lfn, short_names};
    use super::*;

    #[test]
    fn dates() {
        let tm = Tm { year: 2011, mon: 12, mday: 13, hour: 14, min: 15, sec: 17 };
        assert_eq!(dos_date_time(tm), (0x3f8d, 0x71e8)); // Debian's nbdkit, same stat
        assert_eq!(dos_date_time(Tm { year: 1970, ..tm }).0, 0x21);
        assert_eq!(dos_date_time(Tm { year: 3000, ..tm }).0 >> 9, 127);
    }

    #[test]
    fn clock_memo_gives_what_localtime_gives() {
        let mut c = Clock::default();
        let ts = [0i64, 1_700_000_000, 1_700_000_000, 1_700_000_001, -1, 1_700_000_000, 4_000_000_000,
                  1_711_846_799, 1_711_846_800, 1_700_000_001, 86_399, 86_400, 1_700_000_000];
        for t in ts {
            assert_eq!(c.local(t), localtime(t), "{t}");
        }
        let d = c.times(1_700_000_000, 1_700_000_001, 1_700_000_003);
        assert_eq!((d.mdate, d.mtime), dos_date_time(localtime(1_700_000_001)));
        assert_eq!(d.ctime_10ms, 100 * (localtime(1_700_000_003).sec % 2) as u8);
    }

    #[test]
    fn table_has_the_counted_records_and_names_read_back() {
        let names = ["sub", "exactly13char", "a.txt", "\u{1f600}"];
        let shorts = short_names(&names);
        let entries: Vec<Entry<'_>> = names.iter().zip(&shorts).enumerate().map(|(i, (n, s))| Entry {
            name: n, short: *s, is_dir: i == 0, times: DosTimes::default(), cluster: 3 + i as u32, size: 0,
        }).collect();
        let t = table(&Head::Root { label: label_bytes("NBDKITFLOPY") }, &entries);
        assert_eq!(t.len(), RECORD * record_count(true, &names));
        assert_eq!(&t[..12], b"NBDKITFLOPY\x08");
        // Walk: LFN slots then the short record.
        let mut recs = t.chunks(RECORD).skip(1).peekable();
        for n in names {
            let mut slots = Vec::new();
            while recs.peek().is_some_and(|r| r[11] == 0x0f) {
                slots.push(<[u8; 32]>::try_from(recs.next().unwrap()).unwrap());
            }
            assert_eq!(decode_lfn(&slots).as_deref(), Some(n));
            recs.next().unwrap();
        }
        assert!(recs.next().is_none());
    }
}
