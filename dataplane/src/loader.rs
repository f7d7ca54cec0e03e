//! Loading, pinning and attaching: turns the embedded ELF into attached programs and open maps.
//!
//! Pins live under `<bpffs>/v<ABI_VERSION>/{maps,links}`. A pinned map is reused only when its
//! type, key size, value size and capacity match the map table in `dataplane-common` (aya itself
//! reuses a pin without looking). Links are pinned so that neither SIGTERM nor SIGKILL of the
//! agent detaches anything; a restarted agent swaps its fresh programs into the pinned links
//! atomically. This module must never detach or unpin anything except in [`unpin_all`].

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapInfo, MapType, SockHash},
    programs::{
        SkMsg,
        links::{FdLink, PinnedLink},
    },
};
use dataplane_common::{
    Flow, SockKey, map_names,
    maps::{LoadSizes, MapSpec},
    program_names,
};
use meshlane_api::types::AttachedProgram;

pub use meshlane_api::pins::{PinPaths, unpin_all};

use crate::{Error, Result, bpf_sys, maps::Maps};

/// The kernel programs, built by `build.rs` from `dataplane-ebpf`.
pub static EBPF_ELF: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane-ebpf"));

/// Where the programs are pinned and attached, and how big the adjustable maps are.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The bpffs directory given with `--bpffs`; pins go under `v<ABI_VERSION>/` inside it.
    pub bpffs: PathBuf,
    /// The cgroup v2 directory the cgroup programs attach to.
    pub cgroup: PathBuf,
    /// Capacity of the SOCKHASH (and, twice that, of the per-socket statistics), and the
    /// size of the flow event ring.
    pub sizes: LoadSizes,
}

/// The map table as this agent loads it: `dataplane-common`'s table with the load-time
/// capacities applied.
pub fn expected_maps(sizes: LoadSizes) -> Vec<MapSpec> {
    dataplane_common::maps::ALL
        .iter()
        .map(|m| MapSpec {
            max_entries: m.max_entries_at_load(sizes),
            ..*m
        })
        .collect()
}

/// The maps telemetry reads (the event ring and the flow map) and writes (where the kernel
/// copies payload from next).
pub struct TelemetryMaps {
    pub ring: MapData,
    pub flows: HashMap<MapData, u64, Flow>,
    pub http_next: HashMap<MapData, u64, [u64; 2]>,
}

fn describe(ty: MapType, key: u32, value: u32, max: u32) -> String {
    format!("{ty:?} key {key} B, value {value} B, {max} entries")
}

/// The loaded programs. Holding this keeps the program fds open; dropping it would detach the
/// sk_msg program (see `attach_sk_msg`), so the agent keeps it for its whole life.
pub struct Loaded {
    _ebpf: Ebpf,
    pub pins: PinPaths,
    pub options: LoadOptions,
    pub programs: Vec<AttachedProgram>,
    /// Whether maps from an earlier agent were found and reused.
    pub reused_pins: bool,
    /// Whether guarded readers are detected, and how.
    pub reader_guard: ReaderGuard,
}

/// The reader guard as `meshlane status` shows it.
#[derive(Clone, Debug)]
pub struct ReaderGuard {
    pub active: bool,
    pub detail: String,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("pins", &self.pins)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

/// Checks every existing pin against the layout this build expects. Returns whether any pin
/// exists.
fn check_pins(pins: &PinPaths, sizes: LoadSizes) -> Result<bool> {
    let mut any = false;
    for l in expected_maps(sizes) {
        let path = pins.maps.join(l.name);
        if !path.exists() {
            continue;
        }
        any = true;
        let info = MapInfo::from_pin(&path).map_err(|source| Error::Map {
            name: l.name,
            source,
        })?;
        let ty = info.map_type().map_err(|source| Error::Map {
            name: l.name,
            source,
        })?;
        let found = (ty, info.key_size(), info.value_size(), info.max_entries());
        let want = (
            MapType::from(l.kind),
            l.key_size,
            l.value_size,
            l.max_entries,
        );
        if found != want {
            return Err(Error::PinMismatch {
                path,
                expected: describe(want.0, want.1, want.2, want.3),
                found: describe(found.0, found.1, found.2, found.3),
            });
        }
    }
    Ok(any)
}

/// Loads the programs, reusing matching pins, and attaches them. Redirect stays as the CONFIG
/// map says (off on a fresh install); the caller switches it after the self-test.
pub fn load(options: LoadOptions) -> Result<(Loaded, Maps, TelemetryMaps)> {
    let pins = PinPaths::new(&options.bpffs);
    for dir in [&pins.maps, &pins.links] {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io("creating the pin directory", dir, e))?;
    }
    let reused_pins = check_pins(&pins, options.sizes)?;

    let mut loader = EbpfLoader::new();
    if std::env::var_os("MESHLANE_VERIFIER_LOG").is_some() {
        // Full verifier logs in load errors, for diagnosing a kernel that refuses a program.
        loader.verifier_log_level(aya::VerifierLogLevel::VERBOSE | aya::VerifierLogLevel::STATS);
    }
    loader.default_map_pin_directory(&pins.maps);
    for m in expected_maps(options.sizes)
        .into_iter()
        .filter(|m| m.adjustable())
    {
        loader.map_max_entries(m.name, m.max_entries);
    }
    let mut ebpf = loader.load(EBPF_ELF)?;

    let mut programs = Vec::new();
    // Before sockops creates flows, so their bytes and their end are seen.
    programs.append(&mut attach_telemetry(&mut ebpf, &pins)?);
    for p in CGROUP_PROGRAMS {
        programs.push(attach_cgroup(&mut ebpf, &pins, &options.cgroup, p)?);
    }
    let socks: SockHash<MapData, SockKey> = take(&mut ebpf, map_names::SOCKHASH)?;
    programs.push(attach_sk_msg(&mut ebpf, &socks)?);
    let reader_guard = match attach_reader_guard(&mut ebpf) {
        Ok((mut attached, uring)) => {
            programs.append(&mut attached);
            ReaderGuard {
                active: true,
                detail: format!(
                    "tracepoint and setsockopt detection: a pod seen reading a socket with \
                     splice(2), sendfile(2), io_uring splice or MSG_WAITALL, or setting \
                     SO_RCVLOWAT, gets no redirected bytes on its new connections{}; the \
                     stronger guards, which would fail a splice with EINVAL before any byte is \
                     consumed, are not built: {}",
                    if uring {
                        ""
                    } else {
                        " (io_uring splices are not watched: this kernel has no io_uring \
                         tracepoints)"
                    },
                    stronger_guards()
                ),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "the reader guard is not active");
            ReaderGuard {
                active: false,
                detail: format!("not active: {e}"),
            }
        }
    };
    let maps = Maps {
        netns: take(&mut ebpf, map_names::NETNS)?,
        endpoints: take(&mut ebpf, map_names::ENDPOINTS)?,
        stats: take(&mut ebpf, map_names::SOCK_STATS)?,
        counters: take(&mut ebpf, map_names::COUNTERS)?,
        config: take(&mut ebpf, map_names::CONFIG)?,
        socks,
        services: take(&mut ebpf, map_names::SERVICES)?,
        backends: take(&mut ebpf, map_names::BACKENDS)?,
        svc_stats: take(&mut ebpf, map_names::SVC_STATS)?,
        sidecars: take(&mut ebpf, map_names::SIDECARS)?,
        noaccel: take(&mut ebpf, map_names::NOACCEL_PORTS)?,
        reader_pods: take(&mut ebpf, map_names::READER_PODS)?,
        spliced: take(&mut ebpf, map_names::SPLICED)?,
    };
    let telemetry = TelemetryMaps {
        ring: match ebpf.take_map(map_names::EVENTS) {
            Some(aya::maps::Map::RingBuf(m)) => m,
            _ => {
                return Err(Error::Map {
                    name: map_names::EVENTS,
                    source: aya::maps::MapError::InvalidName {
                        name: map_names::EVENTS.into(),
                    },
                });
            }
        },
        flows: take(&mut ebpf, map_names::FLOWS)?,
        http_next: take(&mut ebpf, map_names::HTTP_NEXT)?,
    };
    Ok((
        Loaded {
            _ebpf: ebpf,
            pins,
            options,
            programs,
            reused_pins,
            reader_guard,
        },
        maps,
        telemetry,
    ))
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| Error::Map {
        name,
        source: aya::maps::MapError::InvalidName { name: name.into() },
    })?;
    T::try_from(map).map_err(|source| Error::Map { name, source })
}

/// The cgroup programs, where they attach, and how `meshlane status` describes them.
const CGROUP_PROGRAMS: [(&str, u32, &str); 11] = {
    use bpf_sys::attach_type as at;
    [
        (
            program_names::SOCKOPS,
            at::CGROUP_SOCK_OPS,
            "cgroup_sock_ops",
        ),
        (
            program_names::CONNECT4,
            at::CGROUP_INET4_CONNECT,
            "cgroup/connect4",
        ),
        (
            program_names::CONNECT6,
            at::CGROUP_INET6_CONNECT,
            "cgroup/connect6",
        ),
        (
            program_names::SENDMSG4,
            at::CGROUP_UDP4_SENDMSG,
            "cgroup/sendmsg4",
        ),
        (
            program_names::SENDMSG6,
            at::CGROUP_UDP6_SENDMSG,
            "cgroup/sendmsg6",
        ),
        (
            program_names::RECVMSG4,
            at::CGROUP_UDP4_RECVMSG,
            "cgroup/recvmsg4",
        ),
        (
            program_names::RECVMSG6,
            at::CGROUP_UDP6_RECVMSG,
            "cgroup/recvmsg6",
        ),
        (
            program_names::GETPEERNAME4,
            at::CGROUP_INET4_GETPEERNAME,
            "cgroup/getpeername4",
        ),
        (
            program_names::GETPEERNAME6,
            at::CGROUP_INET6_GETPEERNAME,
            "cgroup/getpeername6",
        ),
        (
            program_names::GETSOCKOPT,
            at::CGROUP_GETSOCKOPT,
            "cgroup/getsockopt",
        ),
        (
            program_names::SETSOCKOPT,
            at::CGROUP_SETSOCKOPT,
            "cgroup/setsockopt (reader guard)",
        ),
    ]
};

/// The ELF's program `name`.
fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Internal(format!("the ELF has no program {name}")))
}

/// Loads the ELF's program `name` (of one of the types meshlane uses) and returns its id.
fn load_named(ebpf: &mut Ebpf, name: &'static str) -> Result<u32> {
    use aya::programs::Program;
    let prog = program(ebpf, name)?;
    match prog {
        Program::SockOps(p) => p.load(),
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSockopt(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::TracePoint(p) => p.load(),
        Program::RawTracePoint(p) => p.load(),
        other => {
            return Err(Error::Internal(format!(
                "program {name} has unexpected type {:?}",
                other.prog_type()
            )));
        }
    }
    .map_err(|source| Error::Program { name, source })?;
    Ok(prog
        .info()
        .map_err(|source| Error::Program { name, source })?
        .id())
}

/// Loads a cgroup program and attaches it through a pinned bpf_link, or, when an earlier agent
/// left the link, swaps the new program into it in one step (BPF_LINK_UPDATE), so sockets
/// connecting right now are handled by one program or the other, never by neither. A cgroup
/// bpf_link coexists with other programs on the cgroup.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    pins: &PinPaths,
    cgroup: &Path,
    (name, attach_type, what): (&'static str, u32, &str),
) -> Result<AttachedProgram> {
    let id = load_named(ebpf, name)?;
    let prog_fd = program(ebpf, name)?
        .fd()
        .map_err(|source| Error::Program { name, source })?;
    let link_path = pins.link(name);
    if link_path.exists() {
        let link = bpf_sys::obj_get(&link_path)
            .map_err(|e| Error::io("opening the pinned link", &link_path, e))?;
        bpf_sys::link_update(link.as_fd(), prog_fd.as_fd())
            .map_err(|e| Error::io("BPF_LINK_UPDATE", &link_path, e))?;
        tracing::debug!(link = %link_path.display(), "reused the pinned link");
    } else {
        let cg = File::open(cgroup).map_err(|e| Error::io("opening the cgroup", cgroup, e))?;
        let link = bpf_sys::link_create(prog_fd.as_fd(), cg.as_fd(), attach_type)
            .map_err(|e| Error::io("attaching a program to the cgroup", cgroup, e))?;
        bpf_sys::obj_pin(link.as_fd(), &link_path)
            .map_err(|e| Error::io("pinning the link", &link_path, e))?;
        tracing::debug!(cgroup = %cgroup.display(), program = name, "attached");
    }
    Ok(AttachedProgram {
        name: name.into(),
        id,
        attach: format!("{what} {} (bpf_link)", cgroup.display()),
        pinned_link: Some(link_path),
    })
}

/// Attaches sk_msg to the SOCKHASH. This is a map attachment, not a link: the map keeps the
/// program for as long as the map lives (it is pinned), so a killed agent leaves it in place. A
/// new attach simply replaces the program for sockets inserted from then on.
fn attach_sk_msg(ebpf: &mut Ebpf, socks: &SockHash<MapData, SockKey>) -> Result<AttachedProgram> {
    let name = program_names::SK_MSG;
    let id = load_named(ebpf, name)?;
    let prog: &mut SkMsg = program(ebpf, name)?
        .try_into()
        .map_err(|source| Error::Program { name, source })?;
    let link_id = prog
        .attach(socks.fd())
        .map_err(|source| Error::Program { name, source })?;
    // aya detaches on drop; we must not, or stopping the agent would stop the fast path for new
    // sockets. Forgetting the handle leaves the attachment owned by the pinned map; `uninstall`
    // removes the map and with it the attachment.
    let link = prog
        .take_link(link_id)
        .map_err(|source| Error::Program { name, source })?;
    std::mem::forget(link);
    Ok(AttachedProgram {
        name: name.into(),
        id,
        attach: format!("sk_msg_verdict on {}", map_names::SOCKHASH),
        pinned_link: None,
    })
}

/// What this kernel says to the program types of the stronger guards, probed at start.
fn stronger_guards() -> String {
    let say = |what: &str, errno: i32| match errno {
        libc::EPERM => format!("{what} programs are refused here (EPERM)"),
        libc::EINVAL | 0 => format!("{what} programs load here"),
        e => format!("{what}: {}", std::io::Error::from_raw_os_error(e)),
    };
    format!(
        "{}; {}",
        say(
            "BPF LSM",
            bpf_sys::probe_prog_type(bpf_sys::prog_type::LSM, bpf_sys::prog_attach::LSM_MAC)
        ),
        say(
            "fmod_ret (TRACING)",
            bpf_sys::probe_prog_type(
                bpf_sys::prog_type::TRACING,
                bpf_sys::prog_attach::MODIFY_RETURN
            )
        )
    )
}

/// The reader guard's tracepoints, in attach order (exits before enters, the detectors last, so
/// no thread is ever left marked by an enter whose exit was not attached yet).
const GUARD_TRACEPOINTS: [(&str, &str, &str); 7] = [
    (program_names::URING_DONE, "io_uring", "io_uring_complete"),
    (
        program_names::URING_SUBMIT,
        "io_uring",
        "io_uring_submit_req",
    ),
    (program_names::SPLICE_EXIT, "syscalls", "sys_exit_splice"),
    (
        program_names::SENDFILE_EXIT,
        "syscalls",
        "sys_exit_sendfile64",
    ),
    (program_names::SPLICE_ENTER, "syscalls", "sys_enter_splice"),
    (
        program_names::SENDFILE_ENTER,
        "syscalls",
        "sys_enter_sendfile64",
    ),
    (program_names::RCV_SPACE, "tcp", "tcp_rcv_space_adjust"),
];

/// Telemetry's raw tracepoints (the recv one also serves the reader guard): pinned, so bytes are
/// counted and flows end while no agent runs. The programs read the tracepoints' TP_PROTO
/// arguments, `(sk, ret, flags)` and `(sk)`.
const TELEMETRY_TRACEPOINTS: [(&str, &str, &str); 3] = [
    (program_names::DESTROY_SOCK, "tcp", "tcp_destroy_sock"),
    (program_names::SEND_LENGTH, "sock", "sock_send_length"),
    (program_names::RECV_LENGTH, "sock", "sock_recv_length"),
];

/// The fields of telemetry's events as this kernel records them: each is filled straight from
/// the TP_PROTO argument of the same name, so finding them (in this order) is the check that
/// the arguments are the ones the raw tracepoint programs read.
const TELEMETRY_FIELDS: [(&str, &str, usize, usize); 6] = [
    (
        "tcp/tcp_destroy_sock",
        "const void * skaddr",
        dataplane_common::TP_SK_OFFSET,
        8,
    ),
    (
        "sock/sock_send_length",
        "void * sk",
        dataplane_common::TP_SK_OFFSET,
        8,
    ),
    (
        "sock/sock_send_length",
        "int ret",
        dataplane_common::LENGTH_RET_OFFSET,
        4,
    ),
    (
        "sock/sock_recv_length",
        "void * sk",
        dataplane_common::TP_SK_OFFSET,
        8,
    ),
    (
        "sock/sock_recv_length",
        "int ret",
        dataplane_common::LENGTH_RET_OFFSET,
        4,
    ),
    (
        "sock/sock_recv_length",
        "int flags",
        dataplane_common::LENGTH_FLAGS_OFFSET,
        4,
    ),
];

/// The record fields the detectors read at fixed offsets: (event, field as the format file
/// declares it, offset, size).
const GUARD_FIELDS: [(&str, &str, usize, usize); 4] = [
    (
        "io_uring/io_uring_submit_req",
        "void * req",
        dataplane_common::URING_REQ_OFFSET,
        8,
    ),
    (
        "io_uring/io_uring_submit_req",
        "u8 opcode",
        dataplane_common::URING_OPCODE_OFFSET,
        1,
    ),
    (
        "io_uring/io_uring_complete",
        "void * req",
        dataplane_common::URING_REQ_OFFSET,
        8,
    ),
    (
        "tcp/tcp_rcv_space_adjust",
        "const void * skaddr",
        dataplane_common::TP_SK_OFFSET,
        8,
    ),
];

/// Attaches the reader guard's tracepoints (its setsockopt program is a cgroup program). They are
/// perf-event attachments owned by this agent: they detach when it stops (reads while no agent
/// runs go undetected). The detectors read fields at fixed offsets, so the tracepoints' formats
/// are checked first.
/// A kernel built without io_uring has no io_uring tracepoints (nor io_uring splices): the rest
/// of the guard attaches without them.
fn attach_reader_guard(ebpf: &mut Ebpf) -> Result<(Vec<AttachedProgram>, bool)> {
    let tracefs = crate::sys::ensure_tracefs()?;
    let uring = tracefs.join("events/io_uring").is_dir();
    let wanted = |event: &str| uring || !event.starts_with("io_uring");
    check_fields(
        &tracefs,
        GUARD_FIELDS.iter().filter(|(event, ..)| wanted(event)),
    )?;
    let mut out = Vec::new();
    for (name, category, event) in GUARD_TRACEPOINTS {
        if !wanted(category) {
            continue;
        }
        let id = load_named(ebpf, name)?;
        let prog: &mut aya::programs::TracePoint = program(ebpf, name)?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        prog.attach(category, event)
            .map_err(|source| Error::Program { name, source })?;
        out.push(AttachedProgram {
            name: name.into(),
            id,
            attach: format!("tracepoint {category}/{event} (with the agent)"),
            pinned_link: None,
        });
    }
    Ok((out, uring))
}

/// Fails unless every field is where the programs read it: (event, field as the format file
/// declares it, offset, size).
fn check_fields<'a>(
    tracefs: &Path,
    fields: impl IntoIterator<Item = &'a (&'a str, &'a str, usize, usize)>,
) -> Result<()> {
    for (event, field, offset, size) in fields {
        let format = tracefs.join("events").join(event).join("format");
        let text = std::fs::read_to_string(&format)
            .map_err(|e| Error::io("reading the tracepoint format", &format, e))?;
        let want = format!("field:{field};\toffset:{offset};\tsize:{size};");
        if !text.contains(&want) {
            return Err(Error::Internal(format!(
                "{}: `{field}` is not at offset {offset} (size {size}) on this kernel",
                format.display()
            )));
        }
    }
    Ok(())
}

/// Attaches telemetry's raw tracepoints through pinned links. A link an earlier agent pinned is
/// kept when it runs the same program (the same tag: a restart of the same build), so no byte
/// goes uncounted or counted twice across a restart; a different program (an upgrade) is
/// attached beside it first, then the old link is removed, so during that moment a byte may
/// count twice (raw tracepoint links cannot swap programs in place).
fn attach_telemetry(ebpf: &mut Ebpf, pins: &PinPaths) -> Result<Vec<AttachedProgram>> {
    let tracefs = crate::sys::ensure_tracefs()?;
    check_fields(&tracefs, TELEMETRY_FIELDS.iter())?;
    let mut out = Vec::new();
    for (name, category, event) in TELEMETRY_TRACEPOINTS {
        let id = load_named(ebpf, name)?;
        let prog: &mut aya::programs::RawTracePoint = program(ebpf, name)?
            .try_into()
            .map_err(|source| Error::Program { name, source })?;
        let tag = prog
            .info()
            .map_err(|source| Error::Program { name, source })?
            .tag();
        let path = pins.link(name);
        let old = if path.exists() {
            let link = FdLink::from(PinnedLink::from_pin(&path).map_err(|e| {
                Error::io("opening the pinned link", &path, std::io::Error::other(e))
            })?);
            let prog_id = link
                .info()
                .map_err(|e| Error::io("reading the pinned link", &path, std::io::Error::other(e)))?
                .program_id();
            let old_tag = aya::programs::loaded_programs()
                .filter_map(|p| p.ok())
                .find(|p| p.id() == prog_id)
                .map(|p| p.tag());
            Some((old_tag, prog_id))
        } else {
            None
        };
        let (attached_id, how) = match old {
            Some((Some(t), prog_id)) if t == tag => (prog_id, "kept from the previous agent"),
            _ => {
                let link_id = prog
                    .attach(event)
                    .map_err(|source| Error::Program { name, source })?;
                let link: FdLink = prog
                    .take_link(link_id)
                    .map_err(|source| Error::Program { name, source })?
                    .into();
                // bpffs refuses names with a dot (kernel/bpf/inode.c).
                let fresh = pins.link(&format!("{name}_new"));
                let _stale_is_fine = std::fs::remove_file(&fresh);
                let pinned = link
                    .pin(&fresh)
                    .map_err(|e| Error::io("pinning the link", &fresh, std::io::Error::other(e)))?;
                // Replacing the pin drops the old link's last reference: it detaches.
                std::fs::rename(&fresh, &path)
                    .map_err(|e| Error::io("replacing the pinned link", &path, e))?;
                drop(pinned);
                (
                    id,
                    if old.is_some() {
                        "replaced the previous agent's"
                    } else {
                        "new"
                    },
                )
            }
        };
        tracing::debug!(program = name, how, "telemetry tracepoint");
        out.push(AttachedProgram {
            name: name.into(),
            id: attached_id,
            attach: format!("raw tracepoint {category}/{event} (pinned link)"),
            pinned_link: Some(path),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded ELF (what the kernel gets) declares exactly the maps of the table in
    /// `dataplane-common`, with the same types, sizes and compiled capacities; the loader's
    /// load-time capacities follow the table too.
    #[test]
    fn the_embedded_programs_declare_the_map_table() {
        let obj = aya_obj::Object::parse(EBPF_ELF).expect("the embedded ELF parses");
        let mut in_elf: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            // Global data sections show up as maps too; ours are all named ML_*.
            .filter(|n| !n.starts_with('.'))
            .collect();
        in_elf.sort_unstable();
        let mut in_table: Vec<&str> = dataplane_common::maps::ALL.iter().map(|m| m.name).collect();
        in_table.sort_unstable();
        assert_eq!(
            in_elf, in_table,
            "the ELF's maps and the table's rows differ"
        );
        for spec in dataplane_common::maps::ALL {
            let m = &obj.maps[spec.name];
            let found = (m.map_type(), m.key_size(), m.value_size(), m.max_entries());
            let want = (
                spec.kind.bpf_map_type(),
                spec.key_size,
                spec.value_size,
                spec.max_entries,
            );
            assert_eq!(
                found, want,
                "{}: ELF (type, key, value, entries) vs table",
                spec.name
            );
        }
        let loaded = expected_maps(LoadSizes {
            sockhash: 100,
            events_ring_bytes: 8192,
        });
        let by = |n: &str| {
            loaded
                .iter()
                .find(|m| m.name == n)
                .expect("in the table")
                .max_entries
        };
        assert_eq!(by(map_names::SOCKHASH), 100);
        assert_eq!(by(map_names::SOCK_STATS), 200);
        assert_eq!(by(map_names::NETNS), dataplane_common::NETNS_CAPACITY);
        assert_eq!(by(map_names::EVENTS), 8192);
    }
}
