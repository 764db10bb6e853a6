//! Reading an input file only if it is a regular file: opening a FIFO blocks until a writer
//! comes, and a device may never end, so anything else is refused by name before it is opened
//! (and checked again on what was opened, in case the path was replaced in between).

use std::io::Read;
use std::path::Path;

use crate::error::{DataError, Result};

/// All of the file at `path` (symlinks followed), or an error naming it and what it is, ending
/// with `advice`.
pub(crate) fn read(path: &Path, advice: &str) -> Result<Vec<u8>> {
    let not_regular = |meta: &std::fs::Metadata| DataError::Io {
        path: path.into(),
        source: ddpm_fs::not_regular(meta, advice),
    };
    let meta = std::fs::metadata(path).map_err(DataError::io(path))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let mut file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let meta = file.metadata().map_err(DataError::io(path))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.read_to_end(&mut bytes).map_err(DataError::io(path))?;
    Ok(bytes)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn fifos_and_directories_are_refused_by_name_and_files_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let fifo = dir.path().join("train-images-idx3-ubyte.gz");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(made.success());
        // Through the MNIST reader, which would otherwise block in open().
        let chain = |e: DataError| {
            let source = std::error::Error::source(&e).map(|s| s.to_string());
            format!("{e}: {}", source.unwrap_or_default())
        };
        let e = chain(crate::mnist::read_images(&fifo).expect_err("a FIFO"));
        assert!(e.contains("a FIFO (named pipe), not a regular file"), "{e}");
        assert!(e.contains("train-images-idx3-ubyte.gz"), "{e}");
        let e = chain(read(dir.path(), "advice").expect_err("a directory"));
        assert!(e.contains("a directory, not a regular file: advice"), "{e}");
        let file = dir.path().join("f");
        std::fs::write(&file, b"bytes").expect("write");
        assert_eq!(read(&file, "advice").expect("read"), b"bytes");
    }
}
