//! meshlane's benchmark suite (`meshlane-bench`) and demo (`meshlane-demo`) share these: the
//! workload runners (sockperf, iperf3, oha, wrk between lab pods, parsed into numbers; host CPU
//! and interrupt accounting) and the halt-polling guard. They build on the lab
//! (`meshlane-lab`); the lab never calls them. Nothing here may change the machine except through
//! a lab guard that puts it back (see [`halt_poll`]).
#![deny(unsafe_code)]

pub mod halt_poll;
// Raw syscalls: sched_setaffinity in a pre-exec hook, sysconf.
#[allow(unsafe_code)]
pub mod workloads;
