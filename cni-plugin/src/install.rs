//! The node install: puts meshlane into a node's CNI chain and takes it out again. It copies the
//! plugin binary into the CNI bin dir and adds our entry to the primary network configuration,
//! the file the container runtime loads (libcni's `ConfFiles` order). The DaemonSet runs it once
//! or with `--watch`, because primary CNIs rewrite their conflist when they restart and drop our
//! entry with it — istio-cni's users hit exactly that.
//!
//! It must never leave a half-written file where the runtime reads (every write is a temp file,
//! fsync and rename in the same directory), never change anything before the file it is about to
//! edit has been fully checked, and never lose the original: before the first change to a
//! primary file, its exact bytes go to `<conf_dir>/.meshlane/<file name>.orig`, which
//! `uninstall` writes back byte for byte. libcni's `ConfFiles` skips directories and does not
//! recurse, so nothing under `.meshlane/` is ever loaded as a network configuration.
//!
//! The documents are handled as `serde_json::Value`; the workspace builds serde_json with
//! `preserve_order`, so a rewritten file keeps every key, value and their order, and the order
//! of `plugins`.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};

/// Our entry's `type`, and so also the installed binary's file name: libcni runs
/// `<bin_dir>/<type>`.
pub const PLUGIN_TYPE: &str = "meshlane";

/// Where the originals are kept, inside the conf dir. A dot dir: nothing for libcni.
const BACKUP_DIR: &str = ".meshlane";
const BACKUP_SUFFIX: &str = ".orig";
/// The extensions containerd (go-cni) and CRI-O (ocicni) pass to libcni's `ConfFiles`.
const CONF_EXTENSIONS: [&str; 3] = ["conf", "conflist", "json"];
/// While `install` keeps failing on the same directory state, `watch` retries this often
/// rather than every poll (a failing install re-reads the whole binary each time).
const RETRY_FAILED: Duration = Duration::from_secs(10);
/// How often a sleeping `watch` looks at its stop flag.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// What `install` and `watch` work with.
#[derive(Debug, Clone, PartialEq)]
pub struct InstallOptions {
    /// The CNI conf dir (e.g. `/etc/cni/net.d`). Missing counts as "no network config yet".
    pub conf_dir: PathBuf,
    /// The CNI bin dir (e.g. `/opt/cni/bin`); it must exist.
    pub bin_dir: PathBuf,
    /// The plugin binary to copy, normally `std::env::current_exe()`.
    pub binary: PathBuf,
    /// The plugin object to put in the chain; its `type` must be [`PLUGIN_TYPE`].
    pub entry: Value,
}

/// What `install` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The conflist holding our entry; `None`: the conf dir has no network config yet.
    pub conf: Option<PathBuf>,
    /// The conflist was written (our entry added or updated, or a `.conf` converted). A new
    /// binary copy alone does not count.
    pub changed: bool,
    /// The installed binary, `<bin_dir>/meshlane`.
    pub binary: PathBuf,
}

/// What `uninstall` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    /// The first file (in libcni order) we took our entry out of — for a converted `.conf`, the
    /// restored `.conf`. `None`: no conflist held our entry. When the primary moved between
    /// installs, several files can hold it; all of them are cleaned.
    pub conf: Option<PathBuf>,
    /// Every file we took our entry out of went back to its original bytes (rather than being
    /// rewritten without our entry because someone else changed it meanwhile).
    pub restored_original: bool,
    /// `<bin_dir>/meshlane` was there and is gone.
    pub binary_removed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: expected a JSON document, found invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: expected {expected}, found {found}", path.display())]
    Invalid {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error(
        "the plugin entry to install: expected an object with \"type\": \"{PLUGIN_TYPE}\", found {found}"
    )]
    Entry { found: String },
}

/// The primary network configuration: the first file of `conf_dir`, in byte order of the names,
/// ending in `.conf`, `.conflist` or `.json` — what containerd and CRI-O load (libcni's
/// `ConfFiles` plus a sort). Directories, dot-files (our temp files among them) and anything
/// else are skipped.
///
/// libcni itself does not skip dot-files (`.x.conflist` would sort first there); we do, so that
/// a hidden file some tool left is never the file we edit. Our own temp files would be skipped
/// either way: they are dot-files with no conf extension.
pub fn primary_conf(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(conf_files(conf_dir)?.into_iter().next())
}

/// Copies the binary to `<bin_dir>/meshlane`, then puts `opts.entry` into the primary conflist:
/// in place of an existing `meshlane` entry, or last. A `.conf` (or a single-plugin `.json`) is
/// converted to `<stem>.conflist` first. Everything is checked before anything is touched: on
/// error, neither the binary nor any conf file has changed.
pub fn install(opts: &InstallOptions) -> Result<Installed, InstallError> {
    check_entry(&opts.entry)?;
    check_bin_dir(&opts.bin_dir)?;
    let binary = read(&opts.binary)?;
    let plan = match primary_conf(&opts.conf_dir)? {
        Some(primary) => Some(plan(&opts.conf_dir, &primary, &opts.entry)?),
        None => None,
    };
    // The binary first: a chain naming `meshlane` before `<bin_dir>/meshlane` exists would fail
    // every pod sandbox created in between.
    let installed = opts.bin_dir.join(PLUGIN_TYPE);
    install_binary(&binary, &installed)?;
    let (conf, changed) = match plan {
        Some(plan) => {
            let target = plan.target.clone();
            (Some(target), apply(plan)?)
        }
        None => (None, false),
    };
    Ok(Installed {
        conf,
        changed,
        binary: installed,
    })
}

/// Takes our entry out of every conflist in `conf_dir` that holds one. Where the result is the
/// original we saved (for a converted `.conf`: its conversion), the original's bytes go back
/// under its own name; otherwise (someone changed the file since) the edited conflist is
/// written. Then the saved originals and `<bin_dir>/meshlane` are removed. Running it again
/// finds nothing to do and succeeds.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Uninstalled, InstallError> {
    let mut first = None;
    let mut restored_all = true;
    for file in conf_files(conf_dir)? {
        let Some(done) = take_out(conf_dir, &file)? else {
            continue;
        };
        restored_all &= done.restored;
        first.get_or_insert(done.conf);
    }
    // After the loop no file holds our entry, so no saved original is of any use any more.
    remove_backups(conf_dir)?;
    let binary_removed = remove_if_exists(&bin_dir.join(PLUGIN_TYPE))?;
    Ok(Uninstalled {
        restored_original: first.is_some() && restored_all,
        conf: first,
        binary_removed,
    })
}

/// Runs `install` every `poll` in which the primary file (name or content) or the installed
/// binary (size or mtime) differs from what the last successful install left, or the primary
/// lacks our entry; returns when `stop` is set. A file rewritten without our entry gets it
/// back, and its new bytes become the original `uninstall` restores. Errors go to stderr, one
/// line each time the message changes, and the watch goes on. Only an invalid `opts.entry` —
/// which no waiting can fix — is returned.
pub fn watch(opts: &InstallOptions, stop: &AtomicBool, poll: Duration) -> Result<(), InstallError> {
    check_entry(&opts.entry)?;
    let mut settled: Option<Observed> = None;
    let mut failed: Option<(Observed, Instant)> = None;
    let mut last_error: Option<String> = None;
    while !stop.load(Ordering::Relaxed) {
        match observe(opts) {
            Err(e) => log_once(&mut last_error, &e),
            Ok(now) => {
                // `lacks_entry` as well as the comparison: if another CNI wrote between our
                // install and the `observe` after it, `settled` holds its file, not ours.
                let stale = settled.as_ref() != Some(&now) || now.lacks_entry();
                let backing_off = failed
                    .as_ref()
                    .is_some_and(|(seen, at)| *seen == now && at.elapsed() < RETRY_FAILED);
                if stale && !backing_off {
                    match install(opts) {
                        Ok(done) => {
                            if let (true, Some(conf)) = (done.changed, &done.conf) {
                                eprintln!("meshlane-cni: put our entry into {}", conf.display());
                            }
                            last_error = None;
                            failed = None;
                            // If this fails, the next poll simply installs again.
                            settled = observe(opts).ok();
                        }
                        Err(e) => {
                            log_once(&mut last_error, &e);
                            failed = Some((now, Instant::now()));
                        }
                    }
                }
            }
        }
        sleep_unless_stopped(stop, poll);
    }
    Ok(())
}

fn check_entry(entry: &Value) -> Result<(), InstallError> {
    match entry.get("type") {
        Some(Value::String(t)) if t == PLUGIN_TYPE && entry.is_object() => Ok(()),
        Some(t) => Err(InstallError::Entry {
            found: format!("\"type\": {t}"),
        }),
        None => Err(InstallError::Entry {
            found: format!("{} without \"type\"", kind(entry)),
        }),
    }
}

/// Not created here: a missing bin dir means the DaemonSet mounted the wrong host path.
fn check_bin_dir(bin_dir: &Path) -> Result<(), InstallError> {
    let found = match fs::metadata(bin_dir) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "a file that is not a directory".to_owned(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => "nothing there".to_owned(),
        Err(e) => return Err(io_err("reading the metadata of", bin_dir, e)),
    };
    Err(invalid(bin_dir, "the CNI bin dir, a directory", found))
}

/// Conf files of `conf_dir`, in libcni order (see `primary_conf`).
fn conf_files(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match fs::read_dir(conf_dir) {
        Ok(entries) => entries,
        // libcni: a conf dir that is not there yet holds no configuration; not an error.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", conf_dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", conf_dir, e))?;
        let name = entry.file_name();
        if name.as_bytes().starts_with(b".") || !is_conf_name(&name) {
            continue;
        }
        // libcni tests the entry itself (`DirEntry.IsDir`), without following a symlink.
        let file_type = entry
            .file_type()
            .map_err(|e| io_err("reading the file type of", &entry.path(), e))?;
        if !file_type.is_dir() {
            names.push(name);
        }
    }
    // Go's `sort.Strings` compares bytes.
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names.into_iter().map(|name| conf_dir.join(name)).collect())
}

fn is_conf_name(name: &OsStr) -> bool {
    Path::new(name)
        .extension()
        .is_some_and(|ext| CONF_EXTENSIONS.iter().any(|c| ext == *c))
}

/// A primary file, checked, as a conflist.
struct Parsed {
    /// The conflist's top-level object; its `plugins` is left empty, in its place.
    list: Map<String, Value>,
    plugins: Vec<Value>,
    /// The file was a single plugin (`.conf`, or a `.json` without `plugins`).
    converted: bool,
}

fn parse_conf(path: &Path, bytes: &[u8]) -> Result<Parsed, InstallError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|source| InstallError::Json {
        path: path.to_owned(),
        source,
    })?;
    let ext = path.extension().unwrap_or_default();
    let is_list = ext == "conflist" || (ext == "json" && value.get("plugins").is_some());
    if is_list {
        let (list, plugins) = check_list(path, value)?;
        return Ok(Parsed {
            list,
            plugins,
            converted: false,
        });
    }
    let (list, plugins) = convert(path, value)?;
    Ok(Parsed {
        list,
        plugins,
        converted: true,
    })
}

fn check_list(path: &Path, value: Value) -> Result<(Map<String, Value>, Vec<Value>), InstallError> {
    const EXPECTED: &str = "a conflist: an object with a non-empty \"plugins\" array of objects, each with a string \"type\"";
    let found = |found: String| invalid(path, EXPECTED, found);
    let Value::Object(mut list) = value else {
        return Err(found(kind(&value).to_owned()));
    };
    let plugins = match list.get_mut("plugins") {
        Some(Value::Array(plugins)) => std::mem::take(plugins),
        Some(other) => return Err(found(format!("{} for \"plugins\"", kind(other)))),
        None => return Err(found("no \"plugins\" key".to_owned())),
    };
    if plugins.is_empty() {
        return Err(found("an empty \"plugins\" array".to_owned()));
    }
    for (i, plugin) in plugins.iter().enumerate() {
        check_plugin(path, EXPECTED, &format!("plugins[{i}]"), plugin)?;
    }
    Ok((list, plugins))
}

fn check_plugin(path: &Path, expected: &str, at: &str, plugin: &Value) -> Result<(), InstallError> {
    let found = match plugin.get("type") {
        _ if !plugin.is_object() => format!("{} for {at}", kind(plugin)),
        Some(Value::String(t)) if !t.is_empty() => return Ok(()),
        Some(Value::String(_)) => format!("{at} with an empty \"type\""),
        Some(other) => format!("{at} with a \"type\" that is {}", kind(other)),
        None => format!("{at} without \"type\""),
    };
    Err(invalid(path, expected, found))
}

/// A single plugin object as the conflist libcni's `ConfListFromConf` makes of it:
/// `{"cniVersion", "name", "plugins": [<the object minus those two>]}`. As there, a missing
/// `name` becomes `""` (a conflist without `name` is refused by libcni).
fn convert(path: &Path, single: Value) -> Result<(Map<String, Value>, Vec<Value>), InstallError> {
    const EXPECTED: &str = "a single plugin: an object with a string \"type\", and a string \"name\" and \"cniVersion\" if present";
    check_plugin(path, EXPECTED, "the object", &single)?;
    let Value::Object(object) = single else {
        return Err(invalid(path, EXPECTED, kind(&single).to_owned()));
    };
    let (mut name, mut version) = (None, None);
    let mut plugin = Map::new();
    for (key, value) in object {
        match key.as_str() {
            "name" => name = Some(value),
            "cniVersion" => version = Some(value),
            _ => {
                plugin.insert(key, value);
            }
        }
    }
    for (key, value) in [("name", &name), ("cniVersion", &version)] {
        if let Some(value) = value
            && !value.is_string()
        {
            return Err(invalid(
                path,
                EXPECTED,
                format!("{} for \"{key}\"", kind(value)),
            ));
        }
    }
    let mut list = Map::new();
    if let Some(version) = version {
        list.insert("cniVersion".to_owned(), version);
    }
    list.insert(
        "name".to_owned(),
        name.unwrap_or_else(|| Value::String(String::new())),
    );
    list.insert("plugins".to_owned(), Value::Array(Vec::new()));
    Ok((list, vec![Value::Object(plugin)]))
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Pretty-printed with 2-space indent (serde_json's `{:#}`) and a trailing newline.
fn render(doc: &Value) -> Vec<u8> {
    format!("{doc:#}\n").into_bytes()
}

/// What `install` will do to the primary file, decided before anything is touched.
struct Plan {
    source: PathBuf,
    /// The file we write: `source`, or `<stem>.conflist` for a converted single plugin.
    target: PathBuf,
    mode: u32,
    /// The new bytes of `target`; `None`: it is up to date.
    write: Option<Vec<u8>>,
    /// `source` did not hold our entry, so its bytes are the original: keep them here.
    backup: Option<(PathBuf, Vec<u8>)>,
    /// Older originals of `target` that `backup` replaces.
    stale: Vec<PathBuf>,
}

fn plan(conf_dir: &Path, source: &Path, entry: &Value) -> Result<Plan, InstallError> {
    let bytes = read(source)?;
    let mode = mode_of(source)?;
    let Parsed {
        list,
        plugins,
        converted,
    } = parse_conf(source, &bytes)?;
    let target = if converted {
        let target = source.with_extension("conflist");
        check_conversion(conf_dir, source, &target)?;
        target
    } else {
        source.to_owned()
    };

    let had_ours = plugins.iter().any(is_ours);
    let mut new_plugins = Vec::with_capacity(plugins.len() + 1);
    let mut placed = false;
    for plugin in &plugins {
        if !is_ours(plugin) {
            new_plugins.push(plugin.clone());
        } else if !placed {
            // In place of the first of ours; a duplicate of ours is dropped.
            new_plugins.push(entry.clone());
            placed = true;
        }
    }
    if !placed {
        new_plugins.push(entry.clone());
    }
    let write = (converted || new_plugins != plugins).then(|| {
        let mut list = list;
        // `insert` on a key that is there keeps its place (with `preserve_order` too).
        list.insert("plugins".to_owned(), Value::Array(new_plugins));
        render(&Value::Object(list))
    });

    // A file without our entry is the original, whether we meet it for the first time or
    // another CNI rewrote it since our last install (then it is the new original, and the
    // saved one is stale). A file with our entry keeps the original saved before.
    let (backup, stale) = if had_ours {
        (None, Vec::new())
    } else {
        let backup = backup_path(conf_dir, file_name(source));
        let stale = backup_candidates(conf_dir, file_name(&target))
            .into_iter()
            .filter(|candidate| *candidate != backup)
            .collect();
        (Some((backup, bytes)), stale)
    };
    Ok(Plan {
        source: source.to_owned(),
        target,
        mode,
        write,
        backup,
        stale,
    })
}

/// A single plugin `source` becomes `target` (`<stem>.conflist`): refuse when that would
/// overwrite someone else's file, or when the new name would no longer be the primary.
fn check_conversion(conf_dir: &Path, source: &Path, target: &Path) -> Result<(), InstallError> {
    let expected = |what: &str| format!("{what} before converting it to {}", target.display());
    match fs::read(target) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", target, e)),
        Ok(bytes) => {
            // Ours from an earlier conversion, left behind because the primary CNI wrote its
            // `.conf` again (it sorts first, so it is the primary again).
            let ours = serde_json::from_slice::<Value>(&bytes).is_ok_and(|doc| {
                doc.get("plugins")
                    .and_then(Value::as_array)
                    .is_some_and(|plugins| plugins.iter().any(is_ours))
            });
            if !ours {
                return Err(invalid(
                    source,
                    &expected("no file of that name, or one holding our entry"),
                    format!("{} without a \"{PLUGIN_TYPE}\" entry", target.display()),
                ));
            }
        }
    }
    // `x.conf` < `x.conf.json` < `x.conflist`: such a file would become the primary.
    for file in conf_files(conf_dir)? {
        if file != source
            && file != target
            && file_name(&file).as_bytes() < file_name(target).as_bytes()
        {
            return Err(invalid(
                source,
                &expected("no other conf file sorting before the new name"),
                file.display().to_string(),
            ));
        }
    }
    Ok(())
}

/// Carries out a plan; returns whether the conflist was written.
fn apply(plan: Plan) -> Result<bool, InstallError> {
    let Some(bytes) = plan.write else {
        return Ok(false);
    };
    if let Some((backup, original)) = &plan.backup {
        let dir = parent(backup);
        fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        write_atomic(backup, original, plan.mode)?;
    }
    for stale in &plan.stale {
        remove_if_exists(stale)?;
    }
    write_atomic(&plan.target, &bytes, plan.mode)?;
    if plan.target != plan.source {
        // After the conflist is in place: in between, the runtime sees the `.conf` (it sorts
        // first), as before; never no network config at all.
        fs::remove_file(&plan.source).map_err(|e| io_err("removing", &plan.source, e))?;
        sync_dir(parent(&plan.source))?;
    }
    Ok(true)
}

fn backup_path(conf_dir: &Path, original: &OsStr) -> PathBuf {
    let mut name = original.to_owned();
    name.push(BACKUP_SUFFIX);
    conf_dir.join(BACKUP_DIR).join(name)
}

/// The backups that can belong to conflist `name`: its own, then (for `<stem>.conflist`) those
/// of the single-plugin files it was converted from.
fn backup_candidates(conf_dir: &Path, name: &OsStr) -> Vec<PathBuf> {
    let mut candidates = vec![backup_path(conf_dir, name)];
    if let Some(stem) = name.as_bytes().strip_suffix(b".conflist") {
        for ext in [".conf", ".json"] {
            let mut original = OsStr::from_bytes(stem).to_owned();
            original.push(ext);
            candidates.push(backup_path(conf_dir, &original));
        }
    }
    candidates
}

/// What `uninstall` did to one file.
struct TakenOut {
    conf: PathBuf,
    restored: bool,
}

/// Takes our entry out of `file`; `None` if it is not a conflist holding one. Files that do not
/// parse are not ours to judge here and are left alone.
fn take_out(conf_dir: &Path, file: &Path) -> Result<Option<TakenOut>, InstallError> {
    let bytes = read(file)?;
    let Ok(Value::Object(mut list)) = serde_json::from_slice::<Value>(&bytes) else {
        return Ok(None);
    };
    let Some(Value::Array(plugins)) = list.get_mut("plugins") else {
        return Ok(None);
    };
    if !plugins.iter().any(is_ours) {
        return Ok(None);
    }
    plugins.retain(|plugin| !is_ours(plugin));
    let edited = Value::Object(list);

    let name = file_name(file);
    for backup in backup_candidates(conf_dir, name) {
        let original = match fs::read(&backup) {
            Ok(original) => original,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading", &backup, e)),
        };
        let original_name = original_name(&backup);
        let original_path = conf_dir.join(&original_name);
        let same = match serde_json::from_slice::<Value>(&original) {
            Ok(value) if original_name == name => value == edited,
            // A single plugin we converted: compare with its conversion.
            Ok(value) => convert(&original_path, value).is_ok_and(|(mut converted, plugins)| {
                converted.insert("plugins".to_owned(), Value::Array(plugins));
                Value::Object(converted) == edited
            }),
            Err(_) => false,
        };
        if !same {
            break;
        }
        if original_path == file {
            write_atomic(file, &original, mode_of(&backup)?)?;
        } else {
            let reappeared = original_path
                .try_exists()
                .map_err(|e| io_err("looking for", &original_path, e))?;
            // If the primary CNI wrote its `.conf` again since we converted it (and no install
            // ran after), that file is the original now and ours a stale conversion of the
            // older one: it stays, ours goes.
            if !reappeared {
                write_atomic(&original_path, &original, mode_of(&backup)?)?;
            }
            remove_if_exists(file)?;
        }
        return Ok(Some(TakenOut {
            conf: original_path,
            restored: true,
        }));
    }
    write_atomic(file, &render(&edited), mode_of(file)?)?;
    Ok(Some(TakenOut {
        conf: file.to_owned(),
        restored: false,
    }))
}

/// `<name>.orig` → `<name>`.
fn original_name(backup: &Path) -> OsString {
    let name = file_name(backup).as_bytes();
    OsStr::from_bytes(name.strip_suffix(BACKUP_SUFFIX.as_bytes()).unwrap_or(name)).to_owned()
}

/// Empties and removes `<conf_dir>/.meshlane`: every file in it is ours (saved originals, and
/// temp files a crash may have left). A directory someone put there is left, and the dir with it.
fn remove_backups(conf_dir: &Path) -> Result<(), InstallError> {
    let dir = conf_dir.join(BACKUP_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("listing", &dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| io_err("listing", &dir, e))?;
        let file_type = entry
            .file_type()
            .map_err(|e| io_err("reading the file type of", &entry.path(), e))?;
        if !file_type.is_dir() {
            remove_if_exists(&entry.path())?;
        }
    }
    match fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(io_err("removing", &dir, e)),
    }
}

fn install_binary(binary: &[u8], installed: &Path) -> Result<(), InstallError> {
    match fs::read(installed) {
        Ok(current) if current == binary => {
            if mode_of(installed)? != 0o755 {
                fs::set_permissions(installed, Permissions::from_mode(0o755))
                    .map_err(|e| io_err("setting mode 0755 on", installed, e))?;
            }
            Ok(())
        }
        Ok(_) => write_atomic(installed, binary, 0o755),
        Err(e) if e.kind() == io::ErrorKind::NotFound => write_atomic(installed, binary, 0o755),
        Err(e) => Err(io_err("reading", installed, e)),
    }
}

static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to a temp file next to `path`, fsyncs it and renames it over `path`, so a
/// reader sees the old file or the new one, never a part. The rename also makes replacing a
/// binary the runtime is executing fine (writing into it would fail with ETXTBSY). The temp
/// name is a dot-file with no conf extension: nothing for libcni, nor for `primary_conf`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = parent(path);
    let mut temp_name = OsString::from(".");
    temp_name.push(file_name(path));
    temp_name.push(format!(
        ".meshlane-tmp.{}.{}",
        std::process::id(),
        TEMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let temp = dir.join(temp_name);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| io_err("creating", &temp, e))?;
        file.write_all(bytes)
            .map_err(|e| io_err("writing", &temp, e))?;
        // Explicitly, so the umask does not decide the mode.
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(|e| io_err("setting the mode of", &temp, e))?;
        file.sync_all().map_err(|e| io_err("syncing", &temp, e))?;
        fs::rename(&temp, path).map_err(|e| io_err("renaming a temp file onto", path, e))
    })();
    if written.is_err() {
        // The error that matters is `written`'s; a temp file that cannot be removed either is
        // a dot-file nothing loads.
        if let Err(e) = fs::remove_file(&temp)
            && e.kind() != io::ErrorKind::NotFound
        {
            eprintln!("meshlane-cni: leaving {}: {e}", temp.display());
        }
    }
    written?;
    sync_dir(dir)
}

/// Makes a rename or removal in `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), InstallError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing the directory", dir, e))
}

fn remove_if_exists(path: &Path) -> Result<bool, InstallError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("removing", path, e)),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, InstallError> {
    fs::read(path).map_err(|e| io_err("reading", path, e))
}

fn mode_of(path: &Path) -> Result<u32, InstallError> {
    let meta = fs::metadata(path).map_err(|e| io_err("reading the mode of", path, e))?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// Every path here is `<dir>/<name>`, built by `join`.
fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

fn file_name(path: &Path) -> &OsStr {
    path.file_name().unwrap_or_default()
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> InstallError {
    InstallError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn invalid(path: &Path, expected: &str, found: String) -> InstallError {
    InstallError::Invalid {
        path: path.to_owned(),
        expected: expected.to_owned(),
        found,
    }
}

/// What `watch` compares from one poll to the next.
#[derive(Debug, PartialEq)]
struct Observed {
    /// The primary file and its bytes. Comparing the bytes themselves (conf files are a few
    /// hundred bytes) covers mtime, length and a hash at once, and a mere `touch` is no change.
    conf: Option<(PathBuf, Vec<u8>)>,
    /// The installed binary's length and mtime; not its bytes, which would mean reading
    /// megabytes every poll.
    binary: Option<(u64, SystemTime)>,
}

impl Observed {
    fn lacks_entry(&self) -> bool {
        self.conf.as_ref().is_some_and(|(_, bytes)| {
            !serde_json::from_slice::<Value>(bytes).is_ok_and(|doc| {
                doc.get("plugins")
                    .and_then(Value::as_array)
                    .is_some_and(|plugins| plugins.iter().any(is_ours))
            })
        })
    }
}

fn observe(opts: &InstallOptions) -> Result<Observed, InstallError> {
    let conf = match primary_conf(&opts.conf_dir)? {
        Some(path) => match fs::read(&path) {
            Ok(bytes) => Some((path, bytes)),
            // Renamed away between the listing and the read: the next poll sees what replaced it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("reading", &path, e)),
        },
        None => None,
    };
    let installed = opts.bin_dir.join(PLUGIN_TYPE);
    let binary = match fs::metadata(&installed) {
        Ok(meta) => Some((
            meta.len(),
            meta.modified()
                .map_err(|e| io_err("reading the mtime of", &installed, e))?,
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("reading the metadata of", &installed, e)),
    };
    Ok(Observed { conf, binary })
}

fn log_once(last: &mut Option<String>, error: &InstallError) {
    let message = error.to_string();
    if last.as_deref() != Some(message.as_str()) {
        eprintln!("meshlane-cni: install: {message}");
        *last = Some(message);
    }
}

fn sleep_unless_stopped(stop: &AtomicBool, poll: Duration) {
    let deadline = Instant::now() + poll;
    while !stop.load(Ordering::Relaxed) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        thread::sleep(left.min(STOP_CHECK));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::sync::{Arc, mpsc};

    const BINARY: &[u8] = b"\x7fELF pretend meshlane-cni binary\n";

    /// Deliberately not in our output format, so a byte-exact restore means something.
    const KINDNET: &str = r#"{
    "cniVersion": "1.0.0",
    "name": "kindnet",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "isGateway": true,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.0.0/24"}]]}},
        {"type": "portmap", "capabilities": {"portMappings": true}}
    ]
}
"#;

    fn entry() -> Value {
        json!({
            "type": "meshlane",
            "agentSocket": "/run/meshlane/agent.sock",
            "queueDir": "/var/run/meshlane/queue",
            "mode": "accelerate",
        })
    }

    /// A directory of its own per test: `conf/`, `bin/` and `src/meshlane-cni`.
    struct Scratch {
        root: PathBuf,
    }

    impl Scratch {
        fn new(test: &str) -> Self {
            let root = std::env::temp_dir()
                .join(format!("meshlane-install-{test}-{}", std::process::id()));
            if root.exists() {
                fs::remove_dir_all(&root)
                    .unwrap_or_else(|e| panic!("clearing {}: {e}", root.display()));
            }
            for dir in ["conf", "bin", "src"] {
                fs::create_dir_all(root.join(dir))
                    .unwrap_or_else(|e| panic!("creating {dir}: {e}"));
            }
            fs::write(root.join("src/meshlane-cni"), BINARY).expect("writing the fake binary");
            Scratch { root }
        }

        fn conf(&self) -> PathBuf {
            self.root.join("conf")
        }

        fn bin(&self) -> PathBuf {
            self.root.join("bin")
        }

        fn write(&self, name: &str, content: &str) -> PathBuf {
            let path = self.conf().join(name);
            fs::write(&path, content).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            path
        }

        fn opts(&self) -> InstallOptions {
            InstallOptions {
                conf_dir: self.conf(),
                bin_dir: self.bin(),
                binary: self.root.join("src/meshlane-cni"),
                entry: entry(),
            }
        }

        /// Every file and directory under the root, with the files' bytes.
        fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
            fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
                for entry in fs::read_dir(dir).expect("listing") {
                    let path = entry.expect("listing").path();
                    if path.is_dir() {
                        out.insert(path.clone(), None);
                        walk(&path, out);
                    } else {
                        out.insert(path.clone(), Some(fs::read(&path).expect("reading")));
                    }
                }
            }
            let mut out = BTreeMap::new();
            walk(&self.root, &mut out);
            out
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            if let Err(e) = fs::remove_dir_all(&self.root) {
                eprintln!("leaving {}: {e}", self.root.display());
            }
        }
    }

    fn doc(path: &Path) -> Value {
        let bytes = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
    }

    fn plugins(path: &Path) -> Vec<Value> {
        doc(path)["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_else(|| panic!("{} has no plugins array", path.display()))
    }

    fn types(path: &Path) -> Vec<String> {
        plugins(path)
            .iter()
            .map(|p| p["type"].as_str().unwrap_or("?").to_owned())
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("listing")
            .map(|e| {
                e.expect("listing")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > timeout {
                panic!("{what}: not within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn install_into_empty_dir_copies_the_binary_only() {
        let s = Scratch::new("empty");
        let done = install(&s.opts()).expect("install");
        assert_eq!(
            done,
            Installed {
                conf: None,
                changed: false,
                binary: s.bin().join("meshlane")
            }
        );
        assert_eq!(
            fs::read(s.bin().join("meshlane")).expect("installed binary"),
            BINARY
        );
        assert_eq!(mode_of(&s.bin().join("meshlane")).expect("mode"), 0o755);
        assert_eq!(
            names(&s.bin()),
            ["meshlane"],
            "bin dir: the binary and no temp file"
        );
        assert!(
            names(&s.conf()).is_empty(),
            "conf dir should stay empty, holds {:?}",
            names(&s.conf())
        );
    }

    #[test]
    fn a_missing_conf_dir_is_no_config_yet() {
        let s = Scratch::new("noconfdir");
        assert_eq!(
            primary_conf(&s.root.join("nowhere")).expect("primary_conf"),
            None
        );
    }

    #[test]
    fn install_appends_last_and_leaves_the_others_alone() {
        let s = Scratch::new("append");
        let path = s.write("10-kindnet.conflist", KINDNET);
        let before: Value = serde_json::from_str(KINDNET).expect("fixture");

        let done = install(&s.opts()).expect("install");
        assert_eq!(done.conf.as_deref(), Some(path.as_path()));
        assert!(done.changed, "the first install should change the conflist");

        let after = doc(&path);
        let plugins = plugins(&path);
        assert_eq!(
            plugins.len(),
            3,
            "expected bridge, portmap, ours; found {plugins:?}"
        );
        assert_eq!(
            plugins[..2],
            before["plugins"].as_array().expect("fixture")[..],
            "bridge and portmap changed"
        );
        assert_eq!(
            plugins[2],
            entry(),
            "ours should be last and exactly the entry"
        );
        for key in ["cniVersion", "name"] {
            assert_eq!(after[key], before[key], "top-level {key} changed");
        }
        assert_eq!(
            after.as_object().map(Map::len),
            Some(3),
            "top-level keys added or lost: {after}"
        );

        let text = fs::read_to_string(&path).expect("reading");
        assert!(
            text.ends_with("}\n"),
            "expected a trailing newline, found {text:?}"
        );
        assert!(
            text.starts_with("{\n  \""),
            "expected 2-space indent, found {text:?}"
        );

        let backup = s.conf().join(".meshlane/10-kindnet.conflist.orig");
        assert_eq!(
            fs::read_to_string(&backup).expect("backup"),
            KINDNET,
            "backup is not the original byte for byte"
        );
        assert_eq!(
            names(&s.conf()),
            [".meshlane", "10-kindnet.conflist"],
            "stray files in the conf dir"
        );
    }

    #[test]
    fn install_twice_adds_no_duplicate() {
        let s = Scratch::new("twice");
        let path = s.write("10-kindnet.conflist", KINDNET);
        install(&s.opts()).expect("first install");
        let once = fs::read(&path).expect("reading");
        let snapshot = s.snapshot();

        let done = install(&s.opts()).expect("second install");
        assert!(!done.changed, "the second install should change nothing");
        assert_eq!(types(&path), ["bridge", "portmap", "meshlane"]);
        assert_eq!(
            fs::read(&path).expect("reading"),
            once,
            "the conflist was rewritten"
        );
        assert!(
            s.snapshot() == snapshot,
            "the second install touched the directory"
        );
        assert_eq!(
            fs::read_to_string(s.conf().join(".meshlane/10-kindnet.conflist.orig"))
                .expect("backup"),
            KINDNET,
            "the backup must stay the pristine original"
        );
    }

    #[test]
    fn install_replaces_our_entry_in_place() {
        let s = Scratch::new("inplace");
        let path = s.write(
            "10-net.conflist",
            r#"{"cniVersion":"1.0.0","name":"net","plugins":[
                {"type":"bridge"},{"type":"meshlane","mode":"old"},{"type":"portmap"},{"type":"meshlane","mode":"dup"}]}"#,
        );
        let done = install(&s.opts()).expect("install");
        assert!(done.changed, "an outdated entry should be rewritten");
        let plugins = plugins(&path);
        assert_eq!(
            types(&path),
            ["bridge", "meshlane", "portmap"],
            "position kept, duplicate dropped"
        );
        assert_eq!(plugins[1], entry());
        assert!(
            !s.conf().join(".meshlane").exists(),
            "the file already held our entry, so it is not an original to keep"
        );
        assert!(!install(&s.opts()).expect("again").changed);
    }

    #[test]
    fn a_conf_is_converted_and_uninstall_brings_it_back() {
        let s = Scratch::new("convert");
        let original = "{\"cniVersion\": \"0.4.0\", \"name\": \"mynet\", \"type\": \"bridge\", \"bridge\": \"cni0\"}\n";
        let conf = s.write("10-mynet.conf", original);
        let conflist = s.conf().join("10-mynet.conflist");

        let done = install(&s.opts()).expect("install");
        assert_eq!(done.conf.as_deref(), Some(conflist.as_path()));
        assert!(done.changed);
        assert!(!conf.exists(), "the .conf should be gone");
        assert_eq!(
            doc(&conflist),
            json!({"cniVersion":"0.4.0","name":"mynet","plugins":[{"type":"bridge","bridge":"cni0"}, entry()]})
        );
        assert_eq!(
            fs::read_to_string(s.conf().join(".meshlane/10-mynet.conf.orig")).expect("backup"),
            original
        );
        assert!(
            !install(&s.opts()).expect("again").changed,
            "a converted file is stable"
        );

        let undone = uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert_eq!(
            undone,
            Uninstalled {
                conf: Some(conf.clone()),
                restored_original: true,
                binary_removed: true
            }
        );
        assert_eq!(fs::read_to_string(&conf).expect("restored .conf"), original);
        assert_eq!(
            names(&s.conf()),
            ["10-mynet.conf"],
            "expected only the original back"
        );
    }

    #[test]
    fn the_conf_written_again_is_converted_again() {
        let s = Scratch::new("reconvert");
        s.write(
            "10-mynet.conf",
            r#"{"cniVersion":"0.4.0","name":"mynet","type":"bridge"}"#,
        );
        install(&s.opts()).expect("install");
        // The primary CNI restarts and writes its .conf again; it sorts before our conflist.
        let again = r#"{"cniVersion":"0.4.0","name":"mynet","type":"ptp"}"#;
        s.write("10-mynet.conf", again);
        let done = install(&s.opts()).expect("install again");
        assert!(done.changed);
        assert_eq!(
            types(&s.conf().join("10-mynet.conflist")),
            ["ptp", "meshlane"]
        );
        assert_eq!(
            fs::read_to_string(s.conf().join(".meshlane/10-mynet.conf.orig")).expect("backup"),
            again,
            "the rewritten .conf is the new original"
        );
        uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert_eq!(
            fs::read_to_string(s.conf().join("10-mynet.conf")).expect("restored"),
            again
        );
        assert_eq!(names(&s.conf()), ["10-mynet.conf"]);
    }

    #[test]
    fn uninstall_leaves_a_conf_written_again_since_the_conversion() {
        let s = Scratch::new("reappeared");
        s.write(
            "10-mynet.conf",
            r#"{"cniVersion":"0.4.0","name":"mynet","type":"bridge"}"#,
        );
        install(&s.opts()).expect("install");
        // The primary CNI writes its .conf again and no install runs before the uninstall.
        let again = r#"{"cniVersion":"0.4.0","name":"mynet","type":"ptp"}"#;
        let conf = s.write("10-mynet.conf", again);
        let undone = uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert_eq!(undone.conf.as_deref(), Some(conf.as_path()));
        assert_eq!(
            fs::read_to_string(&conf).expect("reading"),
            again,
            "the newer .conf must not be overwritten by the older original"
        );
        assert_eq!(
            names(&s.conf()),
            ["10-mynet.conf"],
            "our conversion should be gone"
        );
    }

    #[test]
    fn bad_files_are_refused_and_nothing_changes() {
        let cases = [
            (
                "10-a.conflist",
                "{\"name\": \"a\", \"plugins\": [",
                "invalid JSON",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","cniVersion":"1.0.0"}"#,
                "no \"plugins\" key",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":[{"type":"bridge"},{"bridge":"cni0"}]}"#,
                "plugins[1] without \"type\"",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":{"type":"bridge"}}"#,
                "an object for \"plugins\"",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":[]}"#,
                "an empty \"plugins\" array",
            ),
            (
                "10-a.conflist",
                r#"{"name":"a","plugins":[{"type":7}]}"#,
                "plugins[0] with a \"type\" that is a number",
            ),
            ("10-a.conflist", r#"[{"type":"bridge"}]"#, "found an array"),
            (
                "10-a.conf",
                r#"{"name":"a","bridge":"cni0"}"#,
                "the object without \"type\"",
            ),
            (
                "10-a.json",
                r#"{"name":"a","plugins":"bridge"}"#,
                "a string for \"plugins\"",
            ),
        ];
        for (i, (name, content, reason)) in cases.into_iter().enumerate() {
            let s = Scratch::new(&format!("bad{i}"));
            let path = s.write(name, content);
            s.write("99-other.conflist", KINDNET);
            let before = s.snapshot();
            let err = install(&s.opts()).expect_err(&format!("{content:?} should be refused"));
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()) && message.contains(reason),
                "expected the error to name {} and say {reason:?}, found {message:?}",
                path.display()
            );
            assert!(
                s.snapshot() == before,
                "refusing {content:?} changed the directory (binary copied?)"
            );
        }
    }

    #[test]
    fn a_conversion_onto_someone_elses_conflist_is_refused() {
        let s = Scratch::new("collide");
        let conf = s.write("10-x.conf", r#"{"name":"x","type":"bridge"}"#);
        s.write("10-x.conflist", KINDNET);
        let before = s.snapshot();
        let err = install(&s.opts()).expect_err("should refuse to overwrite 10-x.conflist");
        assert!(
            err.to_string().contains(&conf.display().to_string()),
            "{err}"
        );
        assert!(
            s.snapshot() == before,
            "the refused install changed the directory"
        );
    }

    #[test]
    fn a_missing_bin_dir_is_refused_before_anything_changes() {
        let s = Scratch::new("nobindir");
        s.write("10-kindnet.conflist", KINDNET);
        let mut opts = s.opts();
        opts.bin_dir = s.root.join("nowhere");
        let before = s.snapshot();
        let err = install(&opts).expect_err("should refuse");
        assert!(
            err.to_string().contains(&format!(
                "{}: expected the CNI bin dir",
                opts.bin_dir.display()
            )),
            "{err}"
        );
        assert!(
            s.snapshot() == before,
            "the refused install changed the directory"
        );
    }

    #[test]
    fn an_entry_of_another_type_is_refused() {
        let s = Scratch::new("entry");
        s.write("10-kindnet.conflist", KINDNET);
        let before = s.snapshot();
        let mut opts = s.opts();
        opts.entry = json!({"type": "bridge"});
        let err = install(&opts).expect_err("should refuse");
        assert!(err.to_string().contains("\"type\": \"bridge\""), "{err}");
        assert!(s.snapshot() == before);
    }

    #[test]
    fn the_primary_is_the_lexically_first() {
        let s = Scratch::new("primary");
        s.write("99-last.conflist", KINDNET);
        s.write("20-flannel.conflist", KINDNET);
        s.write("10-calico.conflist", KINDNET);
        s.write("10-calico.conflist.bak", KINDNET);
        s.write(".00-hidden.conflist", KINDNET);
        s.write("00-readme.txt", "not a conf");
        fs::create_dir(s.conf().join("01-dir.conflist")).expect("mkdir");
        assert_eq!(
            primary_conf(&s.conf()).expect("primary_conf"),
            Some(s.conf().join("10-calico.conflist"))
        );
        let before = s.snapshot();
        install(&s.opts()).expect("install");
        let after = s.snapshot();
        for (path, bytes) in &before {
            if !path.ends_with("10-calico.conflist") {
                assert_eq!(after.get(path), Some(bytes), "{} changed", path.display());
            }
        }
        assert_eq!(
            types(&s.conf().join("10-calico.conflist")),
            ["bridge", "portmap", "meshlane"]
        );

        // Byte order, as Go's sort.Strings: "10-…" < "9-…", and "Z" < "a".
        let s = Scratch::new("primary-order");
        s.write("9-a.conf", r#"{"type":"bridge"}"#);
        s.write("a.conflist", KINDNET);
        s.write("Z.json", KINDNET);
        s.write("10-b.json", KINDNET);
        assert_eq!(
            primary_conf(&s.conf()).expect("primary_conf"),
            Some(s.conf().join("10-b.json"))
        );
        install(&s.opts()).expect("install");
        assert_eq!(
            types(&s.conf().join("10-b.json")),
            ["bridge", "portmap", "meshlane"],
            "a .json with plugins is a conflist, edited in place"
        );
    }

    #[test]
    fn uninstall_restores_the_original_and_twice_is_fine() {
        let s = Scratch::new("uninstall");
        let path = s.write("10-kindnet.conflist", KINDNET);
        let pristine = s.snapshot();
        install(&s.opts()).expect("install");

        let undone = uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert_eq!(
            undone,
            Uninstalled {
                conf: Some(path.clone()),
                restored_original: true,
                binary_removed: true
            }
        );
        assert_eq!(
            fs::read_to_string(&path).expect("reading"),
            KINDNET,
            "not the original byte for byte"
        );
        assert!(!s.bin().join("meshlane").exists(), "binary still there");
        assert!(
            !s.conf().join(".meshlane").exists(),
            "backup dir still there"
        );
        assert!(
            s.snapshot() == pristine,
            "the directories are not as before install"
        );

        let again = uninstall(&s.conf(), &s.bin()).expect("second uninstall");
        assert_eq!(
            again,
            Uninstalled {
                conf: None,
                restored_original: false,
                binary_removed: false
            }
        );
        assert!(
            s.snapshot() == pristine,
            "the second uninstall changed something"
        );
    }

    #[test]
    fn uninstall_keeps_changes_made_since() {
        let s = Scratch::new("keepedits");
        let path = s.write("10-kindnet.conflist", KINDNET);
        install(&s.opts()).expect("install");
        // An operator adds a plugin after ours, keeping ours.
        let mut edited = doc(&path);
        edited["plugins"]
            .as_array_mut()
            .expect("plugins")
            .push(json!({"type": "bandwidth"}));
        fs::write(&path, edited.to_string()).expect("writing");

        let undone = uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert!(
            !undone.restored_original,
            "the original would lose the bandwidth plugin"
        );
        assert_eq!(types(&path), ["bridge", "portmap", "bandwidth"]);
        assert!(!s.conf().join(".meshlane").exists());
    }

    #[test]
    fn watch_puts_the_entry_back_after_another_cni_rewrites() {
        let s = Scratch::new("watch");
        let path = s.write("10-kindnet.conflist", KINDNET);
        let opts = s.opts();
        let stop = Arc::new(AtomicBool::new(false));
        let (ended, ended_rx) = mpsc::channel();
        let watcher = thread::spawn({
            let (opts, stop) = (opts.clone(), stop.clone());
            move || {
                let result = watch(&opts, &stop, Duration::from_millis(100));
                // The receiver may have given up already; the join below reports that.
                ended.send(()).ok();
                result
            }
        });
        let has_ours = |path: &Path| {
            fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|d| d["plugins"].as_array().map(|p| p.iter().any(is_ours)))
                .unwrap_or(false)
        };
        wait_for("watch's first install", Duration::from_secs(2), || {
            has_ours(&path)
        });

        // Another CNI rewrites its conflist, plainly (truncate and write), without our entry.
        let rewritten = "{\"cniVersion\":\"1.0.0\",\"name\":\"kindnet\",\"plugins\":[{\"type\":\"ptp\",\"ipMasq\":false},{\"type\":\"portmap\",\"capabilities\":{\"portMappings\":true}}]}\n";
        fs::write(&path, rewritten).expect("rewriting");
        let rewrote = Instant::now();
        wait_for(
            "our entry back after the rewrite",
            Duration::from_secs(2),
            || has_ours(&path),
        );
        eprintln!("entry back {:?} after the rewrite", rewrote.elapsed());
        assert_eq!(types(&path), ["ptp", "portmap", "meshlane"]);

        // Someone removes the binary: the chain would name a plugin that is not there.
        fs::remove_file(s.bin().join("meshlane")).expect("removing the binary");
        wait_for("the binary back", Duration::from_secs(2), || {
            fs::read(s.bin().join("meshlane")).is_ok_and(|b| b == BINARY)
        });

        stop.store(true, Ordering::Relaxed);
        ended_rx
            .recv_timeout(Duration::from_secs(2))
            .expect("watch did not return within 2 s of stop");
        watcher
            .join()
            .expect("watch panicked")
            .expect("watch failed");

        let undone = uninstall(&s.conf(), &s.bin()).expect("uninstall");
        assert!(undone.restored_original);
        assert_eq!(
            fs::read_to_string(&path).expect("reading"),
            rewritten,
            "uninstall should give back the rewritten file, the new original, byte for byte"
        );
    }
}
