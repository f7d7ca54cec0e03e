//! Building a [`SockKey`] from a program context. The context fields are read one 32-bit word at
//! a time: the verifier rejects wider loads from `bpf_sock_ops` and `sk_msg_md`.

use core::ptr::{addr_of, read_volatile};

use dataplane_common::{SockKey, ipv4_mapped};

pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// The fields both contexts share, read with 4-byte loads.
pub struct RawTuple {
    pub family: u32,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    /// Host byte order already.
    pub local_port: u32,
    /// Network byte order in the low 16 bits, as the kernel stores it.
    pub remote_port_be: u32,
}

/// Reads the tuple fields of a `bpf_sock_ops` or `sk_msg_md` pointer; both contexts name them
/// alike but are different types, hence a macro.
macro_rules! raw_tuple {
    ($ctx:expr) => {{
        let c = $ctx;
        // SAFETY: `c` is the live program context; every field is read with a 4-byte load.
        unsafe {
            $crate::key::RawTuple {
                family: $crate::key::u32_field(&raw const (*c).family),
                local_ip4: $crate::key::u32_field(&raw const (*c).local_ip4),
                remote_ip4: $crate::key::u32_field(&raw const (*c).remote_ip4),
                local_ip6: $crate::key::read_ip6(&raw const (*c).local_ip6),
                remote_ip6: $crate::key::read_ip6(&raw const (*c).remote_ip6),
                local_port: $crate::key::u32_field(&raw const (*c).local_port),
                remote_port_be: $crate::key::u32_field(&raw const (*c).remote_port),
            }
        }
    }};
}
pub(crate) use raw_tuple;

/// Reads four consecutive u32 context words.
///
/// # Safety
/// `p` must point at a `[u32; 4]` inside a program context.
#[inline(always)]
pub unsafe fn read_ip6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    // SAFETY: the caller guarantees four readable words.
    unsafe {
        [
            read_volatile(p),
            read_volatile(p.add(1)),
            read_volatile(p.add(2)),
            read_volatile(p.add(3)),
        ]
    }
}

#[inline(always)]
pub fn u32_field(p: *const u32) -> u32 {
    // SAFETY: only called with pointers to fields of the live program context.
    unsafe { read_volatile(addr_of!(*p)) }
}

/// The socket's own key. `None` for families other than IPv4 and IPv6.
#[inline(always)]
pub fn sock_key(netns: u64, t: &RawTuple) -> Option<SockKey> {
    let (local_ip, remote_ip) = match t.family {
        AF_INET => (ipv4_mapped(t.local_ip4), ipv4_mapped(t.remote_ip4)),
        // An AF_INET6 socket talking IPv4 already carries ::ffff:a.b.c.d, which matches the
        // IPv4 form above, so a v4 client and a dual-stack server find each other.
        AF_INET6 => (t.local_ip6, t.remote_ip6),
        _ => return None,
    };
    Some(SockKey {
        netns,
        local_ip,
        remote_ip,
        local_port: t.local_port,
        // The kernel keeps remote_port in network byte order: see the design notes.
        remote_port: u32::from_be(t.remote_port_be) & 0xffff,
    })
}
