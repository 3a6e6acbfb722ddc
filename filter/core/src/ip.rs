//! IP addresses and CIDR ranges, IPv4 and IPv6, for lists and per-app source ranges (BWL-1,
//! OPS-5). IPv4-mapped IPv6 addresses are compared as IPv4.

use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    prefix: u8,
    v4: bool,
}

fn canonical(ip: IpAddr) -> (u128, bool) {
    match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), true),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (u128::from(u32::from(v4)), true),
            None => (u128::from(v6), false),
        },
    }
}

fn mask(prefix: u8, v4: bool) -> u128 {
    let bits = if v4 { 32 } else { 128 };
    if prefix == 0 {
        0
    } else {
        (u128::MAX << (bits - u32::from(prefix)))
            & if v4 { u128::from(u32::MAX) } else { u128::MAX }
    }
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128). Host bits must be zero.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR"))?;
        let (net, v4) = canonical(ip);
        let max = if v4 { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("'{s}' has a bad prefix length"))?,
        };
        if net & !mask(prefix, v4) & if v4 { u128::from(u32::MAX) } else { u128::MAX } != 0 {
            return Err(format!("'{s}' has host bits set"));
        }
        Ok(Cidr { net, prefix, v4 })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (addr, v4) = canonical(ip);
        v4 == self.v4 && addr & mask(self.prefix, v4) == self.net
    }
}

/// A source as the gateway counts it: an IPv4 address (a mapped IPv6 one too), or an IPv6
/// address's `/v6_prefix` network (one host holds a whole /64). The text of [`source_net`].
pub fn source(ip: IpAddr, v6_prefix: u8) -> String {
    let (net, bits) = source_net(ip, v6_prefix);
    let net = std::net::Ipv6Addr::from(net);
    match net.to_ipv4_mapped() {
        // only an IPv4 source is a mapped address with 32 bits (a masked IPv6 network never is)
        Some(v4) if bits == 32 => v4.to_string(),
        _ => format!("{net}/{bits}"),
    }
}

/// A source as bytes (the one place its prefix rule is written): the IPv4 address (16 bytes,
/// mapped form) with 32, or the IPv6 network with its prefix length.
pub fn source_net(ip: IpAddr, v6_prefix: u8) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 32),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (v4.to_ipv6_mapped().octets(), 32),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                ((u128::from(v6) & mask).to_be_bytes(), bits as u8)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_source_is_named_by_its_address_or_its_v6_network() {
        assert_eq!(source(ip("192.0.2.7"), 64), "192.0.2.7");
        assert_eq!(source(ip("::ffff:192.0.2.7"), 64), "192.0.2.7");
        assert_eq!(source(ip("2001:db8:1:2::77"), 64), "2001:db8:1:2::/64");
        assert_eq!(source(ip("2001:db8:1:2::77"), 32), "2001:db8::/32");
        assert_eq!(source(ip("2001:db8:1:2::77"), 128), "2001:db8:1:2::77/128");
        assert_eq!(source(ip("2001:db8:1:2::77"), 0), "::/0");
        assert_eq!(source(ip("::ffff:0:0:1"), 96), "::ffff:0:0:0/96");
    }

    #[test]
    fn v4_and_v6() {
        let c = Cidr::parse("203.0.113.0/24").unwrap();
        assert!(c.contains(ip("203.0.113.9")));
        assert!(c.contains(ip("::ffff:203.0.113.9")));
        assert!(!c.contains(ip("203.0.114.1")));
        assert!(!c.contains(ip("2001:db8::1")));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains(ip("2001:db8:ffff::1")));
        assert!(!c.contains(ip("2001:db9::1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
    }

    #[test]
    fn refuses_bad_ranges() {
        for bad in [
            "10.0.0.1/8",
            "10.0.0.0/33",
            "2001:db8::1/32",
            "nope",
            "10.0.0.0/x",
            "",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }
}
