//! Addresses between user space and the maps. The kernel programs keep every address as IPv6,
//! IPv4 as IPv4-mapped (`::ffff:a.b.c.d`), each 32-bit word in network byte order as the kernel
//! hands it over; ports in host byte order. One place converts both ways, so an IPv4 pod given as
//! `::ffff:10.1.2.3` is the same pod as `10.1.2.3`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use dataplane_common::Addr;

/// The map key form of an address.
pub fn ip_key(ip: &IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*v6, |v4| v4.to_ipv6_mapped()),
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The address of a map key: IPv4-mapped keys become IPv4 addresses.
pub fn key_ip(key: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in key.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

/// A socket address from a key address and a port as the maps keep it (host order, in a u32;
/// the upper half is never set by the kernel programs).
pub fn key_socket_addr(ip: [u32; 4], port: u32) -> SocketAddr {
    SocketAddr::new(key_ip(ip), port as u16)
}

/// A socket address in the maps' [`Addr`] form.
pub fn map_addr(a: &SocketAddr) -> Addr {
    Addr {
        ip: ip_key(&a.ip()),
        port: u32::from(a.port()),
    }
}

/// The mask of a prefix in key form. For an IPv4 prefix the IPv4-mapped part (`::ffff:0:0/96`)
/// must match exactly too, so the upper three words are all ones.
pub fn prefix_mask(net: &ipnet::IpNet) -> [u32; 4] {
    match net {
        ipnet::IpNet::V4(n) => {
            let mut m = ip_key(&IpAddr::V4(n.netmask()));
            m[0] = u32::MAX;
            m[1] = u32::MAX;
            m[2] = u32::MAX;
            m
        }
        ipnet::IpNet::V6(n) => ip_key(&IpAddr::V6(n.netmask())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_keys_match_the_kernel_form() {
        let k = ip_key(&"10.1.2.3".parse().unwrap());
        assert_eq!(
            k,
            dataplane_common::ipv4_mapped(u32::from_ne_bytes([10, 1, 2, 3]))
        );
        // A v4-mapped v6 address is the same pod as its v4 form.
        assert_eq!(ip_key(&"::ffff:10.1.2.3".parse().unwrap()), k);
        assert!(dataplane_common::is_ipv4_mapped(&k));
    }

    #[test]
    fn keys_round_trip() {
        for ip in [
            "10.1.2.3",
            "fd00::1",
            "::1",
            "127.0.0.1",
            "0.0.0.0",
            "2001:db8::ff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(key_ip(ip_key(&ip)), ip, "{ip}");
        }
        // A v4-mapped v6 address comes back as IPv4: one pod, one spelling.
        assert_eq!(
            key_ip(ip_key(&"::ffff:10.0.0.9".parse().unwrap())),
            "10.0.0.9".parse::<IpAddr>().unwrap()
        );
        let sa: SocketAddr = "[fd00::2]:8080".parse().unwrap();
        let a = map_addr(&sa);
        assert_eq!(key_socket_addr(a.ip, a.port), sa);
    }

    #[test]
    fn loopback_in_key_form_is_what_the_kernel_checks() {
        assert!(dataplane_common::is_loopback(&ip_key(
            &"127.0.0.1".parse().unwrap()
        )));
        assert!(dataplane_common::is_loopback(&ip_key(
            &"::1".parse().unwrap()
        )));
        assert!(!dataplane_common::is_loopback(&ip_key(
            &"10.0.0.1".parse().unwrap()
        )));
    }

    #[test]
    fn prefix_masks_match_exactly_what_they_should() {
        let c = |net: &str, ip: &str| {
            let net: ipnet::IpNet = net.parse().unwrap();
            let cidr = dataplane_common::Cidr {
                net: ip_key(&net.trunc().addr()),
                mask: prefix_mask(&net),
            };
            cidr.contains(&ip_key(&ip.parse().unwrap()))
        };
        assert!(c("10.96.0.0/12", "10.100.1.1"));
        assert!(!c("10.96.0.0/12", "10.112.0.1"));
        assert!(c("0.0.0.0/0", "192.0.2.1"));
        // An IPv4 prefix never matches an IPv6 address, even /0.
        assert!(!c("0.0.0.0/0", "fd00::1"));
        assert!(c("fd00::/8", "fd12::1"));
        assert!(!c("fd00::/8", "fe80::1"));
    }
}
