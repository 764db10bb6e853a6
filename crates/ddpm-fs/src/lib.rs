//! Safe file handling shared by every ddpm-rs crate that reads inputs or writes outputs.
//!
//! - **Writes are whole or nothing** ([`write_atomic`]): a crash or a full disk leaves either
//!   the old file or the new one, never a torn or empty one, and the temporary files a killed
//!   process leaves are recognisable by their name ([`is_temporary_of`]).
//! - **Outputs are checked before the work** ([`check_output`]), so a long job does not end in
//!   an error it could have given at its start.
//! - **Reads refuse what is not a regular file** ([`check_regular_file`], [`read_regular_file`]):
//!   opening a FIFO blocks until a writer comes, and a device such as `/dev/zero` never ends.
//!
//! Errors are [`std::io::Error`]s whose message says what the path is and what to do; callers
//! add the path and the flag or file it came from.
//!
//! ```
//! # fn main() -> std::io::Result<()> {
//! let dir = tempfile::tempdir()?;
//! let grid = dir.path().join("samples.png");
//! // Before a long job: could its output be written at the end?
//! ddpm_fs::check_output(&grid)?;
//! ddpm_fs::write_atomic(&grid, b"...the encoded image...")?;
//! assert_eq!(ddpm_fs::read_regular_file(&grid, 1 << 20)?, b"...the encoded image...");
//! // A directory where a file is meant is named before any work.
//! let e = ddpm_fs::check_output(dir.path()).unwrap_err();
//! assert!(e.to_string().contains("directory"), "{e}");
//! # Ok(())
//! # }
//! ```

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The most bytes read from a text input: a TOML config or a checkpoint's JSON (ours hold a few
/// kilobytes; this leaves room for any hand-written one).
pub const MAX_TEXT_BYTES: u64 = 16 << 20;

/// Writes `bytes` to `path` whole or not at all: into a file beside it under a name no other
/// process or call uses ([`temporary_name`]), flushed to disk, then renamed over `path` (and the
/// directory synced). On any failure (a full disk) the temporary file is removed and whatever was
/// at `path` is left as it was.
///
/// A symbolic link at `path` is written through (the file it names is replaced, and the link
/// keeps pointing there); an existing file that is read-only, or that is not a regular file, is
/// refused, not replaced; a file that is replaced keeps its permissions.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let path = &link_target(path)?;
    refuse_directory_name(path)?;
    let existing = existing_output(path)?;
    let tmp = path.with_file_name(temporary_name(std::process::id()));
    let result = fs::File::create(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        if let Some(meta) = &existing {
            file.set_permissions(meta.permissions())?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    } else {
        // Persist the rename; some file systems cannot sync a directory.
        let _ = fs::File::open(parent_dir(path)).and_then(|d| d.sync_all());
    }
    result
}

/// Checks, before any work, that [`write_atomic`] could write `path`: its directory exists, and
/// what is there now (symbolic links followed) is nothing or a writable regular file. The error
/// says what is wrong and what to do (kind `NotFound` for a missing directory, `InvalidInput` for
/// a directory or FIFO at `path`, `PermissionDenied` for a read-only file).
pub fn check_output(path: &Path) -> std::io::Result<()> {
    let path = &link_target(path)?;
    refuse_directory_name(path)?;
    let dir = parent_dir(path);
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is {}, not a directory: name a path inside a directory",
                    dir.display(),
                    file_kind(&meta)
                ),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "directory {} does not exist: create it first",
                    dir.display()
                ),
            ))
        }
        // A loop of symbolic links, a name too long: said with the directory's name.
        Err(e) => {
            return Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}: name a path inside a directory", dir.display()),
            ))
        }
    }
    existing_output(path).map(|_| ())
}

/// Checks, before any work, that `dir` is a directory or can be made one by creating the
/// missing directories of its path (as [`fs::create_dir_all`] does at the end of the work): no
/// component of it is a file, a dangling symbolic link or a loop of links. The error (kind
/// `InvalidInput`, or `NotFound` for a dangling link) names the component and what to do.
pub fn check_output_dir(dir: &Path) -> std::io::Result<()> {
    // Without a trailing `/`, so that a file named with one is seen as the file it is.
    let clean: PathBuf = dir.components().collect();
    for path in clean.ancestors() {
        if path.as_os_str().is_empty() {
            // The current directory.
            return Ok(());
        }
        match fs::metadata(path) {
            Ok(meta) if meta.is_dir() => return Ok(()),
            Ok(meta) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} is {}, not a directory: name a directory (new or existing)",
                        path.display(),
                        file_kind(&meta)
                    ),
                ))
            }
            Err(e) => {
                // Something is there that cannot be followed: a dangling link or a loop.
                if let Ok(meta) = fs::symlink_metadata(path) {
                    if meta.file_type().is_symlink() && e.kind() == std::io::ErrorKind::NotFound {
                        let to = fs::read_link(path).unwrap_or_default();
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!(
                                "{} is a symbolic link to {}, which does not exist: create it \
                                 first, or name another directory",
                                path.display(),
                                to.display()
                            ),
                        ));
                    }
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}: name another directory", path.display()),
                    ));
                }
                // Missing (or below a file): created with its parent, which is checked next.
            }
        }
    }
    Ok(())
}

/// The file a write of `path` replaces or creates, as one absolute name: symbolic links
/// followed and its directory made canonical, so that two names of one file (a link and its
/// target, `a/../b.png` and `b.png`) give the same path. Its directory must exist.
pub fn output_identity(path: &Path) -> std::io::Result<PathBuf> {
    let path = link_target(path)?;
    let dir = fs::canonicalize(parent_dir(&path))?;
    Ok(match path.file_name() {
        Some(name) => dir.join(name),
        None => dir,
    })
}

/// Refuses a path that names a directory by its form whatever is there: one that is empty or
/// ends in `/`, `/.` or `..` (a write to it would fail only at its end).
fn refuse_directory_name(path: &Path) -> std::io::Result<()> {
    let text = path.as_os_str().to_string_lossy();
    let trimmed = text.strip_suffix('.').unwrap_or(&text);
    let ends_as_dir = trimmed.is_empty()
        || trimmed.ends_with(std::path::is_separator)
        || !matches!(
            path.components().next_back(),
            Some(std::path::Component::Normal(_))
        );
    if ends_as_dir {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "`{}` names a directory (it is empty or ends in `/`, `.` or `..`): name a file",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// The metadata of the regular, writable file at `path` (links already followed), `None` when
/// nothing is there, or the error that refuses to replace what is there.
fn existing_output(path: &Path) -> std::io::Result<Option<fs::Metadata>> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "it is {}, not a regular file: name a file, or remove it",
                file_kind(&meta)
            ),
        )),
        Ok(meta) if meta.permissions().readonly() => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the file is read-only: make it writable, or write elsewhere",
        )),
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// The file a chain of symbolic links at `path` ends at (`path` itself when it is no link); a
/// dangling link gives the path it names, which a write then creates.
fn link_target(path: &Path) -> std::io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    // As many links as the system follows itself.
    for _ in 0..40 {
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let to = fs::read_link(&path)?;
                path = match path.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            _ => return Ok(path),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// A file name that no other process or call uses, for a file written beside its destination
/// and renamed over it: `.ddpm-<pid>-<n>.tmp`. It is short, so that every name a file system
/// allows can be written this way, and it carries the writer's process id, so that the leftovers
/// of a killed process can be found ([`is_temporary_of`]).
pub fn temporary_name(pid: u32) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(".ddpm-{pid}-{n}.tmp")
}

/// Whether `name` is a temporary file that process `pid` made with [`temporary_name`] (or, as
/// earlier versions named the checkpoints' ones, `.NAME.tmp-PID`).
pub fn is_temporary_of(name: &str, pid: u32) -> bool {
    let current = name
        .strip_prefix(&format!(".ddpm-{pid}-"))
        .and_then(|rest| rest.strip_suffix(".tmp"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    current || (name.starts_with('.') && name.ends_with(&format!(".tmp-{pid}")))
}

/// What a file-system object is, for errors ("a FIFO (named pipe)", "a directory").
pub fn file_kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    if t.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// The error for an input that is not a regular file, ending with `advice`.
pub fn not_regular(meta: &fs::Metadata, advice: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("it is {}, not a regular file: {advice}", file_kind(meta)),
    )
}

/// Checks that `path` (symlinks followed) is a regular file, before anything opens it. The error
/// (kind `InvalidInput`) says what the path is instead; a missing path keeps its `NotFound`.
pub fn check_regular_file(path: &Path) -> std::io::Result<fs::Metadata> {
    let meta = fs::metadata(path)?;
    if meta.is_file() {
        Ok(meta)
    } else {
        Err(not_regular(&meta, "give a file"))
    }
}

/// Checks that `path`, a file about to be written or appended to in place, is a regular file or
/// does not exist yet: opening a FIFO for writing blocks until a reader comes. The error (kind
/// `InvalidInput`) says what the path is and to remove it.
pub fn check_writable_file(path: &Path) -> std::io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => Err(not_regular(&meta, "remove it")),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads all of `path` if it is a regular file ([`check_regular_file`]) of at most `limit` bytes;
/// a larger one is refused (kind `InvalidData`) rather than read. What was opened is checked
/// again, in case the path was replaced in between.
pub fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    read_regular_file_or(path, limit, "give a file")
}

/// [`read_regular_file`] whose refusal of a file that is not regular ends with `advice`.
pub fn read_regular_file_or(path: &Path, limit: u64, advice: &str) -> std::io::Result<Vec<u8>> {
    let meta = fs::metadata(path)?;
    if !meta.is_file() {
        return Err(not_regular(&meta, advice));
    }
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(not_regular(&meta, advice));
    }
    let too_big = |len: u64| {
        let limit = if limit >= 1 << 20 {
            format!("{} MB", limit >> 20)
        } else {
            format!("{limit} bytes")
        };
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is {len} bytes, more than the {limit} read from such a file: is it the right file?"),
        )
    };
    if meta.len() > limit {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// [`read_regular_file`] of a UTF-8 text file of at most [`MAX_TEXT_BYTES`].
pub fn read_regular_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular_file(path, MAX_TEXT_BYTES)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is not UTF-8 text: is it the right file?",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn atomic_writes_go_through_links_keep_modes_and_spare_read_only_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        fs::write(p.join("target.png"), b"old").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // Through a link: the linked file is replaced and the link stays a link.
            std::os::unix::fs::symlink("target.png", p.join("latest.png")).unwrap();
            write_atomic(&p.join("latest.png"), b"new").unwrap();
            assert!(fs::symlink_metadata(p.join("latest.png"))
                .unwrap()
                .is_symlink());
            assert_eq!(fs::read(p.join("target.png")).unwrap(), b"new");
            // The mode of a replaced file is kept.
            fs::set_permissions(p.join("target.png"), fs::Permissions::from_mode(0o640)).unwrap();
            write_atomic(&p.join("target.png"), b"newer").unwrap();
            let mode = fs::metadata(p.join("target.png"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o640);
        }
        // A read-only file is refused, before and at the write, and left as it was.
        let mut ro = fs::metadata(p.join("target.png")).unwrap().permissions();
        ro.set_readonly(true);
        fs::set_permissions(p.join("target.png"), ro).unwrap();
        let e = check_output(&p.join("target.png")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
        let e = write_atomic(&p.join("target.png"), b"x").unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
        assert_ne!(fs::read(p.join("target.png")).unwrap(), b"x");
        // The longest name a file system allows can be written (the temporary name is short).
        let long = p.join(format!("{}.png", "w".repeat(251)));
        check_output(&long).unwrap();
        write_atomic(&long, b"ok").unwrap();
        assert!(
            names(p).iter().all(|n| !n.ends_with(".tmp")),
            "{:?}",
            names(p)
        );
    }

    #[test]
    fn outputs_that_cannot_be_written_are_named_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        check_output(&p.join("new.png")).unwrap();
        // A directory where a file is meant.
        fs::create_dir(p.join("out.gif")).unwrap();
        let e = check_output(&p.join("out.gif")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "it is a directory, not a regular file: name a file, or remove it"
        );
        let e = write_atomic(&p.join("out.gif"), b"x").unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(p.join("out.gif").is_dir());
        // A missing directory, and a file where the directory is meant.
        let e = check_output(&p.join("none/a.png")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(
            e.to_string().contains("does not exist: create it first"),
            "{e}"
        );
        fs::write(p.join("file"), b"").unwrap();
        let e = check_output(&p.join("file/a.png")).unwrap_err();
        assert!(
            e.to_string().contains("is a regular file, not a directory"),
            "{e}"
        );
        // A bare name is in the current directory.
        assert_eq!(parent_dir(Path::new("a.png")), Path::new("."));
        #[cfg(unix)]
        {
            let made = std::process::Command::new("mkfifo")
                .arg(p.join("pipe.png"))
                .status()
                .expect("mkfifo runs");
            assert!(made.success());
            let e = check_output(&p.join("pipe.png")).unwrap_err();
            assert!(e.to_string().contains("a FIFO (named pipe)"), "{e}");
            // Through a dangling link: the file it names is what would be written.
            std::os::unix::fs::symlink("made.png", p.join("link.png")).unwrap();
            check_output(&p.join("link.png")).unwrap();
            write_atomic(&p.join("link.png"), b"via").unwrap();
            assert_eq!(fs::read(p.join("made.png")).unwrap(), b"via");
        }
    }

    #[test]
    fn names_of_directories_and_unreachable_directories_are_refused_before_the_work() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        // A name that can only be a directory: refused by check_output, not at the write.
        for name in ["out.png/", "out.png/.", "sub/..", "."] {
            let path = p.join(name);
            let e = check_output(&path).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{name}: {e}");
            assert!(e.to_string().contains("names a directory"), "{name}: {e}");
            let e = write_atomic(&path, b"x").unwrap_err();
            assert!(e.to_string().contains("names a directory"), "{name}: {e}");
        }
        let e = check_output(Path::new("")).unwrap_err();
        assert!(e.to_string().contains("names a directory"), "{e}");
        assert!(!p.join("out.png").exists());
        assert!(names(p).is_empty(), "{:?}", names(p));
        // Output directories: existing, new (even several levels), or refused by name.
        check_output_dir(p).unwrap();
        check_output_dir(&p.join("new/deeper/")).unwrap();
        check_output_dir(Path::new("relative-new-dir")).unwrap();
        fs::write(p.join("file"), b"").unwrap();
        for bad in ["file", "file/", "file/sub", "file/sub/deeper"] {
            let e = check_output_dir(&p.join(bad)).unwrap_err();
            assert!(
                e.to_string()
                    .contains("file is a regular file, not a directory"),
                "{bad}: {e}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::symlink;
            symlink("missing/sub", p.join("dangling")).unwrap();
            let e = check_output_dir(&p.join("dangling")).unwrap_err();
            assert!(e.to_string().contains("which does not exist"), "{e}");
            let e = check_output_dir(&p.join("dangling/x")).unwrap_err();
            assert!(e.to_string().contains("which does not exist"), "{e}");
            symlink("loop-b", p.join("loop-a")).unwrap();
            symlink("loop-a", p.join("loop-b")).unwrap();
            let e = check_output_dir(&p.join("loop-a/x")).unwrap_err();
            assert!(e.to_string().contains("loop-a"), "{e}");
            // A loop above an output file is named with the directory.
            let e = check_output(&p.join("loop-a/x.png")).unwrap_err();
            assert!(e.to_string().contains("loop-a: "), "{e}");
            // One file under two names is one identity.
            fs::write(p.join("grid.png"), b"").unwrap();
            symlink("grid.png", p.join("anim.gif")).unwrap();
            fs::create_dir(p.join("d")).unwrap();
            let a = output_identity(&p.join("anim.gif")).unwrap();
            assert_eq!(a, output_identity(&p.join("grid.png")).unwrap());
            assert_eq!(a, output_identity(&p.join("d/../grid.png")).unwrap());
            assert_ne!(a, output_identity(&p.join("d/grid.png")).unwrap());
        }
    }

    #[test]
    fn temporary_names_carry_the_process_and_are_recognised() {
        let a = temporary_name(4242);
        let b = temporary_name(4242);
        assert_ne!(a, b);
        assert!(is_temporary_of(&a, 4242), "{a}");
        assert!(!is_temporary_of(&a, 424), "{a}");
        assert!(!is_temporary_of(&a, 42420), "{a}");
        assert!(is_temporary_of(".ckpt-00000001.safetensors.tmp-4242", 4242));
        assert!(!is_temporary_of(".ckpt-00000001.safetensors.tmp-42", 4242));
        assert!(!is_temporary_of(".ddpm-4242-.tmp", 4242));
        assert!(!is_temporary_of(".ddpm-4242-x.tmp", 4242));
        assert!(!is_temporary_of("ddpm-4242-1.tmp", 4242));
        assert!(a.len() < 40);
    }

    #[test]
    fn only_regular_files_of_at_most_the_limit_are_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("a.toml");
        fs::write(&file, b"steps = 1\n").expect("written");
        assert_eq!(read_regular_file(&file, 10).expect("read"), b"steps = 1\n");
        let e = read_regular_file(&file, 9).expect_err("too big");
        assert!(
            e.to_string()
                .contains("it is 10 bytes, more than the 9 bytes"),
            "{e}"
        );
        let e = read_regular_file(dir.path(), 100).expect_err("a directory");
        assert!(
            e.to_string()
                .contains("it is a directory, not a regular file: give a file"),
            "{e}"
        );
        let e = read_regular_file_or(dir.path(), 100, "advice").expect_err("a directory");
        assert!(e.to_string().ends_with("not a regular file: advice"), "{e}");
        let missing = read_regular_file(&dir.path().join("none"), 100).expect_err("missing");
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        fs::write(&file, [0xff, 0xfe]).unwrap();
        let e = read_regular_text(&file).expect_err("not UTF-8");
        assert!(e.to_string().contains("not UTF-8"), "{e}");
        #[cfg(unix)]
        {
            let fifo = dir.path().join("f.json");
            let made = std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .expect("mkfifo runs");
            assert!(made.success());
            // Opening it would block until a writer came: refused before that.
            let e = read_regular_text(&fifo).expect_err("a FIFO");
            assert!(
                e.to_string()
                    .contains("a FIFO (named pipe), not a regular file"),
                "{e}"
            );
            check_writable_file(&file).unwrap();
            let e = check_writable_file(&fifo).expect_err("a FIFO");
            assert!(e.to_string().ends_with("remove it"), "{e}");
            let e = read_regular_text(Path::new("/dev/zero")).expect_err("a device");
            assert!(e.to_string().contains("a character device"), "{e}");
        }
    }
}
