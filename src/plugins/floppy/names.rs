//! File names on the FAT disk: 8.3 short names (nbdkit's rule, with its
//! `~N` collision renaming), VFAT long-name (LFN) slots and their checksum.
//!
//! Pure functions. Where nbdkit's rule gives a valid, unique 8.3 name the
//! bytes are nbdkit's; where it gives an invalid one (an all-space base
//! name for `.hidden` or `ü.txt`) or a duplicate (a renamed entry that
//! collides again), a valid one is made instead.

/// Characters nbdkit keeps in a short name (besides A-Z a-z 0-9).
const SPECIAL: &[u8] = b"!#$%&'()-@^_`{}";

/// An 8.3 name as stored: 8 bytes of base name and 3 of extension,
/// upper case, space padded.
pub type ShortName = [u8; 11];

fn allowed(c: u8) -> bool {
    c.is_ascii_alphanumeric() || SPECIAL.contains(&c)
}

/// Up to `max` leading allowed characters of `s`, upper-cased, into `out`.
fn leading_run(s: &[u8], out: &mut [u8], max: usize) {
    for (o, &c) in out.iter_mut().zip(s.iter().take_while(|&&c| allowed(c)).take(max)) {
        *o = c.to_ascii_uppercase();
    }
}

/// nbdkit's short name: the leading run of allowed characters (at most
/// 8), and the allowed characters after the last `.` (at most 3).
pub fn nbdkit_short_name(name: &str) -> ShortName {
    let mut s = [b' '; 11];
    let b = name.as_bytes();
    leading_run(b, &mut s[..8], 8);
    if let Some(dot) = b.iter().rposition(|&c| c == b'.') {
        leading_run(&b[dot + 1..], &mut s[8..], 3);
    }
    s
}

/// A valid short name for names whose leading run is empty (`.hidden`,
/// `ü.txt`, `+x`): leading dots dropped, the stem's allowed characters
/// kept, other characters (non-ASCII, `+`, `[`…) as `_`, spaces and dots
/// dropped; never an empty base.
pub fn sanitized_short_name(name: &str) -> ShortName {
    let mut s = [b' '; 11];
    let rest = name.trim_start_matches('.');
    let (stem, ext) = match rest.rfind('.') {
        Some(dot) => (&rest[..dot], &rest[dot + 1..]),
        None => (rest, ""),
    };
    let mut n = 0;
    for c in stem.chars().filter(|&c| c != ' ' && c != '.') {
        if n == 8 {
            break;
        }
        s[n] = if c.is_ascii() && allowed(c as u8) { (c as u8).to_ascii_uppercase() } else { b'_' };
        n += 1;
    }
    if n == 0 {
        s[0] = b'_';
    }
    leading_run(ext.as_bytes(), &mut s[8..], 3);
    s
}

/// Writes `~N` over the end of the base name, as nbdkit does: at the last
/// non-space character (it replaces that character rather than appending),
/// moved left so that the suffix fits in 8.
fn write_tilde(s: &mut ShortName, n: usize) {
    let suffix = format!("~{n}");
    let suffix = suffix.as_bytes();
    let last = s[..8].iter().rposition(|&c| c != b' ').unwrap_or(0);
    let at = last.min(8 - suffix.len());
    s[at..at + suffix.len()].copy_from_slice(suffix);
}

/// nbdkit's short name, or the sanitized one where nbdkit's is invalid.
fn initial_short_name(name: &str) -> ShortName {
    let short = nbdkit_short_name(name);
    if short[0] == b' ' { sanitized_short_name(name) } else { short }
}

/// Short names for the entries of one directory, in table order
/// (subdirectories first, then files, as nbdkit numbers them).
pub fn short_names(names: &[&str]) -> Vec<ShortName> {
    let mut s: Vec<ShortName> = names.iter().map(|n| initial_short_name(n)).collect();
    // As a rule every initial name is unique already: nothing to rename
    // (and no index list per name to allocate).
    let mut unique = std::collections::HashSet::with_capacity(s.len());
    if s.iter().all(|n| unique.insert(*n)) {
        return s;
    }
    drop(unique);
    // nbdkit: for i in order, every later entry j equal to entry i
    // becomes "…~j" (two nested loops, quadratic: 0.9 s for 20,000 files).
    // Entry i is final once the outer loop reaches it, so the same result
    // comes from taking each j in turn and replaying, in order of i, the
    // earlier entries that equal its current name: `seen` maps a final
    // name to the indices that have it, ascending.
    let mut seen: std::collections::HashMap<ShortName, Vec<usize>> = std::collections::HashMap::with_capacity(s.len());
    for (j, name) in s.iter_mut().enumerate() {
        let mut from = 0;
        while let Some(&i) = seen.get(name).and_then(|v| v.get(v.partition_point(|&i| i < from))) {
            write_tilde(name, j);
            from = i + 1;
        }
        seen.entry(*name).or_default().push(j);
    }
    // nbdkit stops there, and "AB~6" may now equal a file really called
    // "ab~6". Those (rare) leftovers get the first free "~N".
    let mut seen = std::collections::HashSet::with_capacity(s.len());
    let mut dups = Vec::new();
    for (j, name) in s.iter().enumerate() {
        if !seen.insert(*name) {
            dups.push(j);
        }
    }
    for j in dups {
        let base = s[j];
        for n in 1.. {
            let mut cand = base;
            write_tilde(&mut cand, n);
            if seen.insert(cand) {
                s[j] = cand;
                break;
            }
        }
    }
    s
}

/// The LFN checksum of a short name.
pub fn checksum(s: &ShortName) -> u8 {
    s.iter().fold(0u8, |sum, &c| ((sum & 1) << 7).wrapping_add(sum >> 1).wrapping_add(c))
}

/// How many LFN slots nbdkit writes for a name of `units` UTF-16 code
/// units: 1 + bytes/26, so a name of exactly 13k units gets an extra slot
/// that starts with the terminating NUL.
pub fn lfn_slots(units: usize) -> usize {
    1 + units * 2 / 26
}

/// Appends the LFN slots of `name` for short name `short` to `out`, in
/// the order they are stored (highest sequence number first, with bit
/// 0x40). Nothing is allocated for names of up to 256 bytes.
pub fn push_lfn(out: &mut Vec<u8>, name: &str, short: &ShortName) {
    let mut stack = [0u16; 256];
    let heap: Vec<u16>;
    // A name has no more UTF-16 units than UTF-8 bytes.
    let units: &[u16] = if name.len() <= stack.len() {
        let mut n = 0;
        for u in name.encode_utf16() {
            stack[n] = u;
            n += 1;
        }
        &stack[..n]
    } else {
        heap = name.encode_utf16().collect();
        &heap
    };
    let n = lfn_slots(units.len());
    let sum = checksum(short);
    // Character positions of the 13 UTF-16 units inside a slot.
    const POS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    for k in (0..n).rev() {
        let mut e = [0u8; 32];
        e[0] = (k + 1) as u8 | if k == n - 1 { 0x40 } else { 0 };
        e[11] = 0x0f;
        e[13] = sum;
        for (i, &p) in POS.iter().enumerate() {
            // Past the end: the terminating NUL, then zeroes (nbdkit's
            // padding; the spec's 0xFFFF is optional for readers).
            let u = units.get(k * 13 + i).copied().unwrap_or(0);
            e[p..p + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.extend_from_slice(&e);
    }
}

/// The LFN slots of `name` for short name `short`, in stored order.
#[cfg(test)]
pub fn lfn_entries(name: &str, short: &ShortName) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    push_lfn(&mut out, name, short);
    out.chunks(32).map(|c| c.try_into().unwrap()).collect()
}

/// Reads a long name back from LFN slots in stored order (round-trip tests).
#[cfg(test)]
pub fn decode_lfn(slots: &[[u8; 32]]) -> Option<String> {
    const POS: [usize; 13] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
    let mut units = Vec::new();
    for e in slots.iter().rev() {
        for p in POS {
            units.push(u16::from_le_bytes([e[p], e[p + 1]]));
        }
    }
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16(&units[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &ShortName) -> &str {
        std::str::from_utf8(x).unwrap()
    }

    #[test]
    fn nbdkit_rule() {
        assert_eq!(s(&nbdkit_short_name("a.txt")), "A       TXT");
        assert_eq!(s(&nbdkit_short_name("LongFileName.text")), "LONGFILETEX");
        assert_eq!(s(&nbdkit_short_name("x.y.z")), "X       Z  ");
        assert_eq!(s(&nbdkit_short_name("exactly13char")), "EXACTLY1   ");
        assert_eq!(s(&nbdkit_short_name(".hidden")), "        HID");
    }

    /// The renaming Debian's nbdkit 1.32.5 does on the same names.
    #[test]
    fn collisions_like_nbdkit() {
        let names = [".a.txt", ".b.txt", "Abc.Txt", "ABCDEFGH.txt", "x.y.z", "abcdefgh.txt", "ABC.txt", "abc.txt"];
        let got: Vec<String> = short_names(&names).iter().map(|x| s(x).to_string()).collect();
        // The first two are nbdkit's invalid "        TXT" and "~1      TXT": ours are valid.
        assert_eq!(got, ["A       TXT", "B       TXT", "ABC     TXT", "ABCDEFGHTXT", "X       Z  ",
                         "ABCDEF~5TXT", "AB~6    TXT", "AB~7    TXT"]);
    }

    #[test]
    fn sanitized() {
        assert_eq!(s(&sanitized_short_name(".hidden")), "HIDDEN     ");
        assert_eq!(s(&sanitized_short_name("ü.txt")), "_       TXT");
        assert_eq!(s(&sanitized_short_name("...")), "_          ");
        assert_eq!(s(&sanitized_short_name("+ü b.c.tar")), "__BC    TAR");
        let n = short_names(&["ü.txt", "é.txt"]);
        assert_eq!((s(&n[0]), s(&n[1])), ("_       TXT", "~1      TXT"));
    }

    #[test]
    fn second_collision_is_resolved() {
        let n = short_names(&["ab.txt", "AB~1.txt", "Ab.txt"]);
        let set: std::collections::HashSet<_> = n.iter().collect();
        assert_eq!(set.len(), 3, "{:?}", n.iter().map(s).collect::<Vec<_>>());
    }

    /// nbdkit's loops, as written there.
    fn nbdkit_renaming(mut s: Vec<ShortName>) -> Vec<ShortName> {
        for i in 0..s.len() {
            for j in i + 1..s.len() {
                if s[i] == s[j] {
                    write_tilde(&mut s[j], j);
                }
            }
        }
        s
    }

    proptest::proptest! {
        #[test]
        fn fast_renaming_is_nbdkits(names in proptest::collection::vec("(ab|AB|Ab|ab~[1-9]|a~[1-9]|~[1-9]|abc){1,3}(\\.t[x~]t)?", 1..60)) {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let initial: Vec<ShortName> = names.iter().map(|n| initial_short_name(n)).collect();
            let want = nbdkit_renaming(initial);
            let got = short_names(&names);
            // Equal wherever nbdkit's result is already unique.
            let mut count = std::collections::HashMap::new();
            for w in &want { *count.entry(*w).or_insert(0) += 1; }
            for (g, w) in got.iter().zip(&want) {
                if count[w] == 1 { proptest::prop_assert_eq!(g, w); }
            }
        }
    }

    #[test]
    fn lfn_layout() {
        let short = nbdkit_short_name("sub");
        let e = lfn_entries("sub", &short);
        assert_eq!(e.len(), 1);
        assert_eq!(&e[0][..12], b"\x41s\0u\0b\0\0\0\0\0\x0f");
        assert_eq!(e[0][13], 0xbf); // Debian's nbdkit: same checksum
        assert_eq!(lfn_entries("exactly13char", &short).len(), 2);
        assert_eq!(lfn_slots(12), 1);
        assert_eq!(lfn_slots(26), 3);
    }

    proptest::proptest! {
        #[test]
        fn every_name_round_trips_and_short_names_are_valid_and_unique(
            names in proptest::collection::hash_set("[a-zA-Z0-9 ._~+,;=\\[\\]!#$%&'()@^`{}\u{e9}\u{fc}\u{4e2d}\u{1f600}-]{1,40}", 1..40)
        ) {
            let names: Vec<&str> = names.iter().map(|s| s.as_str()).filter(|n| *n != "." && *n != "..").collect();
            let shorts = short_names(&names);
            let set: std::collections::HashSet<_> = shorts.iter().collect();
            proptest::prop_assert_eq!(set.len(), shorts.len());
            for (n, sh) in names.iter().zip(&shorts) {
                proptest::prop_assert!(sh[0] != b' ');
                proptest::prop_assert!(sh.iter().all(|&c| c == b' ' || c == b'~' || allowed(c)));
                proptest::prop_assert!(!sh.iter().any(|c| c.is_ascii_lowercase()));
                // Spaces only as padding.
                let base_end = sh[..8].iter().position(|&c| c == b' ').unwrap_or(8);
                proptest::prop_assert!(sh[base_end..8].iter().all(|&c| c == b' '));
                let ext_end = sh[8..].iter().position(|&c| c == b' ').unwrap_or(3);
                proptest::prop_assert!(sh[8 + ext_end..].iter().all(|&c| c == b' '));
                let slots = lfn_entries(n, sh);
                let back = decode_lfn(&slots);
                proptest::prop_assert_eq!(back.as_deref(), Some(*n));
                proptest::prop_assert!(slots.iter().all(|e| e[13] == checksum(sh)));
            }
        }
    }
}
