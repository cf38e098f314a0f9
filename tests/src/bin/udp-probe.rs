//! `udp-probe <addr:port> <hex> [timeout-ms]`: sends one UDP datagram (given in hex) and
//! prints the reply in hex, for DNS messages no client will build (two questions, garbage).
//! Exits 1 if no reply comes in time.

use std::net::UdpSocket;
use std::time::Duration;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, hex, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: udp-probe <addr:port> <hex> [timeout-ms]");
    };
    let timeout: u64 = rest.first().map(|t| t.parse()).transpose()?.unwrap_or(3000);
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()?;
    let sock = UdpSocket::bind(if addr.starts_with('[') {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    })?;
    sock.set_read_timeout(Some(Duration::from_millis(timeout)))?;
    sock.send_to(&bytes, addr)?;
    let mut buf = [0u8; 65535];
    let (n, _) = sock
        .recv_from(&mut buf)
        .map_err(|e| anyhow::anyhow!("no reply within {timeout} ms: {e}"))?;
    println!(
        "{}",
        buf[..n]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    Ok(())
}
