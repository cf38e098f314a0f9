//! A reader of classic pcap files (`tcpdump -w`), for replaying captures through the core in
//! tests and tools.
//!
//! Owns the file format: both byte orders, micro- and nanosecond timestamps, Ethernet link
//! type only. It does not write captures (tcpdump does) and knows nothing of what the frames
//! mean.

use std::path::Path;
use std::time::Duration;

/// One captured frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Capture time since the Unix epoch.
    pub ts: Duration,
    /// The bytes captured (maybe fewer than were on the wire: see `orig_len`).
    pub data: Vec<u8>,
    /// The frame's length on the wire.
    pub orig_len: u32,
}

/// Why a file is not a readable pcap of Ethernet frames.
#[derive(Debug, thiserror::Error)]
pub enum PcapError {
    /// Not readable.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a pcap file (pcapng is not supported).
    #[error("not a classic pcap file (magic {magic:#010x})")]
    BadMagic {
        /// The first four bytes.
        magic: u32,
    },
    /// Not Ethernet.
    #[error("link type {0} is not Ethernet (1)")]
    LinkType(u32),
    /// The file ends inside a header or a record.
    #[error("file truncated at byte {0}")]
    Truncated(usize),
}

/// Reads a pcap file.
pub fn read_file(path: &Path) -> Result<Vec<Record>, PcapError> {
    let bytes = std::fs::read(path).map_err(|source| PcapError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&bytes)
}

/// Parses the bytes of a pcap file.
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, PcapError> {
    let header = bytes.get(..24).ok_or(PcapError::Truncated(bytes.len()))?;
    let magic_le = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let (big_endian, nanos) = match magic_le {
        0xa1b2_c3d4 => (false, false),
        0xa1b2_3c4d => (false, true),
        0xd4c3_b2a1 => (true, false),
        0x4d3c_b2a1 => (true, true),
        magic => return Err(PcapError::BadMagic { magic }),
    };
    let word = |b: &[u8], at: usize| {
        let w = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        if big_endian {
            u32::from_be_bytes(w)
        } else {
            u32::from_le_bytes(w)
        }
    };
    let link = word(header, 20);
    if link != 1 {
        return Err(PcapError::LinkType(link));
    }
    let mut out = Vec::new();
    let mut at = 24;
    while at < bytes.len() {
        let rec = bytes
            .get(at..at + 16)
            .ok_or(PcapError::Truncated(bytes.len()))?;
        let secs = u64::from(word(rec, 0));
        let frac = u64::from(word(rec, 4));
        let incl = word(rec, 8) as usize;
        let orig_len = word(rec, 12);
        let data = bytes
            .get(at + 16..at + 16 + incl)
            .ok_or(PcapError::Truncated(bytes.len()))?;
        let ts = Duration::from_secs(secs)
            + if nanos {
                Duration::from_nanos(frac)
            } else {
                Duration::from_micros(frac)
            };
        out.push(Record {
            ts,
            data: data.to_vec(),
            orig_len,
        });
        at += 16 + incl;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(magic: [u8; 4], big: bool, records: &[(u32, u32, &[u8])]) -> Vec<u8> {
        let w = |v: u32| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let h = |v: u16| {
            if big {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let mut f = magic.to_vec();
        f.extend(h(2));
        f.extend(h(4));
        f.extend(w(0));
        f.extend(w(0));
        f.extend(w(65535));
        f.extend(w(1));
        for (s, frac, data) in records {
            f.extend(w(*s));
            f.extend(w(*frac));
            f.extend(w(data.len() as u32));
            f.extend(w(data.len() as u32));
            f.extend_from_slice(data);
        }
        f
    }

    #[test]
    fn both_byte_orders_and_resolutions_read() {
        let recs: &[(u32, u32, &[u8])] = &[(10, 500, b"abc"), (11, 0, b"")];
        let le = parse(&file([0xd4, 0xc3, 0xb2, 0xa1], false, recs)).unwrap();
        assert_eq!(le.len(), 2);
        assert_eq!(le[0].ts, Duration::new(10, 500_000));
        assert_eq!(le[0].data, b"abc");
        let be = parse(&file([0xa1, 0xb2, 0xc3, 0xd4], true, recs)).unwrap();
        assert_eq!(be, le);
        let ns = parse(&file([0x4d, 0x3c, 0xb2, 0xa1], false, recs)).unwrap();
        assert_eq!(ns[0].ts, Duration::new(10, 500));
    }

    #[test]
    fn bad_files_are_typed_errors() {
        assert!(matches!(parse(b"short"), Err(PcapError::Truncated(_))));
        let mut f = file([0xd4, 0xc3, 0xb2, 0xa1], false, &[(1, 2, b"abcd")]);
        assert!(matches!(
            parse(&f[..f.len() - 1]),
            Err(PcapError::Truncated(_))
        ));
        f[0] = 0x0a;
        assert!(matches!(parse(&f), Err(PcapError::BadMagic { .. })));
        let mut g = file([0xd4, 0xc3, 0xb2, 0xa1], false, &[]);
        g[20] = 113;
        assert!(matches!(parse(&g), Err(PcapError::LinkType(113))));
    }
}
