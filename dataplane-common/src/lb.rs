//! Load balancing: which backend of a service a connect or datagram goes to.
//!
//! Pure functions, called by the kernel's connect and sendmsg programs and unit-tested on the
//! host. They must stay verifier-friendly: 32-bit arithmetic only (no 128-bit operations, which
//! the BPF backend cannot lower), no loops, no panics (a `% 0` would be one).

use crate::service_flags;

/// A well-mixed 32-bit hash of an address (the murmur3 finaliser over the folded words), so
/// client-address affinity spreads clients over backends evenly: pod addresses are usually
/// consecutive, and `addr % count` of them would follow the allocation pattern instead.
///
/// Changing it moves affinity clients to other backends on upgrade; a test pins its values.
#[inline(always)]
pub const fn hash_addr(ip: &[u32; 4]) -> u32 {
    let mut h = ip[0] ^ ip[1].rotate_left(7) ^ ip[2].rotate_left(14) ^ ip[3].rotate_left(21);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The index (`0..count`) of the backend to use.
///
/// - `flags`: the service's [`service_flags`]. With [`service_flags::AFFINITY_CLIENT_ADDR`] the
///   choice is [`hash_addr`] of `client_addr` (the pod's address, since a connecting socket has
///   no source address yet), so one client always gets the same backend while the set is
///   unchanged; otherwise it is `random % count`.
/// - `random`: a fresh random number (`bpf_get_prandom_u32`); ignored with affinity.
/// - `count`: the number of backends. A service without backends is refused before a choice is
///   made; for `count == 0` this returns 0 rather than divide by zero.
#[inline(always)]
pub const fn choose_backend(flags: u32, client_addr: &[u32; 4], random: u32, count: u32) -> u32 {
    if count == 0 {
        return 0;
    }
    let pick = if flags & service_flags::AFFINITY_CLIENT_ADDR != 0 {
        hash_addr(client_addr)
    } else {
        random
    };
    pick % count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipv4_mapped;

    const AFFINITY: u32 = service_flags::AFFINITY_CLIENT_ADDR;

    /// 10.244.(i / 250).(i % 250 + 1), IPv4-mapped, in the kernel's byte order: consecutive pod
    /// addresses, the usual client population of a node.
    fn pod_v4(i: u32) -> [u32; 4] {
        ipv4_mapped(u32::from_ne_bytes([
            10,
            244,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ]))
    }

    /// fd00::(i), consecutive IPv6 pod addresses.
    fn pod_v6(i: u32) -> [u32; 4] {
        [u32::from_ne_bytes([0xfd, 0, 0, 0]), 0, 0, i.to_be()]
    }

    #[test]
    fn hash_values_are_pinned() {
        // Endian-independent: the hash works on the u32 values. 0x0701_f40a is 10.244.1.7 as a
        // little-endian host reads it, 0xffff_0000 the ::ffff: marker.
        assert_eq!(hash_addr(&[0, 0, 0xffff_0000, 0x0701_f40a]), 0xd8ab_e744);
        assert_eq!(hash_addr(&[0x0000_00fd, 0, 0, 0x0100_0000]), 0xfd84_0f48);
        assert_eq!(hash_addr(&[0; 4]), 0);
    }

    #[test]
    fn affinity_is_stable_for_one_client_and_ignores_random() {
        for i in 0..100 {
            let client = pod_v4(i);
            let first = choose_backend(AFFINITY, &client, 0, 7);
            for random in [1, 2, 0xdead_beef, u32::MAX] {
                assert_eq!(
                    choose_backend(AFFINITY, &client, random, 7),
                    first,
                    "client {i} moved with random {random:#x}"
                );
            }
            assert_eq!(first, hash_addr(&client) % 7);
        }
    }

    #[test]
    fn affinity_spreads_many_clients_evenly() {
        const CLIENTS: u32 = 10_000;
        const BACKENDS: u32 = 7;
        for (family, addr) in [("IPv4", pod_v4 as fn(u32) -> [u32; 4]), ("IPv6", pod_v6)] {
            let mut per_backend = [0u32; BACKENDS as usize];
            for i in 0..CLIENTS {
                per_backend[choose_backend(AFFINITY, &addr(i), 0, BACKENDS) as usize] += 1;
            }
            let share = f64::from(CLIENTS) / f64::from(BACKENDS);
            for (b, n) in per_backend.iter().enumerate() {
                let ratio = f64::from(*n) / share;
                assert!(
                    (0.9..=1.1).contains(&ratio),
                    "{family}: backend {b} got {n} of {CLIENTS} clients ({ratio:.2}x its share); \
                     all: {per_backend:?}"
                );
            }
        }
    }

    #[test]
    fn random_choice_is_random_mod_count() {
        let client = pod_v4(3);
        for random in [0, 1, 6, 7, 8, 1000, 0x8000_0000, u32::MAX] {
            for count in [1, 2, 3, 7, 4096] {
                assert_eq!(choose_backend(0, &client, random, count), random % count);
            }
        }
    }

    #[test]
    fn index_is_always_below_count() {
        for count in 1..=64 {
            for i in 0..256u32 {
                let random = i.wrapping_mul(0x9e37_79b9);
                for flags in [0, AFFINITY] {
                    let idx = choose_backend(flags, &pod_v6(i), random, count);
                    assert!(
                        idx < count,
                        "index {idx} for {count} backends (flags {flags})"
                    );
                }
            }
        }
        assert!(choose_backend(AFFINITY, &[u32::MAX; 4], u32::MAX, u32::MAX) < u32::MAX);
    }

    #[test]
    fn one_backend_is_always_index_zero() {
        for i in 0..1000 {
            assert_eq!(
                choose_backend(0, &pod_v4(i), i.wrapping_mul(2_654_435_761), 1),
                0
            );
            assert_eq!(choose_backend(AFFINITY, &pod_v4(i), i, 1), 0);
        }
    }

    #[test]
    fn no_backends_is_index_zero_not_a_panic() {
        assert_eq!(choose_backend(0, &pod_v4(1), 5, 0), 0);
        assert_eq!(choose_backend(AFFINITY, &pod_v4(1), 5, 0), 0);
    }
}
