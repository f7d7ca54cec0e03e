//! Builds the kernel programs (`dataplane-ebpf`) with aya-build on the nightly toolchain and
//! leaves the ELF in OUT_DIR for the agent to embed.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .context("dataplane has a parent directory")?
        .join("dataplane-ebpf");
    let root_dir = root_dir.to_str().context("the source path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "dataplane-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
