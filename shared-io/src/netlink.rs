//! Reading the answers to a netlink request, as jitsu-dns's rtnetlink client (the process
//! backend's links and addresses) and synjitsu's forwarding table both do: one datagram at a
//! time, each split into its messages, those of other requests (stale answers) skipped.
//!
//! Owns only the framing; what a message means (an acknowledgement, an error, a link, a
//! neighbour) is each caller's, parsed with `netlink-packet-route`.

use std::io;

use netlink_packet_core::NetlinkBuffer;
use netlink_sys::Socket;

/// Receives one datagram into `rx` (cleared first), again when a signal interrupts.
pub fn recv(sock: &Socket, rx: &mut Vec<u8>) -> io::Result<()> {
    loop {
        rx.clear();
        match sock.recv(rx, 0) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The datagram's messages answering request `seq`, in order, each exactly its own bytes; a
/// message that says it is longer than what is left, or shorter than its header, is an
/// [`io::ErrorKind::InvalidData`] error, and ends the datagram.
pub fn answers(datagram: &[u8], seq: u32) -> impl Iterator<Item = io::Result<&[u8]>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        loop {
            if rest.is_empty() {
                return None;
            }
            let Ok(buf) = NetlinkBuffer::new_checked(rest) else {
                rest = &[];
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "malformed netlink message",
                )));
            };
            let len = buf.length() as usize;
            let mine = buf.sequence_number() == seq;
            let m = &rest[..len];
            // Messages are 4-byte aligned; the last may end the datagram unpadded.
            rest = &rest[((len + 3) & !3).min(rest.len())..];
            if mine {
                return Some(Ok(m));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message of `len` bytes (at least a header) for request `seq`.
    fn message(len: u32, seq: u32) -> Vec<u8> {
        let mut m = vec![0u8; len as usize];
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
        m[8..12].copy_from_slice(&seq.to_ne_bytes());
        m
    }

    #[test]
    fn a_datagrams_messages_for_the_request_come_whole_and_in_order_others_skipped() {
        let mut d = message(20, 7); // padded to 20 already
        d.extend(message(18, 6)); // another request's, padded to 20
        d.extend([0, 0]);
        d.extend(message(17, 7)); // the last one, unpadded
        let got: Vec<_> = answers(&d, 7).map(|m| m.unwrap().len()).collect();
        assert_eq!(got, [20, 17]);
    }

    #[test]
    fn a_cut_message_is_an_error_and_ends_the_datagram() {
        let mut d = message(20, 7);
        d.truncate(12);
        let mut it = answers(&d, 7);
        assert_eq!(
            it.next().unwrap().unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        assert!(it.next().is_none());
    }
}
