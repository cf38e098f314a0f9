//! The wire form of a question's name, read without hickory: what the transport compresses
//! a response's names against.
//!
//! Owns recognising a plain name (labels up to the root, no compression pointer) at the
//! start of some bytes. It decides nothing about answers.

/// The longest name on the wire (RFC 1035 section 3.1), its root label included.
const MAX_NAME: usize = 255;

/// The length of the plain name (labels of at most 63 bytes, ending in the root label, at
/// most 255 bytes) at the start of `bytes`, or `None` if it is not one (a compression
/// pointer, an extended label type, too long, cut short).
pub(crate) fn plain_name_len(bytes: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len > 63 || at + 1 + len > MAX_NAME {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            return Some(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_labels_up_to_the_root_within_255_bytes() {
        assert_eq!(plain_name_len(&[0]), Some(1));
        assert_eq!(plain_name_len(&[1, b'a', 0, 9]), Some(3));
        assert_eq!(plain_name_len(&[1, b'a']), None);
        assert_eq!(plain_name_len(&[0xc0, 0]), None);
        let mut long = Vec::new();
        for _ in 0..4 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert_eq!(long.len(), 257);
        assert_eq!(plain_name_len(&long), None);
        let fits = [&long[..192], &[61], &[b'a'; 61][..], &[0]].concat();
        assert_eq!(fits.len(), 255);
        assert_eq!(plain_name_len(&fits), Some(255));
    }
}
