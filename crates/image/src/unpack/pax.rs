//! PAX extended headers (`x` entries), read by each record's leading length as POSIX says.
//!
//! Pure: no I/O. The `tar` crate splits PAX data on newlines, which breaks on binary values (a file
//! capability holding a `0x0a` byte) and lets a crafted value smuggle a record other readers never
//! see; so the unpacker reads tar in raw mode and parses the records here, the way Go's
//! `archive/tar` (and so Docker and containerd) does.

use super::sys::Timestamp;

/// What a PAX header says about the entry that follows it. Keys not listed are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PaxHeader {
    pub(crate) path: Option<Vec<u8>>,
    pub(crate) linkpath: Option<Vec<u8>>,
    pub(crate) uid: Option<u64>,
    pub(crate) gid: Option<u64>,
    pub(crate) size: Option<u64>,
    pub(crate) mtime: Option<Timestamp>,
    pub(crate) atime: Option<Timestamp>,
    /// `SCHILY.xattr.NAME` records, in order, later ones replacing earlier ones of the same name.
    pub(crate) xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// A `GNU.sparse.*` record was present: the data is a sparse map, which is not supported.
    pub(crate) sparse: bool,
}

const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

/// Parses the data of a PAX `x` header. The error says what was malformed.
pub(crate) fn parse(data: &[u8]) -> Result<PaxHeader, &'static str> {
    let mut header = PaxHeader::default();
    let mut rest = data;
    while !rest.is_empty() {
        let Record {
            key,
            value,
            rest: tail,
        } = record(rest)?;
        rest = tail;
        match key {
            b"path" => header.path = Some(value.to_vec()),
            b"linkpath" => header.linkpath = Some(value.to_vec()),
            b"uid" => header.uid = Some(number(value).ok_or("PAX uid is not a number")?),
            b"gid" => header.gid = Some(number(value).ok_or("PAX gid is not a number")?),
            b"size" => header.size = Some(number(value).ok_or("PAX size is not a number")?),
            b"mtime" => header.mtime = Some(time(value).ok_or("PAX mtime is not a time")?),
            b"atime" => header.atime = Some(time(value).ok_or("PAX atime is not a time")?),
            _ if key.starts_with(b"GNU.sparse.") => header.sparse = true,
            _ => {
                if let Some(name) = key.strip_prefix(XATTR_PREFIX) {
                    header.xattrs.retain(|(n, _)| n != name);
                    header.xattrs.push((name.to_vec(), value.to_vec()));
                }
            }
        }
    }
    Ok(header)
}

/// One PAX record and what follows it.
struct Record<'a> {
    key: &'a [u8],
    value: &'a [u8],
    rest: &'a [u8],
}

/// Splits one `"<len> <key>=<value>\n"` record off the front of `data`.
fn record(data: &[u8]) -> Result<Record<'_>, &'static str> {
    const MALFORMED: &str = "malformed PAX record";
    let space = data.iter().take(20).position(|b| *b == b' ').ok_or(MALFORMED)?;
    let len = usize::try_from(number(data.get(..space).ok_or(MALFORMED)?).ok_or(MALFORMED)?)
        .map_err(|_| MALFORMED)?;
    // The length counts itself, the space, the key, '=', the value and the newline.
    if len <= space + 1 {
        return Err(MALFORMED);
    }
    let rec = data
        .get(..len)
        .ok_or("PAX record runs past the end of its header")?;
    let body = rec.get(space + 1..len - 1).ok_or(MALFORMED)?;
    if rec.last() != Some(&b'\n') {
        return Err("PAX record does not end in a newline");
    }
    let eq = body.iter().position(|b| *b == b'=').ok_or(MALFORMED)?;
    let (key, value) = (&body[..eq], &body[eq + 1..]);
    if key.is_empty() {
        return Err(MALFORMED);
    }
    Ok(Record {
        key,
        value,
        rest: &data[len..],
    })
}

/// A non-empty decimal number without sign, as tar writes them.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A PAX time: `[-]SECONDS[.FRACTION]`, the fraction cut to nanoseconds.
fn time(value: &[u8]) -> Option<Timestamp> {
    let (negative, unsigned) = match value.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = match unsigned.iter().position(|b| *b == b'.') {
        Some(dot) => (&unsigned[..dot], &unsigned[dot + 1..]),
        None => (unsigned, &b""[..]),
    };
    let secs = i64::try_from(number(secs)?).ok()?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    Some(match (negative, nanos) {
        (false, _) => Timestamp { secs, nanos },
        (true, 0) => Timestamp {
            secs: -secs,
            nanos: 0,
        },
        // -1.25 is 1.25 s before the epoch: -2 s + 0.75 s.
        (true, _) => Timestamp {
            secs: -secs - 1,
            nanos: 1_000_000_000 - nanos,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats one record with its self-including length, as a writer would.
    fn rec(key: &str, value: &[u8]) -> Vec<u8> {
        let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body_len + 1;
        while len != body_len + len.to_string().len() {
            len = body_len + len.to_string().len();
        }
        let mut out = format!("{len} {key}=").into_bytes();
        out.extend_from_slice(value);
        out.push(b'\n');
        out
    }

    #[test]
    fn reads_the_keys_it_knows() {
        let mut data = rec("path", b"usr/bin/very/long/name");
        data.extend(rec("linkpath", b"/target"));
        data.extend(rec("uid", b"100000"));
        data.extend(rec("gid", b"7"));
        data.extend(rec("size", b"12"));
        data.extend(rec("mtime", b"1700000000.123456789123"));
        data.extend(rec("comment", b"ignored"));
        let h = parse(&data).unwrap();
        assert_eq!(h.path.as_deref(), Some(&b"usr/bin/very/long/name"[..]));
        assert_eq!(h.linkpath.as_deref(), Some(&b"/target"[..]));
        assert_eq!((h.uid, h.gid, h.size), (Some(100_000), Some(7), Some(12)));
        assert_eq!(
            h.mtime,
            Some(Timestamp {
                secs: 1_700_000_000,
                nanos: 123_456_789
            })
        );
        assert!(!h.sparse);
    }

    #[test]
    fn binary_values_with_newlines_and_equals_signs_survive() {
        let cap = b"\x01\x00\x00\x02\x02\x00\x0a\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
        let mut data = rec("SCHILY.xattr.security.capability", cap);
        data.extend(rec("SCHILY.xattr.user.k=v", b"a\n22 linkpath=/etc/evil\n"));
        let h = parse(&data).unwrap();
        assert_eq!(
            h.linkpath, None,
            "a record inside a value must not be read as a record"
        );
        assert_eq!(
            h.xattrs,
            vec![
                (b"security.capability".to_vec(), cap.to_vec()),
                (b"user.k".to_vec(), b"v=a\n22 linkpath=/etc/evil\n".to_vec()),
            ]
        );
    }

    #[test]
    fn later_xattr_records_replace_earlier_ones() {
        let mut data = rec("SCHILY.xattr.user.a", b"1");
        data.extend(rec("SCHILY.xattr.user.b", b"2"));
        data.extend(rec("SCHILY.xattr.user.a", b"3"));
        let h = parse(&data).unwrap();
        assert_eq!(
            h.xattrs,
            vec![
                (b"user.b".to_vec(), b"2".to_vec()),
                (b"user.a".to_vec(), b"3".to_vec())
            ]
        );
    }

    #[test]
    fn malformed_records_are_refused() {
        for bad in [
            &b"5 a=b"[..],                // runs past the end
            b"6 a=bc",                    // no newline at the length
            b"x a=b\n",                   // length not a number
            b"3 =\n",                     // too short for its own length
            b"7 =abc\n",                  // empty key
            b"6 abc\n",                   // no '='
            b"99999999999999999999999 a", // no space within 20 bytes
            b"0 \n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&rec("uid", b"-1")).is_err());
        assert!(parse(&rec("mtime", b"1.2.3")).is_err());
    }

    #[test]
    fn sparse_markers_are_flagged() {
        assert!(parse(&rec("GNU.sparse.major", b"1")).unwrap().sparse);
    }

    #[test]
    fn times_before_the_epoch() {
        assert_eq!(
            time(b"-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(time(b"-3"), Some(Timestamp { secs: -3, nanos: 0 }));
        assert_eq!(time(b"5."), Some(Timestamp { secs: 5, nanos: 0 }));
        assert_eq!(time(b"-"), None);
        assert_eq!(time(b""), None);
    }
}
