//! Parsing the PROXY protocol header (HAProxy's, versions 1 and 2) that a
//! load balancer sends at the start of each connection, naming the client
//! it stands for. Pure functions over bytes: the reading is in
//! `proxy_header`.
//!
//! Version 1 is a text line, `PROXY TCP4 src dst sport dport\r\n` (or TCP6,
//! or UNKNOWN), 107 bytes at most. Version 2 is binary: a 12-byte
//! signature, a version/command byte, a family byte, a 16-bit length, the
//! addresses, then TLVs, which are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which versions a port accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    V1,
    V2,
    Any,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::V1 => "v1",
            Mode::V2 => "v2",
            Mode::Any => "any",
        }
    }
}

pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 line, CRLF included.
pub const V1_MAX: usize = 107;
/// The longest version 2 header we take (the addresses and TLVs of any
/// HAProxy configuration fit easily).
pub const V2_MAX: usize = 16 + 2048;

/// What the bytes received so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A valid beginning: more bytes are needed.
    Incomplete,
    /// A whole header of `length` bytes; `source` is the client it names,
    /// or `None` when the proxy speaks for itself (v2 LOCAL, v1 UNKNOWN, an
    /// unspecified or Unix family): then the connection's own peer counts.
    Header { length: usize, source: Option<SocketAddr> },
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Error {
    /// Not a PROXY header (of an accepted version) at all.
    Signature,
    /// A version 1 line that is not well formed.
    BadLine,
    /// A version 1 line without CRLF within 107 bytes.
    LineTooLong,
    /// A version 2 header with an unknown version or command.
    BadCommand,
    /// A version 2 header with an unknown family or protocol.
    BadFamily,
    /// A version 2 length too short for its addresses, or over `V2_MAX`.
    BadLength,
}

impl Error {
    pub fn text(self) -> &'static str {
        match self {
            Error::Signature => "not a PROXY protocol header",
            Error::BadLine => "malformed PROXY protocol v1 line",
            Error::LineTooLong => "PROXY protocol v1 line too long",
            Error::BadCommand => "unknown PROXY protocol v2 version or command",
            Error::BadFamily => "unknown PROXY protocol v2 address family or protocol",
            Error::BadLength => "bad PROXY protocol v2 length",
        }
    }
}

/// Parses the start of a connection's bytes.
pub fn parse(bytes: &[u8], mode: Mode) -> Result<Parsed, Error> {
    let v1 = matches!(mode, Mode::V1 | Mode::Any) && b"PROXY ".starts_with(&bytes[..bytes.len().min(6)]);
    let v2 = matches!(mode, Mode::V2 | Mode::Any) && V2_SIGNATURE.starts_with(&bytes[..bytes.len().min(12)]);
    if bytes.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    if v1 {
        parse_v1(bytes)
    } else if v2 {
        parse_v2(bytes)
    } else {
        Err(Error::Signature)
    }
}

fn parse_v1(bytes: &[u8]) -> Result<Parsed, Error> {
    let Some(end) = bytes.windows(2).position(|w| w == b"\r\n") else {
        return if bytes.len() >= V1_MAX { Err(Error::LineTooLong) } else { Ok(Parsed::Incomplete) };
    };
    let length = end + 2;
    if length > V1_MAX {
        return Err(Error::LineTooLong);
    }
    let line = std::str::from_utf8(&bytes[..end]).map_err(|_| Error::BadLine)?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(Parsed::Header { length, source: None }),
        ["PROXY", protocol @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] => {
            let parse_ip = |text: &str| -> Result<IpAddr, Error> {
                match *protocol {
                    "TCP4" => text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| Error::BadLine),
                    _ => text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| Error::BadLine),
                }
            };
            let ip = parse_ip(source)?;
            parse_ip(destination)?;
            let port = parse_port(source_port)?;
            parse_port(destination_port)?;
            Ok(Parsed::Header { length, source: Some(SocketAddr::new(ip, port)) })
        }
        _ => Err(Error::BadLine),
    }
}

/// A decimal port, 0 to 65535, without sign or leading zeros.
fn parse_port(text: &str) -> Result<u16, Error> {
    let well_formed = !text.is_empty()
        && text.len() <= 5
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    if !well_formed {
        return Err(Error::BadLine);
    }
    text.parse().map_err(|_| Error::BadLine)
}

fn parse_v2(bytes: &[u8]) -> Result<Parsed, Error> {
    if bytes.len() < 16 {
        // Check what is there already, so that garbage fails fast.
        if bytes.len() > 12 && bytes[12] >> 4 != 2 {
            return Err(Error::BadCommand);
        }
        return Ok(Parsed::Incomplete);
    }
    let (version, command) = (bytes[12] >> 4, bytes[12] & 0x0f);
    if version != 2 || command > 1 {
        return Err(Error::BadCommand);
    }
    let (family, protocol) = (bytes[13] >> 4, bytes[13] & 0x0f);
    if family > 3 || protocol > 2 {
        return Err(Error::BadFamily);
    }
    let declared = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    let length = 16 + declared;
    if length > V2_MAX {
        return Err(Error::BadLength);
    }
    let needed = match family {
        1 => 12,
        2 => 36,
        3 => 216,
        _ => 0,
    };
    if declared < needed {
        return Err(Error::BadLength);
    }
    if bytes.len() < length {
        return Ok(Parsed::Incomplete);
    }
    // LOCAL (a health check of the proxy's): the proxy's own address.
    if command == 0 {
        return Ok(Parsed::Header { length, source: None });
    }
    if protocol == 2 {
        // Datagrams: not for a TCP server.
        return Err(Error::BadFamily);
    }
    let body = &bytes[16..length];
    let source = match family {
        1 => {
            let ip: [u8; 4] = body[0..4].try_into().expect("checked length");
            Some(SocketAddr::new(IpAddr::V4(ip.into()), u16::from_be_bytes([body[8], body[9]])))
        }
        2 => {
            let ip: [u8; 16] = body[0..16].try_into().expect("checked length");
            Some(SocketAddr::new(IpAddr::V6(ip.into()), u16::from_be_bytes([body[32], body[33]])))
        }
        // Unspecified or Unix: nothing a TCP peer address can say.
        _ => None,
    };
    Ok(Parsed::Header { length, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x20 | command);
        bytes.push(family);
        bytes.extend_from_slice(&(body.len() as u16).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    fn inet4() -> Vec<u8> {
        let mut body = vec![192, 0, 2, 7, 10, 0, 0, 1];
        body.extend_from_slice(&4242u16.to_be_bytes());
        body.extend_from_slice(&80u16.to_be_bytes());
        body
    }

    fn header(length: usize, source: &str) -> Result<Parsed, Error> {
        Ok(Parsed::Header { length, source: Some(source.parse().unwrap()) })
    }

    #[test]
    fn v1_tcp4() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 80\r\nGET /";
        assert_eq!(parse(line, Mode::V1), header(39, "192.0.2.7:4242"));
    }

    #[test]
    fn v1_tcp6() {
        let line = b"PROXY TCP6 2001:db8::7 2001:db8::1 4242 443\r\n";
        assert_eq!(parse(line, Mode::Any), header(line.len(), "[2001:db8::7]:4242"));
    }

    #[test]
    fn v1_unknown_keeps_the_peer() {
        let line = b"PROXY UNKNOWN ffff:f...f:ffff 1 2\r\n";
        assert_eq!(parse(line, Mode::V1), Ok(Parsed::Header { length: line.len(), source: None }));
    }

    #[test]
    fn v1_partial_is_incomplete() {
        assert_eq!(parse(b"PROX", Mode::V1), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PROXY TCP4 192.0.2.7", Mode::V1), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"", Mode::Any), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v1_errors() {
        let bad: &[&[u8]] = &[
            b"PROXY TCP4 192.0.2.7 10.0.0.1 4242\r\n",       // a field missing
            b"PROXY TCP4 192.0.2.999 10.0.0.1 4242 80\r\n",  // not an address
            b"PROXY TCP4 2001:db8::7 10.0.0.1 4242 80\r\n",  // IPv6 for TCP4
            b"PROXY TCP6 192.0.2.7 2001:db8::1 4242 80\r\n", // IPv4 for TCP6
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 80\r\n",   // port too large
            b"PROXY TCP4 192.0.2.7 10.0.0.1 042 80\r\n",     // leading zero
            b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 80\r\n",      // sign
            b"PROXY UDP4 192.0.2.7 10.0.0.1 4242 80\r\n",    // protocol
            b"PROXY TCP4  192.0.2.7 10.0.0.1 4242 80\r\n",   // two spaces
            b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 80 x\r\n",  // a field too many
        ];
        for line in bad {
            assert_eq!(parse(line, Mode::V1), Err(Error::BadLine), "{}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn v1_without_crlf_in_107_bytes_is_too_long() {
        let mut line = b"PROXY TCP6 ".to_vec();
        line.resize(120, b'1');
        assert_eq!(parse(&line, Mode::V1), Err(Error::LineTooLong));
        // A bare LF does not end the line.
        let mut lf = b"PROXY TCP4 192.0.2.7 10.0.0.1 4242 80\nGET / HTTP/1.0".to_vec();
        lf.resize(V1_MAX, b'x');
        assert_eq!(parse(&lf, Mode::V1), Err(Error::LineTooLong));
    }

    #[test]
    fn wrong_signatures() {
        assert_eq!(parse(b"GET / HTTP/1.0\r\n", Mode::Any), Err(Error::Signature));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\r\n", Mode::V2), Err(Error::Signature));
        assert_eq!(parse(&v2(1, 0x11, &inet4()), Mode::V1), Err(Error::Signature));
        assert_eq!(parse(b"\r\n\r\n\0\r\nQUIX\n", Mode::Any), Err(Error::Signature));
        assert_eq!(parse(b"proxy ", Mode::Any), Err(Error::Signature));
    }

    #[test]
    fn v2_inet_proxy() {
        let mut bytes = v2(1, 0x11, &inet4());
        let length = bytes.len();
        bytes.extend_from_slice(b"client data");
        assert_eq!(parse(&bytes, Mode::V2), header(length, "192.0.2.7:4242"));
    }

    #[test]
    fn v2_inet6_proxy() {
        let mut body = vec![0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
        body.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        body.extend_from_slice(&4242u16.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        let bytes = v2(1, 0x21, &body);
        assert_eq!(parse(&bytes, Mode::Any), header(bytes.len(), "[2001:db8::7]:4242"));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        let mut body = inet4();
        body.extend_from_slice(&[0x01, 0x00, 0x02, b'h', b'2']); // ALPN
        body.extend_from_slice(&[0x04, 0x00, 0x00]); // NOOP
        let bytes = v2(1, 0x11, &body);
        assert_eq!(parse(&bytes, Mode::V2), header(bytes.len(), "192.0.2.7:4242"));
    }

    #[test]
    fn v2_local_keeps_the_peer() {
        let bytes = v2(0, 0x00, &[]);
        assert_eq!(parse(&bytes, Mode::V2), Ok(Parsed::Header { length: 16, source: None }));
        let with_addresses = v2(0, 0x11, &inet4());
        assert_eq!(parse(&with_addresses, Mode::V2), Ok(Parsed::Header { length: 28, source: None }));
    }

    #[test]
    fn v2_unspecified_and_unix_keep_the_peer() {
        let unspecified = v2(1, 0x00, &[]);
        assert_eq!(parse(&unspecified, Mode::V2), Ok(Parsed::Header { length: 16, source: None }));
        let unix = v2(1, 0x31, &[0u8; 216]);
        assert_eq!(parse(&unix, Mode::V2), Ok(Parsed::Header { length: 232, source: None }));
    }

    #[test]
    fn v2_split_anywhere_is_incomplete() {
        let bytes = v2(1, 0x11, &inet4());
        for cut in 0..bytes.len() {
            assert_eq!(parse(&bytes[..cut], Mode::V2), Ok(Parsed::Incomplete), "cut at {cut}");
        }
    }

    #[test]
    fn v2_errors() {
        let mut bad_version = v2(1, 0x11, &inet4());
        bad_version[12] = 0x11;
        assert_eq!(parse(&bad_version, Mode::V2), Err(Error::BadCommand));
        assert_eq!(parse(&bad_version[..13], Mode::V2), Err(Error::BadCommand));
        let mut bad_command = v2(1, 0x11, &inet4());
        bad_command[12] = 0x22;
        assert_eq!(parse(&bad_command, Mode::V2), Err(Error::BadCommand));
        assert_eq!(parse(&v2(1, 0x41, &inet4()), Mode::V2), Err(Error::BadFamily));
        assert_eq!(parse(&v2(1, 0x13, &inet4()), Mode::V2), Err(Error::BadFamily));
        assert_eq!(parse(&v2(1, 0x12, &inet4()), Mode::V2), Err(Error::BadFamily));
        assert_eq!(parse(&v2(1, 0x11, &inet4()[..8]), Mode::V2), Err(Error::BadLength));
        assert_eq!(parse(&v2(1, 0x21, &inet4()), Mode::V2), Err(Error::BadLength));
        let oversized = v2(1, 0x11, &vec![0u8; V2_MAX]);
        assert_eq!(parse(&oversized, Mode::V2), Err(Error::BadLength));
    }
}
