//! Hand-made archives for the hostile-bundle tests: ustar headers written byte by byte, so an
//! entry can have any name, link target, type, mode or checksum, which `tar::Builder` refuses
//! to produce.

use std::io::Write;

/// One raw entry.
pub struct Entry {
    pub name: String,
    pub kind: u8,
    pub mode: u32,
    pub link: String,
    pub data: Vec<u8>,
    /// Written with a wrong header checksum.
    pub bad_checksum: bool,
}

impl Entry {
    pub fn file(name: &str, data: &[u8], mode: u32) -> Entry {
        Entry {
            name: name.into(),
            kind: b'0',
            mode,
            link: String::new(),
            data: data.to_vec(),
            bad_checksum: false,
        }
    }

    pub fn dir(name: &str) -> Entry {
        Entry {
            kind: b'5',
            ..Entry::file(name, b"", 0o755)
        }
    }

    pub fn symlink(name: &str, target: &str) -> Entry {
        Entry {
            kind: b'2',
            link: target.into(),
            ..Entry::file(name, b"", 0o777)
        }
    }

    pub fn hardlink(name: &str, target: &str) -> Entry {
        Entry {
            kind: b'1',
            link: target.into(),
            ..Entry::file(name, b"", 0o644)
        }
    }

    pub fn special(name: &str, kind: u8) -> Entry {
        Entry {
            kind,
            ..Entry::file(name, b"", 0o644)
        }
    }
}

fn octal(field: &mut [u8], value: u64) {
    let s = format!("{value:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

/// The 512-byte ustar header of `e` (names up to 100 bytes; longer ones use the prefix).
fn header(e: &Entry) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = e.name.as_bytes();
    if name.len() <= 100 {
        h[..name.len()].copy_from_slice(name);
    } else {
        let split = e.name[..e.name.len() - 100]
            .rfind('/')
            .map(|i| i + 1)
            .unwrap_or(0);
        let split = e.name[split..]
            .find('/')
            .map(|i| split + i)
            .unwrap_or(split);
        let (prefix, rest) = e.name.split_at(split);
        let rest = rest.trim_start_matches('/');
        h[..rest.len()].copy_from_slice(rest.as_bytes());
        h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    }
    octal(&mut h[100..108], u64::from(e.mode));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], e.data.len() as u64);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = e.kind;
    h[157..157 + e.link.len()].copy_from_slice(e.link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let mut sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    if e.bad_checksum {
        sum += 1;
    }
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// The uncompressed tar stream of `entries`, with the end-of-archive blocks.
pub fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        out.extend_from_slice(&header(e));
        out.extend_from_slice(&e.data);
        let pad = (512 - e.data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend([0u8; 1024]);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A gzip-compressed tar of `entries`.
pub fn bundle(entries: &[Entry]) -> Vec<u8> {
    gzip(&tar(entries))
}
