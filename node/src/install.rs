//! `skein-node install | uninstall | status`: the node as a system service on an edge device.
//!
//! # Layout
//! - [`plan`]: what an install writes, decided without IO ([`InstallPlan::new`]): the
//!   system user `skein`, `/etc/skein/node.toml` (0640, from the flags), `/var/lib/skein`,
//!   the hardened unit `/etc/systemd/system/skein-node.service` and the link that enables it.
//! - this module: [`apply`] makes a root directory match a plan, writing only what differs (a
//!   second install with the same flags changes nothing), [`uninstall`] removes it again.
//! - [`status`]: joined? coordinator reachable? models loaded?
//!
//! Every path is taken under a root (`--root DIR`, default `/`), so image builders and tests
//! install into a directory; the user is then created in `DIR/etc/passwd`
//! (`useradd --prefix`).

pub mod cli;
pub mod plan;
pub mod status;

pub use plan::{Entry, InstallPlan, InstallSpec};

use anyhow::{bail, Context};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What happened to one entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Written (created or changed).
    Wrote(PathBuf),
    /// Already as planned.
    Unchanged(PathBuf),
    /// Removed.
    Removed(PathBuf),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Wrote(p) => write!(f, "wrote     {}", p.display()),
            Change::Unchanged(p) => write!(f, "unchanged {}", p.display()),
            Change::Removed(p) => write!(f, "removed   {}", p.display()),
        }
    }
}

/// `path` (absolute, on the target system) under `root`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Whether this process runs as root (effective uid 0, from `/proc/self/status`).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?;
            uids.split_whitespace().nth(1).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// Fails unless root, saying what to run instead: `rerun` is the command line to prefix with
/// `sudo`.
pub fn require_root(what: &str, rerun: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "{what} needs root (it creates the user `{}`, /etc/skein, {} and a systemd unit): run `sudo {rerun}` (or add --print to see what it would write)",
            plan::SERVICE_USER,
            plan::STATE_DIR
        );
    }
    Ok(())
}

/// `(uid, gid)` of `user` in `root/etc/passwd`.
pub fn lookup_user(root: &Path, user: &str) -> anyhow::Result<Option<(u32, u32)>> {
    let path = under(root, Path::new("/etc/passwd"));
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 4 && f[0] == user).then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    }))
}

/// The system user `skein` (and its group) under `root`, created when missing.
pub fn ensure_user(root: &Path) -> anyhow::Result<(u32, u32)> {
    if let Some(ids) = lookup_user(root, plan::SERVICE_USER)? {
        return Ok(ids);
    }
    let mut cmd = Command::new("useradd");
    if root != Path::new("/") {
        let etc = under(root, Path::new("/etc"));
        std::fs::create_dir_all(&etc).with_context(|| format!("creating {}", etc.display()))?;
        cmd.arg("--prefix").arg(root);
    }
    cmd.args(["--system", "--user-group", "--no-create-home"])
        .args([
            "--home-dir",
            plan::STATE_DIR,
            "--shell",
            "/usr/sbin/nologin",
        ])
        .args(["--comment", "Skein node agent", plan::SERVICE_USER]);
    run(&mut cmd)?;
    lookup_user(root, plan::SERVICE_USER)?
        .with_context(|| format!("useradd made no user `{}`", plan::SERVICE_USER))
}

/// Run `cmd`, failing with its stderr.
fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes `root` match `plan`: the user first, then each entry, written only when it differs
/// in content, mode or owner (files are written to a temporary name and renamed into place).
pub fn apply(root: &Path, plan: &InstallPlan) -> anyhow::Result<Vec<Change>> {
    let (uid, gid) = ensure_user(root)?;
    let id_of = |(user, group): &(String, String)| {
        (
            if user == plan::SERVICE_USER { uid } else { 0 },
            if group == plan::SERVICE_USER { gid } else { 0 },
        )
    };
    let mut changes = Vec::new();
    for e in &plan.entries {
        let at = under(root, e.path());
        let changed = match e {
            Entry::Dir { mode, owner, .. } => {
                let (u, g) = id_of(owner);
                let mut changed = false;
                if !at.is_dir() {
                    std::fs::create_dir_all(&at)
                        .with_context(|| format!("creating {}", at.display()))?;
                    changed = true;
                }
                changed | set_mode_owner(&at, *mode, u, g)?
            }
            Entry::File {
                content,
                mode,
                owner,
                ..
            } => {
                let (u, g) = id_of(owner);
                if std::fs::read(&at).ok().as_deref() == Some(content.as_slice()) {
                    set_mode_owner(&at, *mode, u, g)?
                } else {
                    write_atomically(&at, content, *mode, u, g)?;
                    true
                }
            }
            Entry::Copy { from, mode, .. } => {
                if same_bytes(from, &at)? {
                    set_mode_owner(&at, *mode, 0, 0)?
                } else {
                    let bytes = std::fs::read(from)
                        .with_context(|| format!("reading {}", from.display()))?;
                    write_atomically(&at, &bytes, *mode, 0, 0)?;
                    true
                }
            }
            Entry::Link { target, .. } => {
                if std::fs::read_link(&at).ok().as_deref() == Some(target.as_path()) {
                    false
                } else {
                    if let Some(dir) = at.parent() {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    let _ = std::fs::remove_file(&at);
                    std::os::unix::fs::symlink(target, &at)
                        .with_context(|| format!("linking {}", at.display()))?;
                    true
                }
            }
        };
        changes.push(if changed {
            Change::Wrote(e.path().to_path_buf())
        } else {
            Change::Unchanged(e.path().to_path_buf())
        });
    }
    Ok(changes)
}

/// Sets mode and owner where they differ; whether anything changed.
fn set_mode_owner(at: &Path, mode: u32, uid: u32, gid: u32) -> anyhow::Result<bool> {
    let m = std::fs::metadata(at).with_context(|| format!("reading {}", at.display()))?;
    let mut changed = false;
    if m.mode() & 0o7777 != mode {
        std::fs::set_permissions(at, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", at.display()))?;
        changed = true;
    }
    if (m.uid(), m.gid()) != (uid, gid) {
        std::os::unix::fs::chown(at, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", at.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// Writes `bytes` to a temporary file next to `at` with its mode and owner set, then renames
/// it over `at`: readers see the old file or the new one, never half of one.
fn write_atomically(at: &Path, bytes: &[u8], mode: u32, uid: u32, gid: u32) -> anyhow::Result<()> {
    let dir = at
        .parent()
        .with_context(|| format!("{} has no parent", at.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = at.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.skein-install"));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", tmp.display()))?;
    std::os::unix::fs::chown(&tmp, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", tmp.display()))?;
    std::fs::rename(&tmp, at).with_context(|| format!("renaming into {}", at.display()))?;
    Ok(())
}

/// Whether the files `a` and `b` hold the same bytes (`b` may be missing).
fn same_bytes(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return Ok(false);
    };
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Whether systemd runs this system (the way `sd_booted()` tells).
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// `systemctl ARGS`.
pub fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("systemctl").args(args))
}

/// Enables the unit and starts it (restarts it when `changed`); on `/` only.
pub fn start(changed: bool) -> anyhow::Result<()> {
    if !systemd_running() {
        bail!("systemd is not running on this system, so the service cannot be started; install with --no-start (the unit is enabled and starts at the next boot)");
    }
    systemctl(&["daemon-reload"])?;
    systemctl(&["enable", plan::UNIT_NAME])?;
    systemctl(&[if changed { "restart" } else { "start" }, plan::UNIT_NAME])
}

/// Removes what an install writes under `root` (the binary only if install copied it to
/// [`plan::INSTALLED_BIN`]); with `purge`, the node's state (key, certificate, artifact cache)
/// and the user as well. On `/` with systemd running, the service is stopped and disabled
/// first.
pub fn uninstall(root: &Path, purge: bool) -> anyhow::Result<Vec<Change>> {
    let on_host = root == Path::new("/");
    if on_host && systemd_running() {
        // Not installed (or already stopped) is fine.
        let _ = systemctl(&["disable", "--now", plan::UNIT_NAME]);
    }
    let mut changes = Vec::new();
    for p in [
        plan::WANTS_LINK,
        plan::UNIT_PATH,
        plan::CONFIG_PATH,
        plan::INSTALLED_BIN,
    ] {
        let at = under(root, Path::new(p));
        if at.symlink_metadata().is_ok() {
            std::fs::remove_file(&at).with_context(|| format!("removing {}", at.display()))?;
            changes.push(Change::Removed(p.into()));
        }
    }
    // /etc/skein goes only when nothing else is in it.
    let etc = under(root, Path::new("/etc/skein"));
    if etc.is_dir() && std::fs::remove_dir(&etc).is_ok() {
        changes.push(Change::Removed("/etc/skein".into()));
    }
    if purge {
        let state = under(root, Path::new(plan::STATE_DIR));
        if state.exists() {
            std::fs::remove_dir_all(&state)
                .with_context(|| format!("removing {}", state.display()))?;
            changes.push(Change::Removed(plan::STATE_DIR.into()));
        }
        if lookup_user(root, plan::SERVICE_USER)?.is_some() {
            let mut cmd = Command::new("userdel");
            if !on_host {
                cmd.arg("--prefix").arg(root);
            }
            run(cmd.arg(plan::SERVICE_USER))?;
            changes.push(Change::Removed(
                format!("user {}", plan::SERVICE_USER).into(),
            ));
        }
    }
    if on_host && systemd_running() {
        let _ = systemctl(&["daemon-reload"]);
    }
    Ok(changes)
}

/// What `--print` shows: every entry with its mode, owner and content.
pub fn describe(plan: &InstallPlan) -> String {
    let mut out = String::new();
    for e in &plan.entries {
        match e {
            Entry::Dir { path, mode, owner } => out.push_str(&format!(
                "== {} (directory, {mode:04o}, {}:{})\n\n",
                path.display(),
                owner.0,
                owner.1
            )),
            Entry::File {
                path,
                content,
                mode,
                owner,
            } => out.push_str(&format!(
                "== {} ({mode:04o}, {}:{})\n{}\n",
                path.display(),
                owner.0,
                owner.1,
                String::from_utf8_lossy(content)
            )),
            Entry::Copy { path, from, mode } => out.push_str(&format!(
                "== {} ({mode:04o}, root:root)\n(a copy of {})\n\n",
                path.display(),
                from.display()
            )),
            Entry::Link { path, target } => out.push_str(&format!(
                "== {} (link to {})\n\n",
                path.display(),
                target.display()
            )),
        }
    }
    out.push_str(&format!(
        "and the system user `{}` (group `{}`), if missing\n",
        plan::SERVICE_USER,
        plan::SERVICE_USER
    ));
    out
}
